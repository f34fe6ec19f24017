"""
The fixed part of autoresearch: data, tokenizer, loader and the metric. Do not modify it:
the agent edits train.py only.

The agent reads this file up to the fence (THE HARNESS): the constants, the budget rule and
what train.py imports (Tokenizer, make_dataloader, evaluate_bpb). Below the fence is the
machinery behind them and the command line (`uv run prepare.py --help`).
"""

import argparse
import base64
import bisect
import glob
import hashlib
import http.client
import json
import math
import multiprocessing
import os
import queue
import re
import shutil
import subprocess
import sys
import stat
import sysconfig
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tiktoken
# torch is imported in the functions that use it: run.sh calls --check and --serve-batches in
# every experiment, they need none of it, and importing it takes 2-4 s. So train.py imports
# prepare first and calls set_compile_cache before it imports torch.

# ---------------------------------------------------------------------------
# Fixed constants (the smoke profile, AUTORESEARCH_SMOKE=1, shrinks them so the same code runs on a CPU)
# ---------------------------------------------------------------------------

SMOKE = os.environ.get("AUTORESEARCH_SMOKE", "") not in ("", "0")

if not SMOKE:
    MAX_SEQ_LEN = 2048          # context length
    TIME_BUDGET = 300           # seconds of training (start-up and compilation excluded)
    EVAL_TOKENS = 40 * 524288   # validation tokens scored by evaluate_bpb
    HELDOUT_TOKENS = 10 * 524288  # held-out tokens scored after them (never shown to train.py)
    EVAL_ROWS = 16              # rows per forward pass in the evaluator: 16 x 2048 x 8192 fp32 logits = 1 GiB
    VOCAB_SIZE = 8192           # including the special tokens
else:
    MAX_SEQ_LEN = 256
    TIME_BUDGET = 5
    EVAL_TOKENS = 32 * 2048
    HELDOUT_TOKENS = 8 * 2048
    EVAL_ROWS = 8
    VOCAB_SIZE = 1024

CACHE_DIR = os.environ.get("AUTORESEARCH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "autoresearch")
if SMOKE:
    CACHE_DIR = os.path.join(CACHE_DIR, "smoke")  # never mixed with real data
COMPILE_CACHE_DIR = os.path.join(CACHE_DIR, "compile")  # train.py's torch.compile caches (set_compile_cache)

# The budget rule. Under run.sh, training batches come from a batch server that notes when it
# serves each one. The clock starts at the batch that brings the tokens served to WARMUP_TOKENS,
# at the latest WARMUP_ALLOWANCE s after the first batch; the first batch counts as served at the
# latest STARTUP_ALLOWANCE s after the launch. From the clock to train.py's exit (the hand-over
# included): at most TIME_BUDGET x 1.2 + 5 s, or the run is a crash. run.sh kills training
# TRAINING_LIMIT s after the launch. Start-up and compilation are thus outside TIME_BUDGET.
WARMUP_TOKENS = 32 * (8 if SMOKE else 128) * MAX_SEQ_LEN  # the clock starts once this many are served:
                                                           # 32 batches of the default train.py
STARTUP_ALLOWANCE = 45 if SMOKE else 60   # seconds from the launch to the first batch (imports, the model)
WARMUP_ALLOWANCE = 20 if SMOKE else 90    # seconds from the first batch to the clock (compilation, warm-up;
                                          # the smoke profile compiles nothing)
TRAIN_SLACK = (1.2, 5)    # from the clock to train.py's exit: at most TIME_BUDGET x 1.2 + 5 s (README, "the budget rule")
TRAINING_LIMIT = STARTUP_ALLOWANCE + WARMUP_ALLOWANCE + TIME_BUDGET * TRAIN_SLACK[0] + TRAIN_SLACK[1]  # run.sh kills there
MAX_BATCH_TOKENS = 1 << 22  # the largest batch the server packs (B x T): 16 of the default train.py's
MAX_BATCH_SHAPES = 8        # distinct (B, T) the server packs for one run
LOADER_BUFFER = 1000      # documents the loader packs from; the evaluator packs its rows the same way

# ---------------------------------------------------------------------------
# Tokenizer, loader and the metric: what train.py uses
# ---------------------------------------------------------------------------

class Tokenizer:
    """tiktoken wrapper with the reference's interface."""

    def __init__(self, enc):
        self.enc = enc
        self.bos_token_id = enc.encode_single_token(BOS_TOKEN)

    @classmethod
    def from_directory(cls, tokenizer_dir=None):
        d = tokenizer_dir or TOKENIZER_DIR
        if not os.path.exists(os.path.join(d, "tokenizer.tiktoken")):
            raise PrepareError(f"no tokenizer at {d}: run `{PREPARE_CMD}` first")
        return cls(_load_encoding(d))

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_bos_token_id(self):
        return self.bos_token_id

    def encode(self, text, prepend=None, num_threads=8):
        if prepend is not None and not isinstance(prepend, int):
            prepend = self.enc.encode_single_token(prepend)
        if isinstance(text, str):
            ids = self.enc.encode_ordinary(text)
            return ids if prepend is None else [prepend] + ids
        if isinstance(text, list):
            rows = self.enc.encode_ordinary_batch(text, num_threads=num_threads)
            return rows if prepend is None else [[prepend] + r for r in rows]
        raise ValueError(f"encode() takes a str or a list of str, not {type(text).__name__}")

    def decode(self, ids):
        return self.enc.decode(ids)

    def token_byte_lengths(self):
        """Bytes per token id: the length of the token's own byte sequence (not of its decoded
        text, which turns a partial UTF-8 sequence into a 3-byte replacement character); 0 for
        special tokens, which carry no text."""
        special = {self.enc.encode_single_token(t) for t in self.enc.special_tokens_set}
        lengths = np.zeros(self.enc.n_vocab, dtype=np.int32)
        for i in range(self.enc.n_vocab):
            if i not in special:
                lengths[i] = len(self.enc.decode_single_token_bytes(i))
        return lengths


def set_compile_cache(directory=COMPILE_CACHE_DIR):
    """Point torch.compile's caches (Inductor's, Triton's) at `directory` unless the environment
    already does. Call it before importing torch: train.py's caches live next to the data, so an
    experiment reuses the kernels the previous one compiled."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(directory, "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(directory, "triton"))


def get_token_bytes(device="cpu"):
    import torch
    return torch.from_numpy(Tokenizer.from_directory().token_byte_lengths()).to(device)


def make_dataloader(tokenizer, B, T, split="train", buffer_size=LOADER_BUFFER, device=None, prefetch=3):
    """Endless training batches (inputs, targets, epoch): inputs/targets int64 [B, T] on `device`
    (CUDA when available), targets = inputs shifted by one. The validation and held-out splits are
    the evaluator's alone: under run.sh training cannot even see their files."""
    if split != "train":
        raise PrepareError(f"make_dataloader serves the training split only, not {split!r}: "
                           "the validation split is read by the evaluator alone")
    if _batch_fds:  # under run.sh: from the batch server, which checked the data
        _check_batch_shape(B, T)
        return _loader(tokenizer, B, T, "train", buffer_size, device, prefetch, rows=_served_rows(B, T))
    check_prepared(training=True)  # a mismatched tokenizer or training set fails now, not after training
    return _loader(tokenizer, B, T, "train", buffer_size, device, prefetch)

# ---------------------------------------------------------------------------
# Evaluation: the fixed metric (do not change), computed outside train.py's process
# ---------------------------------------------------------------------------

def evaluate_bpb(model, tokenizer, batch_size):
    """Bits per byte on the pinned validation split: the sum of per-token cross-entropy (nats)
    over targets whose byte length is above 0, divided by ln 2 x the bytes of those targets, over
    the first EVAL_TOKENS of the split. model(x) must return logits [B, T, vocab].

    The score is never computed in this process. evaluate_bpb hands the model over: torch.export
    turns model(x) into a graph of PyTorch operations, written with its tensors as plain data
    (no pickle, no Python of train.py's), and a separate process (`prepare.py --evaluate`) checks
    that the model is causal and scores the graph, EVAL_ROWS rows at a time. Under run.sh that
    process runs after this one has exited, and evaluate_bpb returns nan; run by hand, it is
    started here and evaluate_bpb returns its val_bpb. batch_size is kept for the reference's
    signature; the evaluator's rows per pass are its own."""
    if tokenizer.get_vocab_size() != VOCAB_SIZE:
        raise PrepareError("the tokenizer passed to evaluate_bpb is not the prepared one")
    directory = _HANDOVER or os.path.join(CACHE_DIR, "handover", f"manual-{os.getpid()}")
    info = handover(model, directory)
    _record("handover", **info)
    if _HANDOVER:
        print(f"evaluate_bpb: the model went to the harness ({info['tensors']} tensors, {info['bytes'] / 2**20:.1f} MiB, "
              f"exported in {info['export_seconds']:.1f}s); run.sh scores it in a separate process", flush=True)
        return float("nan")
    out = subprocess.run([sys.executable, "-I", os.path.abspath(__file__), "--evaluate", directory, "--no-heldout"],
                         capture_output=True, text=True)
    result = dict(line.split(": ", 1) for line in out.stdout.splitlines() if ": " in line)
    shutil.rmtree(directory, ignore_errors=True)
    if out.returncode != 0 or "val_bpb" not in result:
        raise PrepareError(f"the evaluation failed: {result.get('reason') or (out.stderr.strip().splitlines() or ['?'])[-1]}")
    return float(result["val_bpb"])


# ==== THE HARNESS: not needed to edit train.py. The agent reads prepare.py up to this line. ====
# Below: the data download, document readers, BPE training, tokenization into token files and
# the manifest, the batch server, the hand-over and the evaluator, run-record verification, the CLI.

# ---------------------------------------------------------------------------
# The harness's constants
# ---------------------------------------------------------------------------

SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
SPECIAL_TOKENS = [f"<|reserved_{i}|>" for i in range(4)]
BOS_TOKEN = SPECIAL_TOKENS[0]

DATA_DIR = os.path.join(CACHE_DIR, "data")
TOKENIZER_DIR = os.path.join(CACHE_DIR, "tokenizer")
TOKENS_DIR = os.path.join(CACHE_DIR, "tokens")
MANIFEST = os.path.join(CACHE_DIR, "manifest.json")
EVALUATOR_CACHE_DIR = os.path.join(CACHE_DIR, "evaluator")  # the evaluator's compile caches: training never sees them

# ClimbMix: parquet shards shard_00000 ... shard_06542 with a "text" column; the last is the validation shard.
# HF_ENDPOINT points at a hub mirror, as for huggingface_hub; AUTORESEARCH_BASE_URL at a plain file server.
HF_ENDPOINT = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
BASE_URL = os.environ.get("AUTORESEARCH_BASE_URL") or f"{HF_ENDPOINT}/datasets/karpathy/climbmix-400b-shuffle/resolve/main"
DOWNLOAD_CHUNK = 1 << 18   # at most this many bytes per read: a stop request is seen within one
DOWNLOAD_TIMEOUT = 60      # seconds without a byte before a connection counts as dead
STATUS_EVERY = 10          # seconds between progress lines when stdout is not a terminal
QUIET = False              # --quiet: stage summaries and errors only
MAX_SHARD = 6542
VAL_SHARD = MAX_SHARD
HELDOUT_SHARD = MAX_SHARD - 1          # the held-out shard: never a training shard, whatever --num-shards says
TOKENIZER_TRAIN_CHARS = 1_000_000_000  # text the BPE trainer sees (training split only)
TOKENIZER_DOC_CAP = 10_000             # characters per document for the BPE trainer
VAL_ONE_IN = 20                        # --data: one document in 20 (by content hash) is validation,
                                       # another one in 20 held out (document_split)
SPLITS = ("train", "val", "heldout")   # heldout: scored at the end of every run, never used for a decision
PREPARE_CMD = ("AUTORESEARCH_SMOKE=1 " if SMOKE else "") + "uv run prepare.py"


class PrepareError(Exception):
    """Bad input or bad state: reported as one clear line, nothing half-written."""


def sha256_file(path, chunk=1 << 24):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_atomic(path, data):
    """Write bytes or text so that a reader sees the old file or the whole new one, never a part."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

# ---------------------------------------------------------------------------
# Progress: rewritten in place on a terminal, one line now and then in a log, nothing with --quiet
# ---------------------------------------------------------------------------

def log(msg):
    """An event line (a shard done, a source tokenized); --quiet keeps only the stage summaries."""
    if not QUIET:
        print(("\r\x1b[K" if _status[1] else "") + msg, flush=True)
        _status[1] = False


def status(msg):
    """A progress line: on a terminal it replaces the previous one; in a log, one per STATUS_EVERY s."""
    if QUIET:
        return
    if sys.stdout.isatty():
        print("\r\x1b[K" + msg, end="", flush=True)
        _status[1] = True
    elif time.time() - _status[0] >= STATUS_EVERY:
        print(msg, flush=True)
    else:
        return
    _status[0] = time.time()


def done_status():
    if _status[1]:
        print(flush=True)
        _status[1] = False


_status = [time.time(), False]  # when the last progress line was printed; whether one is open on the terminal


def fmt_bytes(n):
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"

# ---------------------------------------------------------------------------
# Download (ClimbMix): parallel, retried, resumable, verified against the hub's sha256, atomic
# ---------------------------------------------------------------------------

def shard_name(i):
    return f"shard_{i:05d}.parquet"


def hf_token():
    """HF_TOKEN, or the token `hf auth login` saved (huggingface_hub's own lookup)."""
    try:
        from huggingface_hub import get_token
        return get_token()
    except ImportError:
        return os.environ.get("HF_TOKEN")


class _HubRedirects(urllib.request.HTTPRedirectHandler):
    """The hub answers a resolve URL with a redirect to its CDN; the file's sha256 (X-Linked-Etag,
    the LFS object id) and size (X-Linked-Size) come with that redirect, so they are kept here.
    The token goes to the hub's own host only, never to the CDN."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None:
            new.linked = req.linked
            if headers.get("X-Linked-Etag"):
                req.linked.update(etag=headers["X-Linked-Etag"], size=headers.get("X-Linked-Size"))
            auth = req.unredirected_hdrs.get("Authorization")
            if auth and urllib.parse.urlsplit(newurl).netloc == urllib.parse.urlsplit(req.full_url).netloc:
                new.add_unredirected_header("Authorization", auth)
        return new


_OPENER = urllib.request.build_opener(_HubRedirects)


def _sha256_etag(etag):
    """The hub's etag of an LFS file is its sha256; a small git file's is a git sha1 (not a content hash)."""
    etag = (etag or "").removeprefix("W/").strip('"')
    return etag if re.fullmatch(r"[0-9a-f]{64}", etag) else None


def _get(url, start, token):
    """GET url from byte `start`: (response, the file's total size or None, its published sha256 or None)."""
    req = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    if token:
        req.add_unredirected_header("Authorization", f"Bearer {token}")
    req.linked = {}
    resp = _OPENER.open(req, timeout=DOWNLOAD_TIMEOUT)
    sha = _sha256_etag(req.linked.get("etag") or resp.headers.get("X-Linked-Etag"))
    size = req.linked.get("size") or resp.headers.get("X-Linked-Size")  # the published size first
    if not size and resp.status == 206 and "/" in (resp.headers.get("Content-Range") or ""):
        size = resp.headers["Content-Range"].rsplit("/", 1)[1]
    elif not size and resp.status == 200:
        size = resp.headers.get("Content-Length")
    return resp, int(size) if size and size.isdigit() else None, sha


def download_shard(index, stop, rename_lock, count=lambda n: None, token=None, attempts=6):
    """Fetch one shard into DATA_DIR; None if `stop` was set. A .part file resumes with an HTTP Range
    request, also after a connection closed cleanly short of the promised length. The whole file
    must match the sha256 the hub publishes before it gets its final name: a mismatch is fetched
    again once from scratch, then it is an error naming the shard. (Without a published sha256,
    e.g. a plain mirror, the file must at least parse as parquet.)"""
    name = shard_name(index)
    path = os.path.join(DATA_DIR, name)
    if os.path.exists(path):
        return path, 0, None
    part, url = path + ".part", f"{BASE_URL}/{name}"
    err, mismatches, failures = None, 0, 0
    while not stop.is_set():
        have = os.path.getsize(part) if os.path.exists(part) else 0
        received = 0
        try:
            resp, total, sha = _get(url, have, token)
            with resp:
                if have and resp.status != 206:  # the server ignored the range: start over
                    have = 0
                with open(part, "r+b" if have else "wb") as f:
                    h = hashlib.sha256()  # hashed as it arrives: no second pass over the file
                    while have and (block := f.read(min(1 << 24, have - f.tell()))):
                        h.update(block)
                    f.seek(have)
                    f.truncate()
                    while chunk := resp.read1(DOWNLOAD_CHUNK):
                        if stop.is_set():
                            return None
                        f.write(chunk)
                        h.update(chunk)
                        have += len(chunk)
                        received += len(chunk)
                        count(len(chunk))
            if total is not None and have < total:  # kept: the next attempt resumes from here
                raise ConnectionError(f"connection closed after {have:,} of {total:,} bytes")
            if sha is not None:
                got = h.hexdigest()
                if got != sha:
                    os.remove(part)  # a wrong byte anywhere: resuming would keep it
                    mismatches += 1
                    if mismatches == 2:
                        raise PrepareError(f"{name}: the download does not match the sha256 the hub publishes for it, "
                                           f"twice (got {got}, expected {sha}; from {url})")
                    log(f"  {name}: sha256 mismatch (got {got[:12]}..., expected {sha[:12]}...), downloading it again")
                    continue
            elif not _is_parquet(part):
                os.remove(part)
                raise ValueError("the downloaded file is not a valid parquet file (and no sha256 was published to check it)")
            with rename_lock:  # nothing gets its final name after an error elsewhere or Ctrl-C
                if stop.is_set():
                    return None
                os.replace(part, path)
            return path, have, sha is not None
        except urllib.error.HTTPError as e:
            if e.code == 416 and os.path.exists(part):
                os.remove(part)
            elif 400 <= e.code < 500 and e.code not in (408, 429):
                raise PrepareError(f"{url}: HTTP {e.code} {e.reason}" +
                                   (" (set HF_TOKEN, or log in with `hf auth login`)" if e.code in (401, 403) else "")) from e
            err = e
        except (OSError, ValueError, http.client.HTTPException) as e:  # reset, time-out, short body: resume
            err = e
        failures = 0 if received else failures + 1  # a link that delivers is retried at once, for ever
        if failures >= attempts:
            raise PrepareError(f"download of {name} failed {attempts} times in a row: {err}")
        have = os.path.getsize(part) if os.path.exists(part) else 0
        log(f"  {name}: {err}; " + (f"resuming at byte {have:,}" if have else "retrying"))
        stop.wait(min(2 ** (failures - 1), 30) if failures else 0)
    return None


def _is_parquet(path):
    try:
        pq.ParquetFile(path)
        return True
    except Exception:
        return False


def climbmix_training_shards(num_train):
    """The first num_train shards that are neither the validation nor the held-out shard."""
    return [i for i in range(MAX_SHARD) if i not in (VAL_SHARD, HELDOUT_SHARD)][:max(num_train, 0)]


def download_climbmix(num_train, workers):
    """The validation shard and the first num_train training shards, `workers` at a time. The
    first error, or Ctrl-C, stops every download in flight at its next chunk: worker threads are
    daemons, so nobody waits for them, and none renames a shard into place after it."""
    # validation and held-out first: their indices never move
    ids = [VAL_SHARD, HELDOUT_SHARD] + climbmix_training_shards(num_train)
    os.makedirs(DATA_DIR, exist_ok=True)
    missing = [i for i in ids if not os.path.exists(os.path.join(DATA_DIR, shard_name(i)))]
    print(f"Data: {len(ids) - len(missing)} of {len(ids)} shards already at {DATA_DIR}" +
          (f", downloading {len(missing)} from {BASE_URL}" if missing else ""), flush=True)
    if not missing:
        return [os.path.join(DATA_DIR, shard_name(i)) for i in ids]
    token = hf_token()
    stop, rename_lock = threading.Event(), threading.Lock()
    todo, results = queue.Queue(), queue.Queue()
    for i in missing:
        todo.put(i)
    got, got_lock = [0], threading.Lock()  # bytes received by all workers

    def count(n):
        with got_lock:
            got[0] += n

    def worker():
        while not stop.is_set():
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            try:
                results.put((i, download_shard(i, stop, rename_lock, count, token), None))
            except BaseException as e:
                results.put((i, None, e))
                return

    for _ in range(max(1, min(workers, len(missing)))):
        threading.Thread(target=worker, daemon=True).start()
    t0 = time.time()
    try:
        for n in range(1, len(missing) + 1):
            while True:
                try:
                    i, res, e = results.get(timeout=0.25)
                    break
                except queue.Empty:
                    rate = got[0] / max(time.time() - t0, 1e-9)
                    status(f"  downloading: {n - 1}/{len(missing)} shards done, {fmt_bytes(got[0])} at {rate / 1e6:.1f} MB/s")
            if e is not None:
                raise e
            rate = got[0] / max(time.time() - t0, 1e-9)
            log(f"  [{n}/{len(missing)}] {shard_name(i)}  {fmt_bytes(res[1])}, "
                f"{'sha256 ok' if res[2] else 'parses as parquet (no sha256 published)'}  "
                f"({fmt_bytes(got[0])} so far, {rate / 1e6:.1f} MB/s)")
    finally:  # an error or Ctrl-C: the others stop at their next chunk, and rename nothing
        with rename_lock:
            stop.set()
    print(f"Data: downloaded {fmt_bytes(got[0])} in {time.time() - t0:.0f}s", flush=True)
    return [os.path.join(DATA_DIR, shard_name(i)) for i in ids]

# ---------------------------------------------------------------------------
# Reading documents: parquet (text column), jsonl (text field), txt
# ---------------------------------------------------------------------------

SUFFIXES = (".parquet", ".jsonl", ".txt")


def _is_text_type(kind):
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or str(kind) == "string_view"


def iter_documents(path):
    """Yield the text documents of one source file. A .txt file is one document, or several
    separated by lines holding only <|endoftext|> (the TinyStories convention). An .arrow file is
    one of a `datasets` dataset's own files (Arrow IPC stream), found by dataset_files()."""
    if path.endswith(".arrow"):
        try:
            with pa.memory_map(path) as src:
                reader = pa.ipc.open_stream(src)
                if "text" not in reader.schema.names or not _is_text_type(reader.schema.field("text").type):
                    raise PrepareError(f"{path}: no 'text' column of strings")
                for batch in reader:
                    for text in batch.column("text").to_pylist():
                        if text:
                            yield text
        except (OSError, pa.ArrowInvalid) as e:
            raise PrepareError(f"{path}: not a readable Arrow stream ({e})") from e
    elif path.endswith(".parquet"):
        try:
            pf = pq.ParquetFile(path)
        except Exception as e:
            raise PrepareError(f"{path}: not a readable parquet file ({e})") from e
        if "text" not in pf.schema_arrow.names:
            raise PrepareError(f"{path}: no 'text' column (columns: {', '.join(pf.schema_arrow.names)})")
        kind = pf.schema_arrow.field("text").type
        if not _is_text_type(kind):
            raise PrepareError(f"{path}: the 'text' column holds {kind}, not strings")
        for rg in range(pf.num_row_groups):
            for text in pf.read_row_group(rg, columns=["text"]).column("text").to_pylist():
                if text:
                    yield text
    elif path.endswith(".jsonl"):
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line.decode("utf-8"))["text"]
                except UnicodeDecodeError as e:
                    raise PrepareError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start})") from e
                except (ValueError, KeyError, TypeError) as e:
                    raise PrepareError(f"{path}:{lineno}: expected a JSON object with a 'text' field") from e
                if not isinstance(text, str):
                    raise PrepareError(f"{path}:{lineno}: 'text' is not a string")
                if text:
                    yield text
    elif path.endswith(".txt"):
        with open(path, "rb") as f:
            raw = f.read()
        try:
            content = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise PrepareError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
        for doc in content.split("\n<|endoftext|>\n"):
            if doc.strip():
                yield doc
    else:
        raise PrepareError(f"{path}: unsupported file type (use {', '.join(SUFFIXES)})")


def is_val_document(text):
    """--data corpora: a document's split follows from its content, so the split is deterministic
    and a document (or an exact duplicate of it) is never on both sides."""
    h = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "little") % VAL_ONE_IN == 0


def document_split(text):
    """The split of a --data document: val (hash = 0 mod 20), heldout (hash = 1 mod 20) or train."""
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") % VAL_ONE_IN
    return ("val", "heldout")[h] if h < 2 else "train"


def dataset_files(name):
    """A dataset saved with `datasets` (save_to_disk: a directory) or a Hugging Face dataset by name
    (load_dataset: downloaded and cached by `datasets`, with HF_TOKEN and HF_ENDPOINT): the Arrow
    files behind every split, in split-name order, read like any other source through their
    `text` column."""
    try:
        import datasets
        ds = datasets.load_from_disk(name) if os.path.isdir(name) else datasets.load_dataset(name)
    except Exception as e:
        where = "a dataset saved with datasets" if os.path.isdir(name) else \
            "no such file or directory here, and as a Hugging Face dataset"
        raise PrepareError(f"{name}: {where} it does not load ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    splits = {"": ds} if isinstance(ds, datasets.Dataset) else dict(sorted(ds.items()))
    files = []
    for split_name, split in splits.items():
        what = f"{name}{'[' + split_name + ']' if split_name else ''}"
        feature = split.features.get("text")
        if getattr(feature, "dtype", None) not in ("string", "large_string"):
            raise PrepareError(f"{what}: no 'text' column of strings (columns: {', '.join(split.column_names)})")
        if not split.cache_files:
            raise PrepareError(f"{what}: the dataset has no files on disk")
        files += [f["filename"] for f in split.cache_files]
    return files


def expand_data_paths(paths):
    """--data arguments -> (source files, the corpus's description for manifest.json)."""
    files, desc = [], []
    for p in paths:
        if os.path.isdir(p) and any(os.path.exists(os.path.join(p, f)) for f in ("state.json", "dataset_dict.json")):
            found = dataset_files(p)  # saved with datasets' save_to_disk
            desc.append(os.path.abspath(p))
        elif os.path.isdir(p):
            found = sorted(f for f in glob.glob(os.path.join(p, "**", "*"), recursive=True) if f.endswith(SUFFIXES))
            if not found:
                raise PrepareError(f"{p}: directory holds no {', '.join(SUFFIXES)} files (nor a dataset saved with datasets)")
            desc += [os.path.abspath(f) for f in found]
        elif os.path.isfile(p):
            if not p.endswith(SUFFIXES):
                raise PrepareError(f"{p}: unsupported file type (use {', '.join(SUFFIXES)})")
            found = [p]
            desc.append(os.path.abspath(p))
        elif re.fullmatch(r"[\w.-]+/[\w.-]+", p):  # owner/name: a Hugging Face dataset
            found = dataset_files(p)
            desc.append(f"hf:{p}")
        else:
            raise PrepareError(f"{p}: no such file or directory")
        files += found
    files = [os.path.abspath(f) for f in files]
    if len(set(files)) != len(files):
        raise PrepareError("the same file is given twice")
    return files, "data: " + " ".join(desc)


def validate_sources(files):
    """Read every document once before anything is written, so bad input fails early and cleanly,
    including a corpus whose training or validation split would be empty."""
    total_docs = val_docs = held_docs = 0
    for f in files:
        n = 0
        for text in iter_documents(f):
            n += 1
            val_docs += is_val_document(text)
            held_docs += document_split(text) == "heldout"
            if n % 10000 == 0:
                status(f"  reading {os.path.basename(f)}: {n:,} documents")
        if n == 0:
            raise PrepareError(f"{f}: no documents (empty file?)")
        total_docs += n
    how = f"one document in {VAL_ONE_IN}, chosen by a hash of its text, goes to validation"
    if total_docs == 1 and val_docs == 1:
        raise PrepareError(f"{files[0]}: its only document went to validation ({how}), so nothing is left to train on; "
                           f"give more documents (a .txt file holds several when lines holding only <|endoftext|> separate them)")
    if val_docs == 0:
        raise PrepareError(f"the validation split would be empty: none of the {total_docs:,} documents was chosen for it "
                           f"({how}); give more documents")
    if held_docs == 0:
        raise PrepareError(f"the held-out split would be empty: none of the {total_docs:,} documents was chosen for it "
                           f"(another one in {VAL_ONE_IN}, by the same hash); give more documents")
    if val_docs + held_docs == total_docs:
        raise PrepareError(f"the training split would be empty: all {total_docs:,} documents went to validation ({how}); "
                           f"give more documents")
    return total_docs


def smoke_corpus():
    """The smoke profile's corpus: Python's own standard library sources, present offline on any
    machine with Python. Written once as a jsonl file so the normal --data path handles it."""
    path = os.path.join(CACHE_DIR, "corpus", "python-stdlib.jsonl")
    if not os.path.exists(path):
        stdlib = sysconfig.get_paths()["stdlib"]
        files = sorted(glob.glob(os.path.join(stdlib, "*.py")) + glob.glob(os.path.join(stdlib, "*", "*.py")))
        lines, size = [], 0
        for f in files:
            if "test" in os.path.relpath(f, stdlib).split(os.sep)[0] or size > 6_000_000:
                continue
            try:
                with open(f, encoding="utf-8") as fh:
                    text = fh.read()
            except (UnicodeDecodeError, OSError):
                continue
            lines.append(json.dumps({"text": text}))
            size += len(text)
        if not lines:
            raise PrepareError(f"no Python sources found under {stdlib} for the smoke corpus")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_atomic(path, "\n".join(lines) + "\n")
    return [path]

# ---------------------------------------------------------------------------
# Tokenizer: BPE trained with HF tokenizers, run with tiktoken, stored as plain text
# ---------------------------------------------------------------------------

def _byte_decoder():
    """Inverse of the GPT-2 byte-to-unicode table used by byte-level BPE trainers."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def train_tokenizer(train_texts):
    """Train byte-level BPE to VOCAB_SIZE - 4 tokens, then append the 4 special tokens.
    Ranks: the 256 bytes first, then each merge in the order it was learned."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, models, pre_tokenizers, trainers
    n_ranks = VOCAB_SIZE - len(SPECIAL_TOKENS)
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=n_ranks, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[], show_progress=sys.stderr.isatty() and not QUIET)
    hf.train_from_iterator(train_texts, trainer)
    merges = json.loads(hf.to_str())["model"]["merges"]
    dec = _byte_decoder()
    ranks = {bytes([b]): b for b in range(256)}
    for pair in merges:
        a, b = pair if isinstance(pair, list) else pair.split(" ")
        token = bytes(dec[c] for c in a + b)
        if token not in ranks:
            ranks[token] = len(ranks)
    if len(ranks) != n_ranks:
        raise PrepareError(f"the training text yields only {len(ranks)} of {n_ranks} BPE tokens: too little data")
    return ranks


def save_tokenizer(ranks, source_desc):
    os.makedirs(TOKENIZER_DIR, exist_ok=True)
    lines = "".join(f"{base64.b64encode(tok).decode()} {rank}\n" for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]))
    write_atomic(os.path.join(TOKENIZER_DIR, "tokenizer.tiktoken"), lines)
    write_atomic(os.path.join(TOKENIZER_DIR, "tokenizer.json"), json.dumps(
        {"pattern": SPLIT_PATTERN, "special_tokens": SPECIAL_TOKENS, "vocab_size": VOCAB_SIZE, "trained_on": source_desc,
         "tiktoken_sha256": hashlib.sha256(lines.encode()).hexdigest()}, indent=1))


def tokenizer_fingerprint(tokenizer_dir=None):
    d = tokenizer_dir or TOKENIZER_DIR
    h = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer.tiktoken"):
        h.update(sha256_file(os.path.join(d, name)).encode())
    return h.hexdigest()


def _load_encoding(tokenizer_dir):
    with open(os.path.join(tokenizer_dir, "tokenizer.json")) as f:
        meta = json.load(f)
    ranks = {}
    with open(os.path.join(tokenizer_dir, "tokenizer.tiktoken"), "rb") as f:
        for line in f:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    n = meta["vocab_size"] - len(meta["special_tokens"])
    specials = {name: n + i for i, name in enumerate(meta["special_tokens"])}
    return tiktoken.Encoding(name="autoresearch", pat_str=meta["pattern"], mergeable_ranks=ranks, special_tokens=specials)


# ---------------------------------------------------------------------------
# Tokenization to uint16 files, one task per source file, all cores
# ---------------------------------------------------------------------------

def _out_paths(index):
    d = TOKENS_DIR
    return {**{split: os.path.join(d, f"{split}_{index:05d}.bin") for split in SPLITS},
            "sidecar": os.path.join(d, f"source_{index:05d}.json")}


def _task_done(index, source, source_sha, tok_fp):
    """A source is done when its sidecar names it, its content (sha256) and the tokenizer, and both
    token files match the recorded sizes and sha256 (so a truncated or corrupted file is rebuilt,
    and so is a source edited in place)."""
    paths = _out_paths(index)
    try:
        with open(paths["sidecar"]) as f:
            side = json.load(f)
        if side["source"] != source or side.get("source_sha256") != source_sha or side["tokenizer"] != tok_fp:
            return False
        for split in SPLITS:
            p = paths[split]
            if os.path.getsize(p) != 2 * side[split]["tokens"] or sha256_file(p) != side[split]["sha256"]:
                return False
        return True
    except (OSError, ValueError, KeyError):
        return False


def _worker_init(counter):
    """Tokenizing workers hold ~400 MB each for minutes: each leaves as soon as its parent is gone,
    even after a SIGKILL that gave nobody the chance to stop it (it is then re-parented)."""
    global _docs_done
    _docs_done = counter
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _tokenize_task(args):
    index, source, source_sha, split_mode, threads = args
    enc = _load_encoding(TOKENIZER_DIR)
    bos = enc.encode_single_token(BOS_TOKEN)
    paths = _out_paths(index)
    out = {split: [] for split in SPLITS}
    batch = []

    def flush():
        splits = [split_mode] * len(batch) if split_mode != "hash" else [document_split(t) for t in batch]
        for split, ids in zip(splits, enc.encode_ordinary_batch(batch, num_threads=threads)):
            out[split].append(np.array([bos] + ids, dtype=np.uint16))
        with _docs_done.get_lock():
            _docs_done.value += len(batch)
        batch.clear()

    for text in iter_documents(source):
        batch.append(text)
        if len(batch) == 1024:
            flush()
    flush()
    side = {"source": source, "source_sha256": source_sha, "tokenizer": tokenizer_fingerprint()}
    for split in SPLITS:
        arr = np.concatenate(out[split]) if out[split] else np.zeros(0, dtype=np.uint16)
        write_atomic(paths[split], arr.tobytes())
        side[split] = {"tokens": int(arr.size), "docs": len(out[split]), "sha256": hashlib.sha256(arr.tobytes()).hexdigest()}
    write_atomic(paths["sidecar"], json.dumps(side))  # last: marks the task complete
    return index, side


def hash_sources(paths):
    """sha256 of every source file, several at a time (hashlib lets go of the GIL)."""
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(sha256_file, paths))


def tokenize_sources(sources, source_shas):
    """sources: list of (path, split_mode) with split_mode 'train', 'val', 'heldout' or 'hash'; source_shas:
    their sha256, which the token files are keyed on."""
    os.makedirs(TOKENS_DIR, exist_ok=True)
    keep = {os.path.basename(p) for i in range(len(sources)) for p in _out_paths(i).values()}
    for name in os.listdir(TOKENS_DIR):  # files of sources no longer asked for (fewer shards than before)
        if name not in keep:
            os.remove(os.path.join(TOKENS_DIR, name))
    tok_fp = tokenizer_fingerprint()
    todo = [(i, src, sha, mode) for i, ((src, mode), sha) in enumerate(zip(sources, source_shas))
            if not _task_done(i, src, sha, tok_fp)]
    print(f"Tokens: {len(sources) - len(todo)} of {len(sources)} sources already tokenized" +
          (f", tokenizing {len(todo)}" if todo else ""), flush=True)
    if not todo:
        return
    cores = os.cpu_count() or 1
    workers = min(cores, len(todo))
    threads = max(1, cores // workers)
    rows = [_num_rows(src) for _, src, _, _ in todo]
    total = sum(rows) if None not in rows else None  # known for parquet (its metadata), else not
    counter = multiprocessing.Value("q", 0)
    t0 = time.time()
    # the pool's context exit terminates the workers on an error or Ctrl-C
    with multiprocessing.Pool(workers, initializer=_worker_init, initargs=(counter,)) as pool:
        results = pool.imap_unordered(_tokenize_task, [(i, src, sha, mode, threads) for i, src, sha, mode in todo])
        for n in range(1, len(todo) + 1):
            while True:
                try:
                    index, side = results.next(timeout=0.25)
                    break
                except multiprocessing.TimeoutError:
                    docs = counter.value
                    status(f"  tokenizing: {docs:,}" + (f" of {total:,} ({100 * docs / max(total, 1):.0f}%)" if total else "") +
                           f" documents, {n - 1}/{len(todo)} sources done, {time.time() - t0:.0f}s")
            log(f"  [{n}/{len(todo)}] {os.path.basename(side['source'])}: "
                f"{side['train']['tokens'] / 1e6:.1f}M train + {side['val']['tokens'] / 1e6:.1f}M val + "
                f"{side['heldout']['tokens'] / 1e6:.1f}M held-out tokens "
                f"({time.time() - t0:.0f}s)")


def _num_rows(path):
    if path.endswith(".parquet"):
        try:
            return pq.ParquetFile(path).metadata.num_rows
        except Exception:
            return None
    return None


def split_files(split, tokens_dir=None):
    d = tokens_dir or TOKENS_DIR
    return sorted(glob.glob(os.path.join(d, f"{split}_*.bin")))


def val_fingerprint(split="val"):
    h = hashlib.sha256()
    for p in split_files(split):
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def rebuild_hint(what):
    return (f"{what}: val_bpb from it would not be comparable with earlier runs, so it is not re-blessed. "
            f"Rebuild everything from scratch: rm -r {TOKENIZER_DIR} {TOKENS_DIR} {MANIFEST} && {PREPARE_CMD}")


def write_manifest(source_desc, sources, source_shas):
    """manifest.json: the corpus, and the fingerprints every check compares with. Each token file is
    recorded with its sha256 and with its size and mtime (what --check --quick compares).
    Not rewritten when nothing changed. Returns (manifest, whether it was written)."""
    sides = []
    for i in range(len(sources)):
        with open(_out_paths(i)["sidecar"]) as f:
            sides.append(json.load(f))
    train_tokens = sum(s["train"]["tokens"] for s in sides)
    val_tokens = sum(s["val"]["tokens"] for s in sides)
    heldout_tokens = sum(s["heldout"]["tokens"] for s in sides)
    if val_tokens == 0:
        raise PrepareError("the validation split is empty: give more documents")
    if heldout_tokens == 0:
        raise PrepareError("the held-out split is empty: give more documents")
    if train_tokens == 0:
        raise PrepareError("the training split is empty: give more documents")
    token_files = {}
    for i, side in enumerate(sides):
        for split in SPLITS:
            st = os.stat(_out_paths(i)[split])
            token_files[os.path.basename(_out_paths(i)[split])] = {
                "bytes": st.st_size, "sha256": side[split]["sha256"], "mtime_ns": st.st_mtime_ns}
    manifest = {
        "source": source_desc,
        "vocab_size": VOCAB_SIZE,
        "tokenizer_sha256": tokenizer_fingerprint(),
        "val_sha256": val_fingerprint(),
        "heldout_sha256": val_fingerprint("heldout"),
        "train_tokens": train_tokens,
        "val_tokens": val_tokens,
        "heldout_tokens": heldout_tokens,
        "files": [{"source": s["source"], "source_sha256": sha, **{f"{split}_tokens": s[split]["tokens"] for split in SPLITS}}
                  for s, sha in zip(sides, source_shas)],
        "token_files": token_files,
    }
    text = json.dumps(manifest, indent=1)
    try:
        with open(MANIFEST) as f:
            if f.read() == text:
                return manifest, False
    except OSError:
        pass
    write_atomic(MANIFEST, text)
    return manifest, True


def check_prepared(full=False, training=False):
    """Raise PrepareError unless the prepared data matches manifest.json; return the manifest.
    Always: the tokenizer, the validation and the held-out tokens by sha256, and the set of token files.
    training (make_dataloader without the batch server, outside run.sh): the tokenizer and the
    training files only. (Under run.sh the sandbox shows train.py the tokenizer and manifest.json.)
    Quick (the default; the evaluator and `prepare.py --check --quick` for run.sh): each
    training token file by the size and mtime recorded, so a rewritten or replaced file is
    caught without reading gigabytes. Full (`prepare.py --check`): every token file by sha256, and
    each source file still present by sha256 (an edited source means stale tokens)."""
    if not os.path.exists(MANIFEST):
        raise PrepareError(f"no prepared data at {CACHE_DIR}: run `{PREPARE_CMD}`")
    try:
        with open(MANIFEST) as f:
            m = json.load(f)
        if tokenizer_fingerprint() != m["tokenizer_sha256"]:
            raise PrepareError(rebuild_hint(f"the tokenizer in {TOKENIZER_DIR} does not match manifest.json"))
        if not training and val_fingerprint() != m["val_sha256"]:
            raise PrepareError(f"the validation tokens in {TOKENS_DIR} do not match manifest.json: run `{PREPARE_CMD}`")
        if not training and val_fingerprint("heldout") != m.get("heldout_sha256"):
            raise PrepareError(f"the held-out tokens in {TOKENS_DIR} do not match manifest.json (or it has none): "
                               f"run `{PREPARE_CMD}`")
        if "token_files" not in m:
            raise PrepareError(f"manifest.json was written by an older prepare.py: run `{PREPARE_CMD}` to verify and update it")
        recorded = m["token_files"]
        if training:
            recorded = {k: v for k, v in recorded.items() if k.startswith("train_")}
        present = {os.path.basename(p) for split in (("train",) if training else SPLITS) for p in split_files(split)}
        if present != set(recorded):
            odd = sorted(present ^ set(recorded))
            raise PrepareError(f"token files in {TOKENS_DIR} missing or not made by prepare.py ({', '.join(odd[:3])}"
                               f"{', ...' if len(odd) > 3 else ''}): run `{PREPARE_CMD}`")
        if not split_files("train"):
            raise PrepareError(f"no training tokens in {TOKENS_DIR}: run `{PREPARE_CMD}`")
        for name, rec in sorted(recorded.items()):
            path = os.path.join(TOKENS_DIR, name)
            st = os.stat(path)
            if st.st_size != rec["bytes"]:
                raise PrepareError(f"{path} has {st.st_size:,} bytes, manifest.json records {rec['bytes']:,}: run `{PREPARE_CMD}`")
            if full and sha256_file(path) != rec["sha256"]:
                raise PrepareError(f"{path} does not match its sha256 in manifest.json: run `{PREPARE_CMD}` to rebuild it")
            if not full and st.st_mtime_ns != rec["mtime_ns"]:  # not the inode: a cache copied with its times is fine
                raise PrepareError(f"{path} was written after it was prepared (its mtime differs from manifest.json): "
                                   f"run `{PREPARE_CMD}` to verify it")
        if full:
            for f in m["files"]:
                if os.path.exists(f["source"]) and sha256_file(f["source"]) != f["source_sha256"]:
                    raise PrepareError(f"{f['source']} changed after it was tokenized: run `{PREPARE_CMD}` to tokenize it again")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PrepareError(f"prepared data at {CACHE_DIR} is incomplete ({e}): run `{PREPARE_CMD}`") from e
    return m

# ---------------------------------------------------------------------------
# The run record: what the harness itself saw, for run.sh
# ---------------------------------------------------------------------------
# Under run.sh, training batches come from another process: run.sh starts `prepare.py
# --serve-batches` outside the training sandbox and hands train.py's process the two ends of a
# pipe (AUTORESEARCH_BATCH_FDS). The sandbox shows training no token file at all, so these
# batches are the only data it can train on, and the server's clock of when it served them
# bounds the budget (check_training; the rule is stated at WARMUP_TOKENS above). WARMUP_TOKENS is
# the 32nd batch of the default train.py. The figures behind the allowances: an H100 spent 81 s
# from the launch to its first counted step on a cold compile, 63 s of it compiling, which
# happens after the first batch (train.py takes one before its loop); a smoke run on a busy
# 2-core machine up to ~20 s in all.
# The run record (AUTORESEARCH_RECORD_FD) gets evaluate_bpb's hand-over: when, the export time,
# the peak memory. It is written in train.py's process, so it only describes the run.

_record_fd = None
if os.environ.get("AUTORESEARCH_RECORD_FD", "").isdigit():
    _record_fd = int(os.environ.pop("AUTORESEARCH_RECORD_FD"))
    try:
        os.set_inheritable(_record_fd, False)  # not for train.py's subprocesses
    except OSError:
        _record_fd = None
_batch_fds = None
if re.fullmatch(r"\d+,\d+", os.environ.get("AUTORESEARCH_BATCH_FDS", "")):
    _batch_fds = tuple(int(fd) for fd in os.environ.pop("AUTORESEARCH_BATCH_FDS").split(","))  # (read, write)
    for _fd in _batch_fds:
        os.set_inheritable(_fd, False)
_batch_lock = threading.Lock()  # one request and its answer at a time, whatever the number of loaders


def _record(kind, **fields):
    if _record_fd is not None:
        os.write(_record_fd, (json.dumps({"kind": kind, "time": time.time(), **fields}) + "\n").encode())


def _check_batch_shape(B, T):
    if not (isinstance(B, int) and isinstance(T, int) and 1 <= T <= MAX_SEQ_LEN and 1 <= B * T <= MAX_BATCH_TOKENS):
        raise PrepareError(f"a batch of {B} x {T} tokens: T must be 1..{MAX_SEQ_LEN} and B x T at most {MAX_BATCH_TOKENS:,}")


def _served_rows(B, T):
    """Endless (uint16 rows [B, T+1], epoch) from the batch server (run.sh)."""
    r, w = _batch_fds
    size = 8 + 2 * B * (T + 1)
    while True:
        with _batch_lock:
            os.write(w, f"{B} {T}\n".encode())
            data = bytearray()
            while len(data) < size:
                chunk = os.read(r, size - len(data))
                if not chunk:
                    raise PrepareError("the batch server closed the pipe (see run.log for its reason)")
                data += chunk
        yield np.frombuffer(data, dtype=np.uint16, offset=8).reshape(B, T + 1), int.from_bytes(data[:8], "little")


def serve_batches(requests, out):
    """The batch server: answers each request line "B T" with an 8-byte epoch and B packed rows of
    T+1 training tokens (uint16), and notes when. A `served:` line on stderr gives what it served
    so far, written at the first batch, when the clock starts and at the end, so that a server
    killed mid-run has already told when the clock started."""
    check_prepared(training=True)
    bos = Tokenizer.from_directory().get_bos_token_id()
    packers = {}
    served = {"batches": 0, "tokens": 0, "first": None, "clock": None, "last": None}
    report = lambda: print("served: " + json.dumps(served), file=sys.stderr, flush=True)  # noqa: E731
    try:
        while line := requests.readline(64):
            try:
                B, T = (int(v) for v in line.split())
            except ValueError:
                raise PrepareError(f"the batch server got {line[:80]!r}, not a request") from None
            _check_batch_shape(B, T)
            if (B, T) not in packers:  # each shape packs from the start of the split, as a local loader does
                if len(packers) == MAX_BATCH_SHAPES:
                    raise PrepareError(f"more than {MAX_BATCH_SHAPES} batch shapes asked for in one run")
                packers[B, T] = _packed("train", bos, B, T)
            rows, epoch = next(packers[B, T])
            now = time.time()
            served["batches"] += 1
            served["tokens"] += B * T
            served["last"] = now
            if served["first"] is None:
                served["first"] = now
                report()
            if served["clock"] is None and served["tokens"] >= WARMUP_TOKENS:
                served["clock"], served["clock_batch"] = now, served["batches"]
                report()
            out.write(epoch.to_bytes(8, "little") + rows.tobytes())
            out.flush()
    except BrokenPipeError:
        pass  # training exited without reading its last batch
    finally:
        report()


# ---------------------------------------------------------------------------
# Loader: best-fit packing of pre-tokenized documents, built in a background thread
# ---------------------------------------------------------------------------

def _documents(split, bos):
    """(number of documents, endless iterator of (tokens, start, length, epoch)) over the split's
    documents in file order. Documents are found by their BOS token, which encode_ordinary never
    produces inside text."""
    if split != "train" and _HANDOVER:
        raise PrepareError(f"the {split} split is not served while train.py trains: the evaluator alone reads it")
    files = split_files(split)
    if not files:
        raise PrepareError(f"no {split} tokens in {TOKENS_DIR}: run `{PREPARE_CMD}`")
    arrays = [np.memmap(p, dtype=np.uint16, mode="r") for p in files if os.path.getsize(p) > 0]
    if not arrays:
        raise PrepareError(f"the {split} split in {TOKENS_DIR} is empty: run `{PREPARE_CMD}`")
    starts = [np.flatnonzero(a == bos) for a in arrays]

    def endless():
        epoch = 1
        while True:
            for a, s in zip(arrays, starts):
                ends = np.append(s[1:], a.size)
                for start, end in zip(s.tolist(), ends.tolist()):
                    yield a, start, end - start, epoch
            epoch += 1

    return sum(len(s) for s in starts), endless()


def _pack_rows(docs, bos, B, T, buffer_size):
    """Endless (uint16 array [B, T+1], epoch). Every row starts with BOS and is filled with the
    largest buffered document that fits. When none fits, the oldest buffered document is cut to
    fill the row and its remainder goes to the back of the buffer behind a fresh BOS: no text is
    thrown away (the reference drops the tails of cut documents, which biases training and the
    metric towards the beginnings of documents), and no document waits in the buffer for ever."""
    cap = T + 1
    lens, items = [], []  # buffered documents sorted by length (BOS included); items: (seq, array, start, needs_bos)
    seq = 0  # arrival order
    epoch, waiting = 1, None  # waiting: the first document of the next epoch
    while True:
        rows = np.empty((B, cap), dtype=np.uint16)
        for r in range(B):
            pos = 0
            while pos < cap:
                while len(lens) < buffer_size:
                    doc = waiting or next(docs)
                    if doc[3] > epoch and lens:  # let this epoch drain first, so a small split
                        waiting = doc            # is read once per epoch, not partly twice
                        break
                    a, start, n, epoch = doc
                    waiting = None
                    j = bisect.bisect_right(lens, n)
                    lens.insert(j, n)
                    items.insert(j, (seq, a, start, False))
                    seq += 1
                room = cap - pos
                i = bisect.bisect_right(lens, room) - 1  # the largest document that fits
                cut = i < 0
                if cut:
                    i = min(range(len(items)), key=lambda k: items[k][0])  # none fits: the oldest
                n = lens.pop(i)
                _, a, start, needs_bos = items.pop(i)
                take = room if cut else n
                if needs_bos:  # a remainder: BOS first, then its text from `start`
                    rows[r, pos] = bos
                    rows[r, pos + 1:pos + take] = a[start:start + take - 1]
                    used = take - 1
                else:
                    rows[r, pos:pos + take] = a[start:start + take]
                    used = take
                if cut:
                    rest = n - take + 1
                    j = bisect.bisect_right(lens, rest)
                    lens.insert(j, rest)
                    items.insert(j, (seq, a, start + used, True))
                    seq += 1
                pos += take
        yield rows, epoch


def _packed(split, bos, B, T, buffer_size=LOADER_BUFFER):
    """Endless packed rows of a split (_pack_rows), from its start: what the local loader, the batch
    server and the evaluator all serve. A buffer larger than the split would hold several copies of
    each document."""
    ndocs, docs = _documents(split, bos)
    return _pack_rows(docs, bos, B, T, min(buffer_size, ndocs))


def _loader(tokenizer, B, T, split, buffer_size=LOADER_BUFFER, device=None, prefetch=3, rows=None):
    """Endless (inputs, targets, epoch) of a split. A background thread packs rows (or takes them
    from `rows`, the batch server's) into pinned buffers ahead of time; the copy to the GPU is
    asynchronous, so the GPU does not wait."""
    import torch
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if rows is None:
        rows = _packed(split, tokenizer.get_bos_token_id(), B, T, buffer_size)
    pin = device.type == "cuda"
    slots = [torch.empty((B, T + 1), dtype=torch.int64, pin_memory=pin) for _ in range(prefetch + 1)]
    free, ready = queue.Queue(), queue.Queue()  # at most len(slots) batches exist at once
    for s in slots:
        free.put((s, None))
    stop = threading.Event()

    def producer():
        try:
            for packed, epoch in rows:
                while True:  # wait for a free pinned buffer, or for the consumer to go away
                    try:
                        slot, copied = free.get(timeout=0.5)
                        break
                    except queue.Empty:
                        if stop.is_set():
                            return
                if copied is not None:
                    copied.synchronize()  # the last copy out of this buffer has finished
                slot.numpy()[:] = packed
                ready.put((slot, epoch))
        except BaseException as e:  # surfaced in the consumer
            ready.put((e, None))

    thread = threading.Thread(target=producer, daemon=True)
    thread.start()
    try:
        while True:
            slot, epoch = ready.get()
            if isinstance(slot, BaseException):
                raise slot
            batch = slot.to(device, non_blocking=pin)
            event = None
            if pin:
                event = torch.cuda.Event()
                event.record()
            else:
                batch = batch.clone()  # on the CPU .to() may alias the slot
            free.put((slot, event))
            yield batch[:, :-1].contiguous(), batch[:, 1:].contiguous(), epoch
    finally:
        stop.set()

# ---------------------------------------------------------------------------
# The evaluator's machinery: the hand-over, rebuilding and scoring it, the budget's clock
# ---------------------------------------------------------------------------
# The trained model crosses from train.py's process to the evaluator as data: the graph that
# torch.export traces from model(x) and the tensors it reads. The evaluator rebuilds the graph
# from allowed operations only (the aten operators listed here, FlexAttention, tuple indexing), so
# no code of train.py's runs where the score is computed, and the model it scores is a pure function
# of its input: nothing it saw before (no state) and nothing it reads (no files) can reach its logits.

HANDOVER_MAX_BYTES = 64 << 30   # weights and constants handed over: a bound for the evaluator's reads
CAUSAL_TOLERANCE = 1e-3         # logits at a position may not move more than this when later tokens change
CAUSAL_CHECK_SHARE = 0.25       # validation batches whose causality is checked too: +25% forward passes
# The operators the evaluator runs: an allow-list, because a deny-list over PyTorch's ~3,000 aten
# overloads cannot be reviewed, and three reviews each found one it missed that read memory past
# its inputs (on a GPU, freed memory can hold the very batch being scored). An operator runs if
# PyTorch tags it pointwise (each output element reads its inputs at its own index) or reduction
# (sum, mean, amax, var... over dimensions), or if _ALLOWED_OPS names it ("name": its overloads;
# "name.overload": that one), and the deny-list below lets it through as well (it refuses the
# pointwise rrelu, which draws random numbers, and add_, which writes in place). The names are what
# train.py and the edits research makes to it (GQA, norms, activations, rotary, mixtures of
# experts, convolutions, scans, masks, casts) export, on a CPU and, traced with fake CUDA tensors,
# on a GPU: the same names, for export keeps scaled_dot_product_attention and rms_norm whole on
# both (tests/test_prepare.py exports them). Refused by omission, among others: torch.Tag.core
# wholesale (it holds as_strided, empty_strided and rand); SDPA's GPU kernels, which export never
# writes and which return random-number state beside the output that no input computed; its CPU
# kernel, which export never writes either and which trusts the key's batch and head counts (a
# query of 3 heads read the heap past a key of 2); _reshape_alias, a view of any size and strides,
# unchecked. The indexing operators check each index against its dimension: on a CPU with
# TORCH_CHECK, in eager CUDA kernels with CUDA_KERNEL_ASSERT (kept in release builds), and in the
# Triton code Inductor compiles for a GPU with tl.device_assert, which Triton keeps because
# Inductor compiles with debug on while config.assert_indirect_indexing is True, its default
# (torch/_inductor/runtime/triton_heuristics.py); but not inside FlexAttention's kernel, whose
# score_mod and mask_mod get indices bounded in the graph instead (_bound_flex_attention). Kernels
# on the list that trust one operand's shape for another's get shapes that fit (_check_shapes).
_ALLOWED_TAGS = {"pointwise", "reduction"}
_ALLOWED_OPS = {
    # views, shapes and copies of the inputs
    "view", "_unsafe_view", "reshape", "expand", "permute", "transpose", "t", "unsqueeze", "squeeze", "slice",
    "select", "narrow", "split", "split_with_sizes", "chunk", "unbind", "flatten", "unflatten", "movedim", "unfold",
    "alias", "detach", "contiguous", "lift_fresh_copy", "view_as_real", "view_as_complex", "repeat",
    "repeat_interleave.self_int", "flip", "roll", "cat", "stack", "pad", "constant_pad_nd", "_to_copy", "type_as",
    "tril", "triu", "select_scatter", "slice_scatter", "fill", "copy",
    # new tensors from shapes and numbers
    "full", "zeros", "ones", "full_like", "zeros_like", "ones_like", "new_full", "new_zeros", "new_ones",
    "arange", "linspace", "scalar_tensor", "polar", "outer",
    # products and convolutions
    "linear", "matmul", "mm", "bmm", "addmm", "baddbmm", "einsum", "conv1d", "convolution",
    # norms, softmax, and activations and masks PyTorch does not tag pointwise
    "rms_norm", "_fused_rms_norm", "layer_norm", "native_layer_norm", "group_norm", "native_group_norm",
    "_native_batch_norm_legit_no_training", "softmax", "_softmax", "log_softmax",
    "_log_softmax", "leaky_relu", "hardswish", "glu", "log_sigmoid", "where", "masked_fill", "__and__", "__or__",
    # attention: SDPA whole (dropout 0, _check_arguments; key and value of one shape, _check_shapes)
    "scaled_dot_product_attention",
    # indexing, each index checked (above)
    "embedding", "index_select", "gather", "take_along_dim", "index.Tensor", "one_hot", "scatter", "scatter_add",
    "scatter_reduce", "index_add", "index_put",
    # scans and orderings
    "cumsum", "cumprod", "logcumsumexp", "cummax", "cummin", "topk", "sort", "argsort",
    # export's own check of the output's dtype and device
    "_assert_tensor_metadata",
}
# The tensor types the evaluator reads, in model.bin and in the graph's arguments: PyTorch's real,
# complex and 8-bit float types. Quantized, bit-packed and sub-byte types (qint8, bits8, float4_e2m1fn_x2,
# ...) have few kernels, less watched than these: some accept them (cat, clone) without knowing their size.
_DTYPES = {"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
           "float8_e5m2fnuz", "float8_e8m0fnu", "complex32", "complex64", "complex128", "int64", "int32", "int16",
           "int8", "uint8", "bool"}
# The deny-list, a second layer under the allow-list. aten operators with a string argument are
# refused unless the string is one of these harmless options, and a short word at that
# (_SAFE_STR): the others read files (from_file), print, or belong to TorchScript's string
# library, and a compiler may write a string into code.
_HARMLESS_STR_ARGS = {"approximate", "rounding_mode", "reduce", "padding_mode", "mode", "equation", "side",
                      "interpolation", "indexing", "reduction"}
_SAFE_STR = re.compile(r"[A-Za-z0-9_,.>-]{0,64}")
# ...and these by name: they see memory beyond their input's values (strides, storage, raw
# indexing, uninitialised memory), draw random numbers, or keep state: batch and instance norm
# write their running statistics in place though their schemas do not say so, and recurrent
# layers may too. Operators tagged nondeterministic_seeded or taking a Generator are refused too,
# but for attention, whose dropout_p must then be 0 (_check_arguments). Sparse, quantized and
# jagged tensors are refused whole: their constructors take index tensors that the kernels trust
# unchecked (a CSR column past the end read the heap beyond the inputs), and a forward pass has
# no use for backward kernels, which trust the indices their forward pass saved. _unsafe_view is
# view without export's alias bookkeeping (reshape of a transposed tensor): it checks its sizes.
_REFUSED_OPS = re.compile(r"as_strided|stride|storage|is_contiguous|is_non_overlapping|is_strides_like|unsafe(?!_view)|"
                          r"nested|empty|rand|dropout|bernoulli|normal|uniform|exponential|geometric|cauchy|"
                          r"multinomial|poisson|binomial|gamma|dirichlet|rrelu|set_|resize|data_ptr|"
                          r"batch_norm(?!_legit_no_training)|instance_norm|lstm|gru|rnn|"
                          r"sparse|coo|csr|csc|bsr|bsc|compressed|mkldnn|quantiz|int_repr|per_tensor|per_channel|"
                          r"jagged|cslt|int4pack|int8pack|backward")
# Arguments that tell a kernel where sequences start and end, trusted unchecked: varlen attention's.
_UNCHECKED_INDEX_ARGS = {"cu_seqlens_q", "cu_seqlens_k", "cum_seq_q", "cum_seq_k", "seqused_k", "seqlen_k"}
_FLEX_OPTIONS = re.compile(r"[A-Z][A-Z0-9_]{0,40}")  # FlexAttention's kernel_options: names, and values
                                                     # other than numbers and flags (BACKEND: AUTO)
# ...of these names, the options torch.export writes and the tile sizes a user may choose. The
# others (IS_DIVISIBLE, SPARSE_KV_BLOCK_SIZE, QK_HEAD_DIM, GQA_SHARED_HEADS...) tell the compiled
# kernel facts about its inputs that it trusts unchecked, and so does BLOCKS_ARE_CONTIGUOUS=True.
_FLEX_OPTION_NAMES = {"BACKEND", "PRESCALE_QK", "ROWS_GUARANTEED_SAFE", "BLOCKS_ARE_CONTIGUOUS", "WRITE_DQ",
                      "OUTPUT_LOGSUMEXP", "OUTPUT_MAX", "FORCE_USE_FLEX_ATTENTION", "USE_TMA",
                      "BLOCK_M", "BLOCK_N", "BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2"}
_HANDOVER = os.environ.pop("AUTORESEARCH_HANDOVER", "")  # run.sh: where the trained model goes


def handover(model, directory):
    """Export model(x) -> logits (under the autocast evaluate_bpb was called in) for EVAL_ROWS rows
    and write it to directory as model.json (the graph) and model.bin (the tensors)."""
    import torch
    t0 = time.time()
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: export the module itself
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    ep = _export(model, torch.zeros((EVAL_ROWS, MAX_SEQ_LEN), dtype=torch.long, device=device))
    tensors, inputs = [], []
    for spec in ep.graph_signature.input_specs:
        kind = spec.kind.name
        if kind == "USER_INPUT":
            inputs.append("x")
        elif kind in ("PARAMETER", "BUFFER", "CONSTANT_TENSOR"):
            t = ep.state_dict[spec.target] if spec.target in ep.state_dict else ep.constants[spec.target]
            inputs.append(len(tensors))
            tensors.append(t.detach())
        else:
            raise PrepareError(f"evaluate_bpb could not hand the model over: an input of kind {kind}")
    outputs = [spec.kind.name for spec in ep.graph_signature.output_specs]
    if outputs != ["USER_OUTPUT"]:
        raise PrepareError(f"evaluate_bpb could not hand the model over: model(x) must return the logits alone and "
                           f"change nothing (it also writes {', '.join(o for o in outputs if o != 'USER_OUTPUT')})")
    os.makedirs(directory, exist_ok=True)
    index, offset = [], 0
    with open(os.path.join(directory, "model.bin"), "wb") as f:
        for t in tensors:
            data = t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
            index.append({"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "offset": offset, "bytes": len(data)})
            f.write(data)
            offset += len(data)
    graph = {"inputs": inputs, "tensors": index, "rows": EVAL_ROWS, "seq_len": MAX_SEQ_LEN,
             "graph": _encode_graph(ep.graph_module)}
    write_atomic(os.path.join(directory, "model.json"), json.dumps(graph))
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else 0.0
    return {"tensors": len(tensors), "bytes": offset, "export_seconds": time.time() - t0, "peak_vram_mb": peak}


def _export(model, x):
    """torch.export's ATen graph of model(x), under the autocast its caller is in."""
    import torch
    amp = torch.is_autocast_enabled(x.device.type), torch.get_autocast_dtype(x.device.type)

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            with torch.autocast(x.device.type, dtype=amp[1], enabled=amp[0]):
                return self.model(x)

    try:
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.export's own deprecations
            return torch.export.export(Logits(), (x,), strict=False).run_decompositions({})
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise PrepareError(f"evaluate_bpb could not hand the model over: torch.export cannot trace model(x) "
                           f"({type(e).__name__}: {first}). The evaluator scores model(x) as a graph of PyTorch "
                           f"operations: keep the forward pass free of Python-side effects and data-dependent "
                           f"control flow, and give a custom kernel a PyTorch path for torch.compiler.is_exporting() "
                           f"(program.md, 'What evaluation needs')") from e


def _encode_graph(gm):
    """An FX graph as JSON: each node's operation, its target by name and its arguments."""
    import operator
    import torch
    names, nodes = {}, []

    def enc(a):
        if isinstance(a, torch.fx.Node):
            return {"node": names[a]}
        if a is None or isinstance(a, (bool, int, float, str)):
            return a
        if isinstance(a, list):
            return [enc(v) for v in a]
        if isinstance(a, tuple):
            return {"tuple": [enc(v) for v in a]}
        if isinstance(a, dict) and all(isinstance(k, str) for k in a):
            return {"dict": [[k, enc(v)] for k, v in a.items()]}
        for kind in (torch.dtype, torch.device, torch.layout, torch.memory_format):
            if isinstance(a, kind):
                return {kind.__name__: str(a).removeprefix("torch.")}
        raise PrepareError(f"evaluate_bpb could not hand the model over: an argument of type {type(a).__name__} "
                           f"in its graph")

    for node in gm.graph.nodes:
        names[node] = len(nodes)
        entry = {"op": node.op}
        if node.op == "call_function":
            t = node.target
            if t is operator.getitem:
                entry["target"] = "getitem"
            elif isinstance(t, torch._ops.OpOverload):
                entry["target"] = f"{t.namespace}.{t._opname}.{t._overloadname}"
            elif isinstance(t, torch._ops.HigherOrderOperator):
                entry["target"] = f"higher_order.{t.name()}"
            else:
                entry["target"] = getattr(t, "__name__", repr(t))  # refused by the evaluator, which names it
            entry["args"], entry["kwargs"] = enc(list(node.args)), enc(dict(node.kwargs))
        elif node.op == "get_attr":
            sub = getattr(gm, node.target)
            if not isinstance(sub, torch.fx.GraphModule):
                raise PrepareError(f"evaluate_bpb could not hand the model over: a {type(sub).__name__} attribute in its graph")
            entry["graph"] = _encode_graph(sub)
        elif node.op == "output":
            entry["args"] = enc(list(node.args))
        elif node.op != "placeholder":
            raise PrepareError(f"evaluate_bpb could not hand the model over: a graph node of kind {node.op}")
        nodes.append(entry)
    return nodes


def _allowed_op(name):
    """The operation a hand-over names, if the evaluator runs it."""
    import operator
    import torch
    refuse = f"the model uses {name}, which the evaluator does not run"
    if name == "getitem":
        return operator.getitem
    if name == "higher_order.flex_attention":
        return torch.ops.higher_order.flex_attention
    parts = name.split(".")
    if len(parts) != 3 or parts[0] != "aten" or not all(re.fullmatch(r"[A-Za-z0-9_]+", p) for p in parts[1:]):
        raise PrepareError(refuse + " (only PyTorch's aten operators and FlexAttention)")
    try:
        op = getattr(getattr(torch.ops.aten, parts[1]), parts[2])
    except (AttributeError, RuntimeError):
        raise PrepareError(refuse + " (no such operator in this PyTorch)") from None
    if not isinstance(op, torch._ops.OpOverload):
        raise PrepareError(refuse)
    if op._schema.is_mutable:
        raise PrepareError(refuse + " (it changes its inputs in place: a model that keeps state between calls)")
    names = {a.name for a in op._schema.arguments}
    seeded = torch.Tag.nondeterministic_seeded in op.tags and "dropout_p" not in names  # attention: dropout_p 0
    if _REFUSED_OPS.search(parts[1]) or seeded or any("Generator" in str(a.type) for a in op._schema.arguments):
        raise PrepareError(refuse + " (it reads memory other than its inputs' values, draws random numbers "
                                    "or keeps state between calls)")
    if any("str" in str(a.type) and a.name not in _HARMLESS_STR_ARGS for a in op._schema.arguments):
        raise PrepareError(refuse + " (it takes a string: a file name, text to print, a message)")
    if not ({parts[1], f"{parts[1]}.{parts[2]}"} & _ALLOWED_OPS or {t.name for t in op.tags} & _ALLOWED_TAGS):
        raise PrepareError(f"the model uses {name}, which is not on the evaluator's list of operators (prepare.py, "
                           f"_ALLOWED_OPS): write the forward pass with other PyTorch operations")
    return op


def _check_operators(nodes):
    """Every operator the graph names, checked before any is decoded: a model that uses several
    the evaluator does not run is told of them all in one crash, not one per 5-minute run."""
    names, graphs = set(), [nodes]
    while graphs:
        for n in graphs.pop():
            if isinstance(n, dict) and n.get("op") == "call_function" and isinstance(n.get("target"), str):
                names.add(n["target"])
            elif isinstance(n, dict) and n.get("op") == "get_attr" and isinstance(n.get("graph"), list):
                graphs.append(n["graph"])
    refused = []
    for name in sorted(names):
        try:
            _allowed_op(name)
        except PrepareError as e:
            refused.append(str(e))
    if len(refused) > 1:
        raise PrepareError(f"the model uses {len(refused)} operators the evaluator does not run: " +
                           "; ".join(refused[:10]) + ("; ..." if len(refused) > 10 else ""))
    if refused:
        raise PrepareError(refused[0])


def _dtype(name, what):
    """The torch dtype NAME, if the evaluator reads it (_DTYPES)."""
    import torch
    if name not in _DTYPES:
        raise PrepareError(f"{what} of type {name!r}, which the evaluator does not read: "
                           f"use one of {', '.join(sorted(_DTYPES))}")
    return getattr(torch, name)


def _decode_graph(nodes, device):
    """The FX GraphModule for an encoded graph; every device argument becomes `device`."""
    import torch
    graph, root, env = torch.fx.Graph(), torch.nn.Module(), []
    kinds = {"dtype": torch.dtype, "layout": torch.layout, "memory_format": torch.memory_format}

    def dec(a):
        if isinstance(a, list):
            return [dec(v) for v in a]
        if not isinstance(a, dict):
            return a
        (key, v), = a.items()
        if key == "node":
            return env[v]
        if key == "tuple":
            return tuple(dec(x) for x in v)
        if key == "dict":
            return {k: dec(x) for k, x in v}
        if key == "device":
            return device
        if key == "dtype":
            return _dtype(v, "the graph asks for tensors")
        if key in kinds and isinstance(getattr(torch, v, None), kinds[key]) and (key != "layout" or v == "strided"):
            return getattr(torch, v)  # dense tensors only: a sparse layout brings index tensors kernels trust
        raise PrepareError(f"the hand-over holds an argument the evaluator does not read ({key})")

    for i, n in enumerate(nodes):
        if n["op"] == "placeholder":
            env.append(graph.placeholder(f"in{i}"))
        elif n["op"] == "get_attr":
            root.add_module(f"sub{i}", _decode_graph(n["graph"], device))
            env.append(graph.get_attr(f"sub{i}"))
        elif n["op"] == "call_function":
            op, args, kwargs = _allowed_op(n["target"]), tuple(dec(n["args"])), dec(n["kwargs"])
            _check_arguments(n["target"], op, args, kwargs)
            env.append(graph.call_function(op, args, kwargs))
        elif n["op"] == "output":
            env.append(graph.output(*dec(n["args"])))
        else:
            raise PrepareError(f"the hand-over holds a graph node of kind {n['op']!r}")
    return torch.fx.GraphModule(root, graph)


def _check_arguments(name, op, args, kwargs):
    """Arguments as the operator's schema takes them: keyword names it has (FX writes them as code),
    strings only where harmless and short, devices as devices; FlexAttention's options as flags."""
    import torch
    bad = PrepareError(f"the hand-over gives {name} arguments it does not take")
    if not isinstance(kwargs, dict):
        raise bad
    if not hasattr(op, "_schema"):  # getitem, FlexAttention
        if kwargs:
            raise bad
        if name == "higher_order.flex_attention":
            options = args[6] if len(args) > 6 else None
            if not isinstance(options, dict) or options.get("BLOCKS_ARE_CONTIGUOUS", False) is not False or not all(
                    k in _FLEX_OPTION_NAMES and (isinstance(v, (bool, int, float)) or
                                                 isinstance(v, str) and _FLEX_OPTIONS.fullmatch(v))
                    for k, v in options.items()):
                raise PrepareError("the hand-over gives FlexAttention options other than named flags and sizes")
        return
    schema = {a.name: a for a in op._schema.arguments}
    if any(k not in schema for k in kwargs) or len(args) > len(op._schema.arguments):
        raise bad
    bound = list(zip(op._schema.arguments, args)) + [(schema[k], v) for k, v in kwargs.items()]
    for arg, value in bound:
        kind = str(arg.type)
        if "str" in kind and value is not None and not (
                arg.name in _HARMLESS_STR_ARGS and isinstance(value, str) and _SAFE_STR.fullmatch(value)):
            raise PrepareError(f"the hand-over gives {name} the string {str(value)[:40]!r} for {arg.name}")
        if "Device" in kind and value is not None and not isinstance(value, torch.device):
            raise bad
        if isinstance(value, str) and "str" not in kind:
            raise bad
        if (arg.name in _UNCHECKED_INDEX_ARGS and value is not None) or (arg.name == "unsafe" and value is not False):
            raise PrepareError(f"the hand-over gives {name} {arg.name}: indices its kernel trusts unchecked, "
                               f"which can read memory beyond the inputs")
        if arg.name in ("dropout_p", "dropout", "train") and value not in (None, 0, 0.0, False):
            raise PrepareError(f"the hand-over asks {name} for {arg.name}={value}: the scored function draws "
                               f"no random numbers (no dropout at evaluation)")
    given = {arg.name: value for arg, value in bound}
    if op is torch.ops.aten.pad.default and given.get("mode", "constant") != "constant" and not all(
            type(p) is int and p >= 0 for p in given.get("pad") or []):
        raise PrepareError(f"the hand-over asks {name} for {given['mode']} padding with a negative side: its kernel "
                           f"leaves part of the output unwritten, memory that no input computed (pad with mode "
                           f"'constant' to crop)")


def load_handover(directory, device, compile_model):
    """(forward(x) -> logits for EVAL_ROWS rows, its size in bytes) from a hand-over directory."""
    import torch
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # the graph's device arguments name the device its
        device = torch.device("cuda", torch.cuda.current_device())  # tensors are on: cuda:0, not cuda
    try:
        meta = json.loads(_read_regular(os.path.join(directory, "model.json")))
        if (meta["rows"], meta["seq_len"]) != (EVAL_ROWS, MAX_SEQ_LEN):
            raise PrepareError(f"the model was handed over for {meta['rows']} x {meta['seq_len']} inputs, "
                               f"not {EVAL_ROWS} x {MAX_SEQ_LEN}")
        _check_operators(meta["graph"])
        gm = _decode_graph(meta["graph"], device)
        raw = np.frombuffer(_read_regular(os.path.join(directory, "model.bin")), dtype=np.uint8)
        size = raw.size
        if sum(t["bytes"] for t in meta["tensors"]) != size:
            raise PrepareError(f"model.bin holds {size:,} bytes, not what model.json describes")
        tensors = []
        for t in meta["tensors"]:
            data = torch.from_numpy(raw[t["offset"]:t["offset"] + t["bytes"]].copy())
            tensors.append(data.view(_dtype(t["dtype"], "a weight")).reshape(t["shape"]).to(device))
        args = [None if i == "x" else tensors[i] for i in meta["inputs"]]
        if args.count(None) != 1:
            raise PrepareError("the graph does not take exactly one input, the tokens")
    except PrepareError:
        raise
    except OSError as e:
        if not isinstance(e, FileNotFoundError):
            raise PrepareError(f"the hand-over in {directory} is not readable ({e.strerror}: a link, or no file)") from e
        raise PrepareError("train.py handed no model over: it must end with evaluate_bpb(model, tokenizer, "
                           "batch_size), and exit after it") from None
    except Exception as e:
        raise PrepareError(f"the hand-over in {directory} is not readable ({type(e).__name__}: {e})") from e
    at = args.index(None)
    example = args[:at] + [torch.zeros((EVAL_ROWS, MAX_SEQ_LEN), dtype=torch.long, device=device)] + args[at + 1:]
    values = _fake_values(gm, example)
    _check_shapes(gm, values)
    _bound_flex_attention(gm, values)
    run = gm
    if compile_model:  # Inductor straight from the graph: it is already ATen (Dynamo would re-trace it,
        # and cannot trace an exported flex_attention). Inside a tracing context with a shape
        # environment, as Dynamo would give it: without one Inductor bypasses its own caches
        # ("No shape env") and compiled the whole graph again for every run: 12 s more on an H200.
        from torch._guards import TracingContext, tracing
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import ShapeEnv
        fake = FakeTensorMode(shape_env=ShapeEnv())  # with static shapes, as the graph was checked
        with tracing(TracingContext(fake)):
            run = torch._inductor.compile(gm, [fake.from_tensor(t, static_shapes=True) for t in example])

    def forward(x):
        with torch.no_grad():
            out = run(*args[:at], x, *args[at + 1:])
        logits = out[0] if isinstance(out, (tuple, list)) and len(out) == 1 else out
        if not isinstance(logits, torch.Tensor) or logits.shape[:2] != x.shape or not logits.is_floating_point():
            raise PrepareError(f"model(x) must return float logits [{x.size(0)}, {x.size(1)}, vocab], "
                               f"not {type(logits).__name__} {tuple(getattr(logits, 'shape', ()))}")
        return logits
    return forward, size


def _fake_values(gm, args, mode=None):
    """{node: its value as a tensor without data}: the graph run on its inputs' shapes through
    PyTorch's shape checks, with nothing computed. A graph they refuse is refused. mode: the
    FakeTensorMode of args that are tensors without data already."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    values = {}

    class Shapes(torch.fx.Interpreter):
        def run_node(self, n):
            values[n] = super().run_node(n)
            return values[n]
    mode = mode or FakeTensorMode(allow_non_fake_inputs=True)
    try:
        with torch.no_grad(), mode:
            Shapes(gm).run(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) and getattr(a, "fake_mode", None)
                             is not mode else a for a in args])
    except PrepareError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise PrepareError(f"the hand-over's graph does not run on inputs of its shape ({type(e).__name__}: {first})") from e
    return values


def _value_of(values):
    """a -> the tensor without data that `values` (_fake_values) holds for a graph node; None for others."""
    import torch
    return lambda a: values.get(a) if isinstance(a, torch.fx.Node) else None


def _named_args(n):
    """A node's arguments by the names its operator's schema gives them."""
    return {**dict(zip((a.name for a in n.target._schema.arguments), n.args)), **n.kwargs}


def _check_shapes(gm, values):
    """Operands that fit each other where a kernel takes one's shape for another's. Found reading
    memory that is neither the inputs nor the weights: batch norm's CPU kernel, given statistics
    shorter than the channels, read past them; SDPA's CPU kernel, given a key shorter than its value,
    read past the key (the heap: other logits each call)."""
    import torch
    aten, _val = torch.ops.aten, _value_of(values)
    for n in gm.graph.nodes:
        if n.target is aten._native_batch_norm_legit_no_training.default:
            a = _named_args(n)
            x = _val(a["input"])
            channels = (x.shape[1],) if x is not None and x.dim() >= 2 else None
            for name in ("weight", "bias", "running_mean", "running_var"):
                if a.get(name) is not None and (channels is None or _val(a[name]) is None
                                                or tuple(_val(a[name]).shape) != channels):
                    raise PrepareError(f"the hand-over gives batch norm a {name} that does not fit its input's "
                                       f"channels: its kernel reads past it")
        elif n.target is aten._fused_rms_norm.default:  # the kernel rms_norm becomes (export keeps rms_norm)
            a = _named_args(n)
            x, w, shape = _val(a["input"]), _val(a.get("weight")), list(a["normalized_shape"])
            if x is None or list(x.shape[x.dim() - len(shape):]) != shape or (
                    a.get("weight") is not None and (w is None or list(w.shape) != shape)):
                raise PrepareError("the hand-over gives _fused_rms_norm a weight or input that does not fit its "
                                   "normalized shape")
        elif n.target is aten.scaled_dot_product_attention.default:
            a = _named_args(n)
            q, k, v = (_val(a.get(name)) for name in ("query", "key", "value"))
            if q is None or k is None or v is None or not q.dim() == k.dim() == v.dim() \
                    or k.shape[:-1] != v.shape[:-1] or q.shape[-1] != k.shape[-1]:
                raise PrepareError("the hand-over gives scaled_dot_product_attention a key and value of other "
                                   "batches, heads or lengths, or a query and key of other widths: its kernel "
                                   "reads past the key")


# What FlexAttention's score_mod and mask_mod may use: elementwise operations (PyTorch's tag
# pointwise), these, and views, all inlined into its compiled kernel; and tensor[index]
# (aten.index.Tensor), whose indices _bound_flex_attention bounds. Gathers and the rest are not.
_FLEX_MOD_OPS = {"index.Tensor", "_to_copy", "where", "masked_fill", "__and__", "__or__", "full", "scalar_tensor",
                 "full_like", "zeros_like", "ones_like", "view", "reshape", "_unsafe_view", "unsqueeze", "squeeze",
                 "expand", "select", "slice", "permute", "transpose", "t", "alias", "detach", "clone",
                 "lift_fresh_copy"}


def _bound_flex_attention(gm, values):
    """FlexAttention's compiled kernel (Inductor's, on a GPU) trusts what it is given; its eager form
    (the CPU evaluator's) checks, and ignores the block lists, applying mask_mod everywhere. So:
    - query, key and value must fit each other: the kernel takes the batch and length from the key
      and the heads from the value, and reads both with them (flex_attention.py.jinja: a value of
      batch 1 beside a key of 8 is read 7 batches past its end);
    - each block mask must fit its query and key, and its block counts and indices are clamped in the
      graph to the blocks there are (block 5000 of a 2-block key read past the key): a true mask is
      unchanged, a forged one reads nothing but its key;
    - score_mod and mask_mod are inlined into the kernel, where a load at a computed index has no
      bounds check and no wrap of a negative index (pytorch/pytorch#150321): they may use the
      operations _FLEX_MOD_OPS allows only, and each index they use is wrapped into its dimension
      in the graph (a true one is unchanged);
    - the logsumexp and row maxima it returns beside the attention are uninitialised memory unless
      the options OUTPUT_LOGSUMEXP and OUTPUT_MAX ask for them: a graph that reads them asks."""
    import operator
    import torch
    _val = _value_of(values)
    calls = [n for n in gm.graph.nodes if n.target is torch.ops.higher_order.flex_attention]
    for call in calls:
        if len(call.args) != 9:
            raise PrepareError("the hand-over's FlexAttention call does not take the arguments FlexAttention takes")
        q, k, v = (_val(a) for a in call.args[:3])
        if not all(isinstance(t, torch.Tensor) and t.dim() == 4 and 0 not in t.shape for t in (q, k, v)) \
                or k.shape[:3] != v.shape[:3] or q.shape[3] != k.shape[3] or k.shape[0] not in (1, q.shape[0]) \
                or q.shape[1] % k.shape[1]:
            raise PrepareError("the hand-over's FlexAttention query, key and value do not fit: key and value of one "
                               "batch, heads and length, query and key of one width, the query's heads a multiple "
                               "of the key's")
        mask = list(call.args[4])
        bad = PrepareError("the hand-over's FlexAttention block mask does not fit its query and key")
        if len(mask) != 13:
            raise bad
        q_len, kv_len, q_bs, kv_bs = q.shape[-2], k.shape[-2], mask[10], mask[11]
        if mask[:2] != [q_len, kv_len] or not all(type(b) is int and b > 0 for b in (q_bs, kv_bs)) \
                or q_len % q_bs or kv_len % kv_bs:
            raise bad
        n_q, n_kv, lead = q_len // q_bs, kv_len // kv_bs, None
        # (count, indices) pairs: the key blocks of each query block (partial, full), then the reverse
        for i, blocks, rows in ((2, n_kv, n_q), (4, n_kv, n_q), (6, n_q, n_kv), (8, n_q, n_kv)):
            if mask[i] is None and mask[i + 1] is None and i in (4, 8):
                continue  # no full blocks
            num, idx = _val(mask[i]), _val(mask[i + 1])
            if num is None or idx is None or num.dtype != torch.int32 or idx.dtype != torch.int32 \
                    or len(num.shape) != 3 or len(idx.shape) != 4 or num.shape != idx.shape[:3] \
                    or num.shape[2] < rows or idx.shape[3] < 1 or (lead or num.shape[:2]) != num.shape[:2]:
                raise bad
            lead = num.shape[:2]
            with gm.graph.inserting_before(call):
                mask[i] = gm.graph.call_function(torch.ops.aten.clamp.default, (mask[i], 0, min(blocks, idx.shape[3])))
                mask[i + 1] = gm.graph.call_function(torch.ops.aten.clamp.default, (mask[i + 1], 0, blocks - 1))
        scalar = [q.new_zeros((), dtype=torch.float32)] + [q.new_zeros((), dtype=torch.int32)] * 4
        _bound_flex_mod(gm, call.args[3], scalar, call.args[7], _val)  # score_mod(score, b, h, q_idx, kv_idx, *buffers)
        _bound_flex_mod(gm, mask[12], scalar[1:], call.args[8], _val)  # mask_mod(b, h, q_idx, kv_idx, *buffers)
        options = dict(call.args[6])
        for use in call.users:
            i = use.args[1] if use.target is operator.getitem and len(use.args) == 2 and not use.kwargs else None
            if i != 0:
                options["OUTPUT_LOGSUMEXP"] = options.get("OUTPUT_LOGSUMEXP") is True or i != 2
                options["OUTPUT_MAX"] = options.get("OUTPUT_MAX") is True or i != 1
        call.args = (*call.args[:4], tuple(mask), call.args[5], options, *call.args[7:])
    gm.recompile()


def _bound_flex_mod(gm, node, scalars, buffers, value_of):
    """A FlexAttention score_mod or mask_mod (the subgraph `node` names) checked, and each index it
    uses wrapped into its dimension (see _bound_flex_attention). scalars, buffers: its arguments,
    as tensors without data and as graph nodes; value_of: a node's tensor without data."""
    import torch
    mod = getattr(gm, node.target) if isinstance(node, torch.fx.Node) and node.op == "get_attr" else None
    buffers = list(buffers) if isinstance(buffers, (list, tuple)) else None
    if mod is None or buffers is None or len([n for n in mod.graph.nodes if n.op == "placeholder"]) != len(scalars) + len(buffers):
        raise PrepareError("the hand-over's FlexAttention score_mod or mask_mod is not a graph of its arguments")
    for n in mod.graph.nodes:
        op = n.target
        if n.op in ("placeholder", "output"):
            continue
        if n.op != "call_function" or not isinstance(op, torch._ops.OpOverload) or not (
                {op._opname, f"{op._opname}.{op._overloadname}"} & _FLEX_MOD_OPS or torch.Tag.pointwise in op.tags):
            raise PrepareError(f"FlexAttention's score_mod and mask_mod may use elementwise operations, views and "
                               f"tensor[index] only, not {getattr(op, '__name__', op)}: its compiled kernel reads "
                               f"what they index unchecked")
    values = _fake_values(mod, scalars + [value_of(b) if isinstance(b, torch.fx.Node) else b for b in buffers],
                          scalars[0].fake_mode)
    _val = _value_of(values)
    for n in list(mod.graph.nodes):
        if n.target is torch.ops.aten.index.Tensor:
            a = _named_args(n)
            src, indices = a["self"], list(a["indices"])
            for d, i in enumerate(indices):
                if i is None:
                    continue
                t, size = _val(i), _val(src).shape[d]
                if t is None or t.dtype not in (torch.int32, torch.int64) or size == 0:
                    raise PrepareError("the hand-over's FlexAttention score_mod or mask_mod indexes with other than "
                                       "integers")
                with mod.graph.inserting_before(n):
                    indices[d] = mod.graph.call_function(torch.ops.aten.remainder.Scalar, (i, size))
            n.args, n.kwargs = (src, indices), {}
    mod.recompile()


def _read_regular(path):
    """The bytes of a file train.py wrote: a regular file itself, never what a link points to."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > HANDOVER_MAX_BYTES:
            raise PrepareError(f"{os.path.basename(path)} in the hand-over is not a regular file of at most "
                               f"{HANDOVER_MAX_BYTES:,} bytes")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def _inputs(rows, device):
    """The model's input for rows of T+1 tokens: a new contiguous tensor of the T inputs alone, so
    no view of it reaches the targets (a strided read of x would find them in a shared storage)."""
    import torch
    return torch.from_numpy(np.ascontiguousarray(rows[:, :-1], dtype=np.int64)).to(device)


def check_causal(forward, rows, vocab_size, logits=None, rng=None):
    """A language model's logits at position t may depend on tokens 0..t of its own row only. Each row
    of a batch gets a random position j; the tokens from j on are replaced by random ones, and the
    logits before j must not move (a look-ahead, a mask dropped, or one row reading another).
    logits: the model's logits for the rows as they are, when the scoring pass has them."""
    import random
    import torch
    rng = rng or random.SystemRandom()
    x = _inputs(rows, "cpu")
    n, T = x.shape
    cut = [rng.randrange(1, T) for _ in range(n)]

    # count numbers below high, from rng's bits in one call: one at a time took 40 ms a batch, and a
    # generator seeded from rng keeps 32 bits of the seed (guessable). The modulo's bias is < 2^-40.
    def draw(high, count):
        bits = np.frombuffer(rng.getrandbits(64 * count).to_bytes(8 * count, "little"), dtype=np.uint64)
        return torch.from_numpy((bits % high).astype(np.int64))
    changed = torch.where(torch.arange(T) >= torch.tensor(cut)[:, None], draw(vocab_size, n * T).view(n, T), x)
    at = (torch.arange(n), torch.tensor(cut))
    changed[at] = (x[at] + 1 + draw(vocab_size - 1, n)) % vocab_size  # differs at j for sure
    a = forward(x.to(_eval_device())) if logits is None else logits
    b = forward(changed.contiguous().to(_eval_device()))
    moves = torch.stack([(a[r, :j].float() - b[r, :j].float()).abs().max() for r, j in enumerate(cut)]).tolist()  # one wait
    for r, (j, moved) in enumerate(zip(cut, moves)):
        if not moved <= CAUSAL_TOLERANCE:
            raise PrepareError(f"the model looks ahead: its logits at positions before {j} in row {r} moved by {moved:.3g} "
                               f"when only tokens from position {j} on changed. Logits at position t may depend on "
                               f"tokens 0..t of their own row only (causal attention; no dropout left on at evaluation)")


def _eval_device():
    import torch
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _eval_rows(tokenizer, split="val"):
    """The uint16 rows [EVAL_ROWS, MAX_SEQ_LEN + 1] the evaluator scores, batch by batch: inputs
    row[:-1], targets row[1:]; the first EVAL_TOKENS (HELDOUT_TOKENS) of the split."""
    rows = _packed(split, tokenizer.get_bos_token_id(), EVAL_ROWS, MAX_SEQ_LEN)
    tokens = HELDOUT_TOKENS if split == "heldout" else EVAL_TOKENS
    for _ in range(max(1, tokens // (EVAL_ROWS * MAX_SEQ_LEN))):
        yield next(rows)[0]


def _score(forward, batches, token_bytes, check=0.0):
    """(bits per byte, tokens scored, checksum of the first batch's logits) of forward's logits over the
    batches. check: the share of batches, drawn at random, whose causality is checked as well (one
    more forward pass each): a look-ahead at a few positions only is then seen somewhere."""
    import random
    import torch
    import torch.nn.functional as F
    device = token_bytes.device
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    n, first, rng = 0, None, random.SystemRandom()
    for rows in batches:
        logits = forward(_inputs(rows, device))
        if first is None:
            first = logits.double().sum().item()
        if rng.random() < check:  # continuations from the tokenizer's vocabulary, not one the logits' shape says
            check_causal(forward, rows, token_bytes.numel(), logits, rng)
        y = torch.from_numpy(np.ascontiguousarray(rows[:, 1:], dtype=np.int64)).to(device).reshape(-1)
        nats = F.cross_entropy(logits.reshape(y.numel(), -1).float(), y, reduction="none")
        nbytes = token_bytes[y]
        total_nats += (nats * (nbytes > 0)).sum(dtype=torch.float64)
        total_bytes += nbytes.sum()
        n += y.numel()
    return (total_nats / (math.log(2) * total_bytes.double())).item(), n, first


def evaluate_handover(directory, heldout=True):
    """The evaluator: val_bpb (and the held-out score) of a handed-over model, with its timings."""
    set_compile_cache(EVALUATOR_CACHE_DIR)
    import torch
    t0 = time.time()
    check_prepared()
    tok = Tokenizer.from_directory()
    device = _eval_device()
    torch.set_float32_matmul_precision("high")
    forward, size = load_handover(directory, device, compile_model=device.type == "cuda")
    token_bytes = torch.from_numpy(tok.token_byte_lengths()).to(device)
    first = next(_eval_rows(tok, "val"))
    before = forward(_inputs(first, device))  # compiles, on a GPU
    check_causal(forward, first, tok.get_vocab_size(), before)
    before = before.double().sum().item()
    t1 = time.time()
    val, tokens, again = _score(forward, _eval_rows(tok, "val"), token_bytes, CAUSAL_CHECK_SHARE)
    if not math.isclose(again, before, rel_tol=1e-7, abs_tol=1.0):  # the same batch: the same logits
        raise PrepareError("the model gave other logits for the same batch on a later call: it keeps state "
                           "between calls, or its forward pass is not deterministic")
    if not math.isfinite(val):
        raise PrepareError(f"val_bpb is {val}")
    result = {"val_bpb": f"{val:.6f}", "eval_tokens": tokens, "handover_mib": f"{size / 2**20:.1f}",
              "evaluator_seconds": f"{t1 - t0:.1f}", "eval_seconds": f"{time.time() - t1:.1f}"}
    if heldout:
        t2 = time.time()
        held, _, _ = _score(forward, _eval_rows(tok, "heldout"), token_bytes)
        result.update(heldout_bpb=f"{held:.6f}", heldout_seconds=f"{time.time() - t2:.1f}")
    if device.type == "cuda":
        result["eval_peak_vram_mb"] = f"{torch.cuda.max_memory_allocated() / 2**20:.1f}"
    return result


def check_training(served_text, record, launched, exited):
    """The training run's figures and its budget, by clocks train.py does not hold: run.sh's
    (launched, exited) and the batch server's (served_text: its `served:` line). The budget's clock
    starts once WARMUP_TOKENS are served, or WARMUP_ALLOWANCE seconds after the first batch
    (which counts as served STARTUP_ALLOWANCE seconds after the launch at the latest), whichever
    comes first, and runs until train.py exits. The record (train.py's process) adds the hand-over's
    time and the peak memory, for the report alone."""
    lines = [line for line in served_text.splitlines() if line.startswith("served: ")]
    served = json.loads(lines[-1][len("served: "):]) if lines else {}
    if not isinstance(served, dict):
        served = {}
    number = lambda v: float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None  # noqa: E731
    first, clock = number(served.get("first")), number(served.get("clock"))
    first_by = min(first, launched + STARTUP_ALLOWANCE) if first else launched + STARTUP_ALLOWANCE
    start = min(clock, first_by + WARMUP_ALLOWANCE) if clock else first_by + WARMUP_ALLOWANCE
    start = min(start, exited)
    seconds = exited - start
    allowed = TIME_BUDGET * TRAIN_SLACK[0] + TRAIN_SLACK[1]
    if clock and clock == start:
        since = f"from training batch {served.get('clock_batch')}"
    elif first and first <= launched + STARTUP_ALLOWANCE:
        since = f"from {WARMUP_ALLOWANCE}s after the first batch (WARMUP_ALLOWANCE)"
    else:
        since = f"from {STARTUP_ALLOWANCE + WARMUP_ALLOWANCE}s after the launch (STARTUP_ALLOWANCE + WARMUP_ALLOWANCE)"
    if seconds > allowed:
        raise PrepareError(f"training ran {seconds:.1f}s by the harness's clock ({since} until train.py exited); "
                           f"the budget is {TIME_BUDGET}s and at most {allowed:.0f}s is allowed")
    hand = {}
    for line in record.splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue  # a line cut short when training was killed
        if isinstance(e, dict) and e.get("kind") == "handover":
            hand = e
    handed = number(hand.get("time"))
    handed = min(max(handed, start), exited) if handed else exited
    mem = number(hand.get("peak_vram_mb"))
    return {"training_seconds": f"{seconds:.1f}", "training_tokens": int(served.get("tokens") or 0),
            "training_batches": int(served.get("batches") or 0), "time_budget": TIME_BUDGET,
            "clock_from": since.removeprefix("from "), "peak_vram_mb": f"{mem or 0.0:.1f}",
            "startup_seconds": f"{min(first or start, start) - launched:.1f}",  # imports, model, data checks
            "warmup_seconds": f"{start - min(first or start, start):.1f}",      # compilation, warm-up steps
            "handover_seconds": f"{exited - handed:.1f}"}                        # export, writing the model, exit



def doctor(box, gpu_busy=False):
    """./run.sh --doctor, inside its sandbox (box: train or eval): what an experiment needs of this
    machine, one line per item: ok, skip, warn or FAIL, its name, and what was found or what to do.
    Triton compiles into an empty cache, so that no earlier run's kernels hide a missing compiler."""
    import tempfile

    def item(status, name, text):
        print(f"{status:<4}  {name:<13} {text}", flush=True)

    scratch = tempfile.mkdtemp(prefix="doctor.")  # TMPDIR: the box's private /tmp
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(scratch, "inductor")
    os.environ["TRITON_CACHE_DIR"] = os.path.join(scratch, "triton")
    t0 = time.time()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch
            gpu = torch.cuda.is_available()
    except Exception as e:
        item("FAIL", "python", f"{sys.executable} cannot import torch ({type(e).__name__}: {e}): set AUTORESEARCH_PYTHON "
                               f"to a Python with PyTorch, or run `uv sync`")
        return
    n = torch.cuda.device_count() if gpu else 0
    why = ("this torch is built without CUDA" if torch.version.cuda is None else
           "/dev/nvidia-uvm is missing" if os.path.exists("/dev/nvidiactl") and not os.path.exists("/dev/nvidia-uvm") else
           next((str(w.message).strip().splitlines()[0] for w in caught if "CUDA" in str(w.message)), ""))
    no_gpu = "no GPU: only the smoke profile (AUTORESEARCH_SMOKE=1) will run" + (f" ({why})" if why else "")
    cache = EVALUATOR_CACHE_DIR if box == "eval" else COMPILE_CACHE_DIR
    try:
        with tempfile.NamedTemporaryFile(dir=cache):
            writable = ""
    except OSError as e:
        writable = f"its compile cache {cache} is not writable ({e.strerror})"
    if box == "eval":
        if writable or not (gpu or SMOKE):
            item("FAIL", "evaluator", writable or "its sandbox sees no GPU" + (f" ({why})" if why else ""))
        else:
            item("ok", "evaluator", f"its sandbox starts, sees {f'{n} GPU(s)' if gpu else 'no GPU (it scores on the CPU)'}; "
                                    f"its compile cache {cache} is writable")
        return
    item("ok", "python", f"Python {sys.version.split()[0]} ({sys.executable}), torch {torch.__version__}"
                         f"{f' for CUDA {torch.version.cuda}' if torch.version.cuda else ''}; imported in {time.time() - t0:.1f}s")
    if gpu:
        props = [torch.cuda.get_device_properties(i) for i in range(n)]
        item("ok", "gpu", f"{n} visible: " + ", ".join(f"{p.name} ({p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor})"
                                                      for p in props))
    else:
        item("skip" if SMOKE else "FAIL", "gpu", no_gpu)
    skip = "on the CPU" if not gpu else "while another run.sh holds the GPU (gpu lock)" if gpu_busy else ""
    if skip:
        item("skip", "compile", f"skipped {skip}" + (": train.py compiles only on a GPU" if not gpu else "")
             + (f"; {writable}" if writable else ""))
        item("skip", "matmul", f"skipped {skip}")
        return
    try:
        t = time.time()
        f = torch.compile(lambda x: torch.sin(x) * 2 + x.square(), dynamic=False)
        x = torch.randn(1 << 20, device="cuda")
        right = torch.allclose(f(x), torch.sin(x) * 2 + x.square(), atol=1e-5)
        seconds = time.time() - t
        kernels = len(glob.glob(os.path.join(scratch, "triton", "*", "*.cubin")))
        if not right or not kernels:
            item("FAIL", "compile", "torch.compile ran, but " + ("its result is wrong" if not right else "Triton compiled no kernel"))
        elif writable:
            item("FAIL", "compile", writable)
        else:
            item("ok", "compile", f"torch.compile built and ran a Triton kernel in {seconds:.1f}s (an empty cache); "
                                  f"{cache} is writable")
    except Exception as e:
        item("FAIL", "compile", f"torch.compile failed in the sandbox ({type(e).__name__}: "
                                f"{(str(e).strip().splitlines() or [''])[0][:300]}); Triton needs a C compiler (gcc, or CC) "
                                f"and Python.h where the sandbox sees them (/usr, /opt or the Python's prefix)")
    try:
        a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        c = torch.empty_like(a)
        for _ in range(3):
            torch.matmul(a, b, out=c)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            torch.matmul(a, b, out=c)
        end.record()
        torch.cuda.synchronize()
        tflops = 2 * 8192**3 * 10 / (start.elapsed_time(end) / 1e3) / 1e12
        item("ok", "matmul", f"bf16 8192x8192x8192: {tflops:.1f} TFLOP/s (mean of 10 after 3 warm-ups)")
    except Exception as e:
        item("FAIL", "matmul", f"a bf16 matrix product failed ({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]})")

# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

def prepare(args):
    if args.data:
        files, source_desc = expand_data_paths(args.data)
        sources = [(f, "hash") for f in files]
    elif SMOKE:
        files, source_desc = smoke_corpus(), "smoke: python stdlib"
        sources = [(f, "hash") for f in files]
    else:
        source_desc = "climbmix"
        sources = None
    old = None
    if os.path.exists(MANIFEST):
        with open(MANIFEST) as f:
            old = json.load(f)
        if old.get("source") != source_desc:
            raise PrepareError(f"{CACHE_DIR} holds data prepared from [{old.get('source')}]; keep corpora apart with "
                               f"AUTORESEARCH_CACHE=<another dir>, or delete {TOKENS_DIR}, {TOKENIZER_DIR} and {MANIFEST}")
    if sources is None:
        num = MAX_SHARD if args.num_shards == -1 else args.num_shards
        if num < 1:
            raise PrepareError("--num-shards must be at least 1 (or -1 for all)")
        files = download_climbmix(num, args.download_workers)
        modes = {shard_name(VAL_SHARD): "val", shard_name(HELDOUT_SHARD): "heldout"}
        sources = [(f, modes.get(os.path.basename(f), "train")) for f in files]
    else:
        ndocs = validate_sources(files)
        print(f"Data: {len(files)} files, {ndocs:,} documents ({source_desc})", flush=True)

    tok_path = os.path.join(TOKENIZER_DIR, "tokenizer.tiktoken")
    meta_path = os.path.join(TOKENIZER_DIR, "tokenizer.json")
    if os.path.exists(tok_path) and os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("trained_on") != source_desc:  # e.g. an interrupted run on another corpus
            raise PrepareError(f"the tokenizer in {TOKENIZER_DIR} was trained on [{meta.get('trained_on')}], not on this corpus; "
                               f"use AUTORESEARCH_CACHE=<another dir>, or delete {TOKENIZER_DIR}")
        # a tokenizer changed on disk is never re-blessed: the manifest (or, before there is one, the
        # tokenizer's own record of its ranks file) must still match it
        if old is not None and tokenizer_fingerprint() != old.get("tokenizer_sha256"):
            raise PrepareError(rebuild_hint(f"the tokenizer in {TOKENIZER_DIR} does not match manifest.json"))
        if meta.get("tiktoken_sha256", sha256_file(tok_path)) != sha256_file(tok_path):
            raise PrepareError(rebuild_hint(f"{tok_path} is not the file that was trained"))
        print(f"Tokenizer: already trained at {TOKENIZER_DIR}", flush=True)
    else:
        print(f"Tokenizer: training {VOCAB_SIZE}-token BPE on the training split...", flush=True)
        t0 = time.time()

        def train_texts():
            chars = 0
            for src, mode in sources:
                if mode != "train" and mode != "hash":
                    continue
                for text in iter_documents(src):
                    if mode == "hash" and document_split(text) != "train":
                        continue
                    text = text[:TOKENIZER_DOC_CAP]
                    chars += len(text)
                    status(f"  reading training text: {chars / 1e6:,.0f}M of at most {TOKENIZER_TRAIN_CHARS / 1e6:,.0f}M "
                           f"characters, {time.time() - t0:.0f}s")
                    yield text
                    if chars >= TOKENIZER_TRAIN_CHARS:
                        break
                if chars >= TOKENIZER_TRAIN_CHARS:
                    break
            log(f"  read {chars / 1e6:,.1f}M characters in {time.time() - t0:.0f}s; learning the merges...")

        save_tokenizer(train_tokenizer(train_texts()), source_desc)
        tok = Tokenizer.from_directory()
        sample = "Hello world! Numbers: 12345. Unicode: naïve 你好 🙂\n\tdef f(x): return x**2"
        assert tok.decode(tok.encode(sample)) == sample, "tokenizer round trip failed"
        if old is not None and tokenizer_fingerprint() != old.get("tokenizer_sha256"):
            raise PrepareError(rebuild_hint(f"the tokenizer was missing and training gave a different one than manifest.json records"))
        print(f"Tokenizer: trained in {time.time() - t0:.1f}s, saved to {TOKENIZER_DIR}", flush=True)

    t0 = time.time()
    status(f"Sources: hashing {len(sources)} files...")
    source_shas = hash_sources([src for src, _ in sources])
    log(f"  hashed {len(sources)} source files ({fmt_bytes(sum(os.path.getsize(src) for src, _ in sources))}) "
        f"in {time.time() - t0:.1f}s")
    tokenize_sources(sources, source_shas)
    m, written = write_manifest(source_desc, sources, source_shas)
    if old is not None and old.get("val_sha256") != m["val_sha256"]:
        print("Note: the validation tokens changed (a source changed): val_bpb is not comparable with earlier runs", flush=True)
    print(f"Done: {m['train_tokens'] / 1e6:.1f}M training and {m['val_tokens'] / 1e6:.1f}M validation, "
          f"{m['heldout_tokens'] / 1e6:.1f}M held-out tokens "
          f"in {CACHE_DIR}" + ("" if written else " (unchanged)") + ("  [SMOKE profile]" if SMOKE else ""), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description="Prepare data, tokenizer and token files for autoresearch.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog="""\
usage examples:
  uv run prepare.py                     # ClimbMix: 10 training shards + the pinned validation and held-out shards
  uv run prepare.py --num-shards 40     # more training data (-1 = all 6541 training shards)
  uv run prepare.py --data a.parquet b.jsonl c.txt dir/   # your own corpus instead (offline)
  uv run prepare.py --data saved_dir/   # a dataset saved with datasets' save_to_disk (offline)
  uv run prepare.py --data roneneldan/TinyStories  # a Hugging Face dataset by name (load_dataset)
  uv run prepare.py --check             # exit 0 if the prepared data matches manifest.json (reads every file)
  uv run prepare.py --check --quick     # the same by sizes and mtimes (tokenizer, validation, held-out: sha256)
  uv run prepare.py --quiet             # no progress lines (for logs)
  AUTORESEARCH_SMOKE=1 uv run prepare.py  # tiny CPU profile built from Python's own sources
run.sh alone uses --serve-batches, --evaluate and --doctor.

Everything is stored under ~/.cache/autoresearch (or $AUTORESEARCH_CACHE; smoke/ below it for the smoke profile):
  data/       downloaded ClimbMix parquet shards
  tokenizer/  tokenizer.tiktoken (base64 token + rank per line) and tokenizer.json
  tokens/     train_*.bin, val_*.bin and heldout_*.bin: uint16 token ids, each document preceded by BOS,
              with a .json sidecar per source recording its sha256, token counts and sha256s
  manifest.json  the corpus; the sha256 of the tokenizer, of every source and of every token
              file, with each token file's size and mtime
  compile/    train.py's compile cache; evaluator/ the evaluator's
  handover/   models handed over by evaluate_bpb run by hand (removed once scored)
Nothing is pickled: every file is plain data that cannot execute code when read.""")
    parser.add_argument("--num-shards", type=int, default=10, help="ClimbMix training shards (-1 = all); the validation and held-out shards are always added")
    parser.add_argument("--download-workers", type=int, default=8, help="parallel downloads")
    parser.add_argument("--data", nargs="+", metavar="PATH", help="instead of ClimbMix: .parquet/.jsonl/.txt files or directories, "
                        "a directory saved with datasets' save_to_disk, or a Hugging Face dataset name (owner/name)")
    parser.add_argument("--check", action="store_true", help="only check the prepared data: every token file by sha256")
    parser.add_argument("--quick", action="store_true", help="with --check: token files by size and mtime "
                        "(the tokenizer, validation and held-out tokens still by sha256); what run.sh uses")
    parser.add_argument("--quiet", action="store_true", help="no progress lines, only each stage's summary and errors")
    parser.add_argument("--evaluate", metavar="DIR", help="(run.sh, evaluate_bpb) score the model handed over in DIR")
    parser.add_argument("--no-heldout", action="store_true", help="(with --evaluate) the validation split only")
    parser.add_argument("--launched", type=float, help="(with --evaluate) when training was started, epoch seconds; "
                        "the run record comes on stdin")
    parser.add_argument("--exited", type=float, help="(with --evaluate) when training ended, epoch seconds")
    parser.add_argument("--served", metavar="FILE", help="(with --evaluate) the batch server's report")
    parser.add_argument("--serve-batches", action="store_true", help="(run.sh) serve training batches on stdin/stdout")
    parser.add_argument("--doctor", choices=["train", "eval"], help="(./run.sh --doctor) check this machine in that sandbox")
    parser.add_argument("--gpu-busy", action="store_true", help="(with --doctor) another run.sh holds the GPU: leave it alone")
    args = parser.parse_args()
    QUIET = args.quiet
    try:
        if args.quick and not args.check:
            raise PrepareError("--quick goes with --check")
        if args.doctor:
            doctor(args.doctor, gpu_busy=args.gpu_busy)
        elif args.check:
            m = check_prepared(full=not args.quick)
            print(f"ok: {CACHE_DIR} ({m['source']}; {m['train_tokens'] / 1e6:.1f}M train, {m['val_tokens'] / 1e6:.1f}M val, "
                  f"{m['heldout_tokens'] / 1e6:.2f}M held-out tokens; "
                  f"{'quick' if args.quick else 'every file by sha256'})")
            print(f"time_budget: {TIME_BUDGET}")
            print(f"training_limit: {TRAINING_LIMIT:.0f}")
            for f in m["files"]:  # those here: run.sh refuses one that training's sandbox would show
                if isinstance(f.get("source"), str) and os.path.isfile(f["source"]):
                    print(f"source: {f['source']}")
        elif args.evaluate:
            try:
                if args.launched is not None:
                    with open(args.served or os.devnull, errors="replace") as f:
                        served = f.read()
                    for k, v in check_training(served, sys.stdin.read(), args.launched, args.exited).items():
                        print(f"{k}: {v}", flush=True)
                result = evaluate_handover(args.evaluate, heldout=not args.no_heldout)
            except PrepareError as e:
                print(f"reason: {e}")
                sys.exit(1)
            except Exception as e:  # the handed-over graph failed to compile or run: the model's fault
                print(f"reason: the evaluator could not run the handed-over model "
                      f"({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]})")
                sys.exit(1)
            for k, v in result.items():
                print(f"{k}: {v}")
        elif args.serve_batches:
            serve_batches(sys.stdin.buffer, sys.stdout.buffer)
        else:
            print(f"Cache directory: {CACHE_DIR}" + ("  [SMOKE profile]" if SMOKE else ""), flush=True)
            prepare(args)
    except PrepareError as e:
        done_status()
        print(f"prepare.py: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        done_status()
        print("prepare.py: interrupted; finished files are kept and a rerun resumes", file=sys.stderr)
        sys.exit(130)
