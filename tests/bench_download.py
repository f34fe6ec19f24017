"""prepare.py's downloader against huggingface_hub's hf_hub_download, on the local hub mirror
(tests/hf_mirror.py): speed, resume, verification and the token, fault by fault.

    uv run tests/bench_download.py [--files 8] [--mb 64] [--workers 8] [--before OLD_PREPARE.py]

--before times another prepare.py's downloader too (e.g. `git show REV:prepare.py > /tmp/old.py`),
one whose download_shard(index) reads AUTORESEARCH_BASE_URL.

Loopback only: the mirror and the client share this machine's cores, so the speeds measure the
client's CPU cost more than any network. Compare figures taken in one run.
"""

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tests.hf_mirror import REPO, Mirror  # noqa: E402


def load_prepare(cache, endpoint):
    os.environ.update(AUTORESEARCH_CACHE=cache, AUTORESEARCH_SMOKE="0", HF_ENDPOINT=endpoint)
    import importlib
    import prepare
    return importlib.reload(prepare)


def ours(mirror, names, dest, workers):
    """prepare.py's downloader: the shards named shard_XXXXX.parquet, verified by sha256."""
    P = load_prepare(dest, mirror.endpoint)
    P.QUIET = True
    stop, lock = threading.Event(), threading.Lock()
    os.makedirs(P.DATA_DIR, exist_ok=True)
    token = P.hf_token()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda n: P.download_shard(int(n[6:11]), stop, lock, token=token), names))
    return {n: os.path.join(P.DATA_DIR, n) for n in names}


def before(path):
    """An older prepare.py's download_shard(index), loaded from `path`."""
    def fn(mirror, names, dest, workers):
        import importlib.util
        os.environ.update(AUTORESEARCH_CACHE=dest, AUTORESEARCH_SMOKE="0", AUTORESEARCH_BASE_URL=mirror.base_url)
        spec = importlib.util.spec_from_file_location("prepare_before", path)
        P = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(P)
        os.environ.pop("AUTORESEARCH_BASE_URL")
        os.makedirs(P.DATA_DIR, exist_ok=True)
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda n: P.download_shard(int(n[6:11])), names))
        return {n: os.path.join(P.DATA_DIR, n) for n in names}
    return fn


def hub(mirror, names, dest, workers, verify=True):
    """hf_hub_download into a local folder; it checks sizes only, so the published sha256 (the etag
    that get_hf_file_metadata reads) is checked here after."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.utils import disable_progress_bars
    disable_progress_bars()

    def one(n):
        path = hf_hub_download(REPO, n, repo_type="dataset", local_dir=dest, endpoint=mirror.endpoint)
        if verify:
            etag = get_hf_file_metadata(hf_hub_url(REPO, n, repo_type="dataset", endpoint=mirror.endpoint)).etag
            with open(path, "rb") as f:
                if hashlib.file_digest(f, "sha256").hexdigest() != etag:
                    raise ValueError(f"{n}: sha256 mismatch")
        return path

    with ThreadPoolExecutor(workers) as pool:
        return dict(zip(names, pool.map(one, names)))


def fresh():
    return tempfile.mkdtemp(prefix="bench_dl_")


def run(fn, mirror, names, workers):
    dest = fresh()
    t0 = time.time()
    try:
        got = fn(mirror, names, dest, workers)
        dt = time.time() - t0
        ok = all(open(got[n], "rb").read() == mirror.files[n] for n in names)
        return dt, ("ok" if ok else "WRONG BYTES")
    except Exception as e:
        return time.time() - t0, f"error: {type(e).__name__}: {str(e).splitlines()[0][:90]}"
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--mb", type=int, default=64)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--before", help="another prepare.py whose downloader to time as well")
    args = ap.parse_args()
    names = [f"shard_{i:05d}.parquet" for i in range(args.files)]
    files = {}
    for n in names:  # real parquet files (the old downloader insists), of incompressible bytes
        buf = pa.BufferOutputStream()
        pq.write_table(pa.table({"b": [os.urandom(1 << 20) for _ in range(args.mb)]}), buf, compression="none")
        files[n] = buf.getvalue().to_pybytes()
    total = args.files * args.mb * 1.048576
    print(f"{args.files} files x {args.mb} MiB over loopback, {args.workers} workers, {os.cpu_count()} cores")
    load_prepare(fresh(), "http://unused")  # import torch and prepare.py outside the timings
    with Mirror(files) as m:
        contenders = [("prepare.py (urllib, sha256 checked)", ours),
                      ("hf_hub_download + sha256 check", hub),
                      ("hf_hub_download alone", lambda *a: hub(*a, verify=False))]
        if args.before:
            contenders.insert(0, (f"{os.path.basename(args.before)} (--before)", before(args.before)))
        for label, fn in contenders:
            times = []
            for _ in range(args.runs):
                dt, res = run(fn, m, names, args.workers)
                times.append(dt)
            print(f"  {label:40s} best {total / min(times):7.1f} MB/s  ({', '.join(f'{t:.2f}s' for t in times)})  {res}")

    print("\nfaults on one 8 MiB file (the first request only; wrongsha on every request):")
    small = {"shard_00000.parquet": files[names[0]][:8 << 20]}  # not parquet: only the hashes judge it
    name = "shard_00000.parquet"
    print(f"  {'fault':10s} {'prepare.py':58s} hf_hub_download (+ sha256 check)")
    for fault in ("close", "reset", "norange", "truncated", "corrupt", "500", "wrongsha"):
        row = []
        for fn in (ours, hub):
            with Mirror(small) as m:
                if fault == "wrongsha":
                    m.sticky[name] = fault
                else:
                    m.faults[name] = [fault]
                dt, res = run(fn, m, [name], 1)
                starts = [f"{e[3] / 2**20:g}" for e in m.log if e[1] == "cdn"]
                row.append(f"{res[:44]} (GETs from MiB {', '.join(starts)})")
        print(f"  {fault:10s} {row[0]:58s} {row[1]}")

    print("\nHF_TOKEN (a mirror that wants one): is it sent to the CDN?")
    for label, fn in (("prepare.py", ours), ("hf_hub_download", hub)):
        with Mirror(small, token="hf_bench") as m:
            os.environ["HF_TOKEN"] = "hf_bench"
            dt, res = run(fn, m, [name], 1)
            os.environ.pop("HF_TOKEN")
            leaked = any(e[4] for e in m.log if e[1] == "cdn")
            print(f"  {label:16s} {res}; token sent to the CDN: {'yes' if leaked else 'no'}")


if __name__ == "__main__":
    main()
