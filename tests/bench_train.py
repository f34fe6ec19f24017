"""GPU benchmark (not a test): the default train.py end to end, and the attention kernels it
could use, at the default shapes. Prints markdown tables to paste into a note.

    uv run tests/bench_train.py                  # attention micro-benchmark + one full train.py run
    uv run tests/bench_train.py --runs 2         # a second run shows the start-up with warm compile caches
    uv run tests/bench_train.py --no-train       # attention only (about a minute)
    uv run tests/bench_train.py --make-corpus /usr/lib/python3 /tmp/corpus   # an offline corpus for
                                                 # `prepare.py --data /tmp/corpus` where ClimbMix can't be had

The full run needs prepared data (uv run prepare.py). Times are wall-clock on this machine.
"""

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_corpus(src_dir, out_dir, max_mb=1000, docs_per_file=4000):
    """Source and documentation files under src_dir as jsonl documents, one per file."""
    os.makedirs(out_dir, exist_ok=True)
    paths = sorted(p for p in glob.glob(os.path.join(src_dir, "**", "*"), recursive=True)
                   if p.endswith((".py", ".pyi", ".md", ".rst", ".txt", ".c", ".h", ".cpp", ".cu")) and os.path.isfile(p))
    size = n = 0
    out = None
    for p in paths:
        try:
            with open(p, encoding="utf-8") as f:
                text = f.read()
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        if n % docs_per_file == 0:
            out = open(os.path.join(out_dir, f"part{n // docs_per_file:04d}.jsonl"), "w")
        out.write(json.dumps({"text": text}) + "\n")
        n += 1
        size += len(text)
        if size > max_mb * 1e6:
            break
    print(f"corpus: {n} documents, {size / 1e6:.0f} MB of text in {out_dir}")


def attention_bench(iters=20):
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, H, T, D = 128, 4, 2048, 128
    flex = torch.compile(flex_attention, dynamic=False)

    def window_mask(w):
        def mod(b, h, q, k):
            return (k <= q) & (q - k <= w)  # train.py's window: the query and w keys before it
        return mod

    def candidates(w):
        bm = create_block_mask(window_mask(w), None, None, T, T, device="cuda")
        dense = torch.ones(T, T, dtype=torch.bool, device="cuda").tril() & ~torch.ones(T, T, dtype=torch.bool, device="cuda").tril(-w - 1)
        c = {"flex (block mask)": lambda q, k, v: flex(q, k, v, block_mask=bm)}
        if w >= T:
            for name, be in (("sdpa flash", SDPBackend.FLASH_ATTENTION), ("sdpa cudnn", SDPBackend.CUDNN_ATTENTION),
                             ("sdpa efficient", SDPBackend.EFFICIENT_ATTENTION)):
                c[f"{name} (is_causal)"] = (lambda be: lambda q, k, v: _forced(be, q, k, v, None))(be)
        else:
            for name, be in (("sdpa efficient", SDPBackend.EFFICIENT_ATTENTION), ("sdpa cudnn", SDPBackend.CUDNN_ATTENTION)):
                c[f"{name} (dense mask)"] = (lambda be: lambda q, k, v: _forced(be, q, k, v, dense))(be)
        return c

    def _forced(backend, q, k, v, mask):
        with sdpa_kernel([backend]):
            if mask is None:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def reference(q, k, v, w):
        q, k, v = q.float(), k.float(), v.float()
        s = q @ k.transpose(-1, -2) / D ** 0.5
        i = torch.arange(T, device="cuda")
        s = s.masked_fill(~((i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] <= w)), float("-inf"))
        return s.softmax(-1) @ v

    rows = []
    for w in (2048, 1024, 256):
        pairs = sum(min(t + 1, w + 1) for t in range(T))
        flops = 3.5 * 4 * B * H * D * pairs  # forward 4*D per (q,k) pair; backward 2.5x forward
        for name, fn in candidates(w).items():
            try:
                # numerics on a slice, against fp32 attention with an explicit mask
                g = torch.Generator(device="cuda").manual_seed(0)
                q, k, v = (torch.randn(2, H, T, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
                q.requires_grad_(); k.requires_grad_(); v.requires_grad_()
                out = fn(q, k, v)
                out.float().square().sum().backward()
                qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
                ref = reference(qr, kr, vr, w)
                ref.square().sum().backward()
                err = max((out.float() - ref).abs().max().item(), (q.grad.float() - qr.grad).abs().max().item() / qr.grad.abs().max().item())
                # timing at the full shape
                q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
                dout = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16)
                for _ in range(3):
                    fn(q, k, v).backward(dout)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(iters):
                    fn(q, k, v).backward(dout)
                end.record()
                torch.cuda.synchronize()
                ms = start.elapsed_time(end) / iters
                rows.append((w, name, f"{ms:.2f}", f"{flops / ms / 1e9:.0f}", f"{err:.1e}"))
            except Exception as e:  # a backend that does not support the case
                rows.append((w, name, "n/a", "", str(e).splitlines()[0][:60]))
            torch.cuda.empty_cache()
    print(f"\nAttention fwd+bwd, B={B} H={H} T={T} D={D} bf16, causal, on {torch.cuda.get_device_name()}")
    print("| window | kernel | ms | TFLOP/s | max error vs fp32 |\n|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")


def train_run(log_path, stop_after_warmup=False):
    """Run train.py and time it from outside: start-up is the moment the warm-up steps (0-10,
    not counted against the budget) are done, evaluation the time from the last step line to
    the summary. Returns the summary block as a dict plus those two."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "train.py"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    text, pending, stamps = "", "", {}
    with open(log_path, "w") as log:
        while chunk := os.read(proc.stdout.fileno(), 65536).decode(errors="replace"):
            log.write(chunk)
            text += chunk
            pending += chunk
            *lines, pending = re.split(r"[\r\n]", pending)
            now = time.time() - t0
            for line in lines:
                if line.startswith("step 00010"):
                    stamps["startup_seconds"] = now
                    if stop_after_warmup:
                        proc.kill()
                if line.startswith("step "):
                    stamps["last_step"] = now
                if line == "---":
                    stamps["eval_seconds"] = now - stamps.get("last_step", now)
    proc.wait()
    summary = dict(re.findall(r"^(\w+):\s+(\S+)\s*$", text.split("\n---\n")[-1], flags=re.M)) if "\n---\n" in text else {}
    for k in ("startup_seconds", "eval_seconds"):
        if k in stamps:
            summary[k] = f"{stamps[k]:.1f}"
    if not stop_after_warmup and proc.returncode != 0:
        print(text[-3000:])
        raise SystemExit(f"train.py failed with exit code {proc.returncode}")
    return summary


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=1, help="full train.py runs (the second shows warm caches)")
    ap.add_argument("--warm-startup", action="store_true", help="after the full runs, start train.py once more "
                    "and stop it at the first counted step: the start-up time with warm caches")
    ap.add_argument("--no-train", action="store_true")
    ap.add_argument("--no-attention", action="store_true")
    ap.add_argument("--make-corpus", nargs=2, metavar=("SRC_DIR", "OUT_DIR"))
    ap.add_argument("--corpus-mb", type=int, default=1000)
    ap.add_argument("--log-dir", default="/tmp")
    args = ap.parse_args()
    if args.make_corpus:
        return make_corpus(*args.make_corpus, max_mb=args.corpus_mb)
    if not args.no_attention:
        attention_bench()
    if args.no_train:
        return
    results = [train_run(os.path.join(args.log_dir, f"bench_train_run{i + 1}.log")) for i in range(args.runs)]
    if args.warm_startup:
        results.append(train_run(os.path.join(args.log_dir, "bench_train_warm.log"), stop_after_warmup=True))
    keys = ["val_bpb", "startup_seconds", "training_seconds", "eval_seconds", "total_seconds", "num_steps",
            "total_tokens_M", "mfu_percent", "peak_vram_mb"]
    names = [f"run {i + 1}" for i in range(args.runs)] + (["warm start-up only"] if args.warm_startup else [])
    print("\n| metric | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for key in keys + ["outside_budget_seconds", "tokens_per_second_M"]:
        vals = []
        for r in results:
            if key == "outside_budget_seconds" and "total_seconds" in r:
                vals.append(f"{float(r['total_seconds']) - float(r['training_seconds']):.1f}")
            elif key == "tokens_per_second_M" and "total_tokens_M" in r:  # counted steps only
                counted = int(r["num_steps"]) - 11
                vals.append(f"{float(r['total_tokens_M']) * counted / int(r['num_steps']) / float(r['training_seconds']):.2f}")
            else:
                vals.append(r.get(key, ""))
        print(f"| {key} | " + " | ".join(vals) + " |")


if __name__ == "__main__":
    main()
