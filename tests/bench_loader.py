"""Loader benchmark (not a test): tokens/s of prepare.make_dataloader at the training shape,
side by side with a reference-style loader that tokenizes on the fly in Python, on the same
prepared corpus and the same machine.

    uv run tests/bench_loader.py                 # the prepared data of the current profile
    uv run tests/bench_loader.py --batches 40 --B 128 --T 2048

Run it on the CPU-only machine for the loader's own throughput (the GPU copy is not timed there);
an H100 consumes about 1.7 M tokens/s with the default train.py.
"""

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import prepare as P  # noqa: E402


def reference_style(tok, B, T, sources, buffer_size=1000):
    """The reference's approach: tokenize 128 documents at a time while packing, scan the whole
    buffer for the largest document that fits, crop the shortest when none does (its tail lost)."""
    bos = tok.get_bos_token_id()

    def doc_batches():
        while True:
            batch = []
            for src in sources:
                for text in P.iter_documents(src):
                    batch.append(text)
                    if len(batch) == 128:
                        yield batch
                        batch = []

    batches, buf = doc_batches(), []
    row = torch.empty((B, T + 1), dtype=torch.long)
    while True:
        for r in range(B):
            pos = 0
            while pos < T + 1:
                while len(buf) < buffer_size:
                    buf.extend(tok.encode(next(batches), prepend=bos))
                room = T + 1 - pos
                best, best_len = -1, 0
                for i, d in enumerate(buf):
                    if best_len < len(d) <= room:
                        best, best_len = i, len(d)
                if best >= 0:
                    d = buf.pop(best)
                    row[r, pos:pos + len(d)] = torch.tensor(d, dtype=torch.long)
                    pos += len(d)
                else:
                    i = min(range(len(buf)), key=lambda k: len(buf[k]))
                    row[r, pos:] = torch.tensor(buf.pop(i)[:room], dtype=torch.long)
                    pos = T + 1
        yield row[:, :-1].clone(), row[:, 1:].clone()


def rate(loader, batches, B, T):
    next(loader)  # start-up (file scans, thread start) is not the steady state
    t0 = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return batches * B * T / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--B", type=int, default=128)
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--reference-batches", type=int, default=3)
    args = ap.parse_args()
    manifest = P.check_prepared()
    tok = P.Tokenizer.from_directory()
    lengths = np.concatenate([np.diff(np.append(np.flatnonzero(a == tok.get_bos_token_id()), a.size))
                              for a in (np.fromfile(p, dtype=np.uint16) for p in P.split_files("train")[:4]) if a.size])
    print(f"corpus: {manifest['source'][:80]}  {manifest['train_tokens'] / 1e6:.1f}M train tokens, "
          f"document length mean {lengths.mean():.0f}, median {np.median(lengths):.0f}, "
          f"{(lengths > args.T + 1).mean() * 100:.1f}% longer than a row")
    print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}; B={args.B}, T={args.T}")
    ours = rate(P.make_dataloader(tok, args.B, args.T, "train", device="cpu"), args.batches, args.B, args.T)
    sources = [f["source"] for f in manifest["files"] if f["train_tokens"] > 0]
    ref = rate(reference_style(tok, args.B, args.T, sources), args.reference_batches, args.B, args.T)
    print("| loader | M tokens/s |\n|---|---|")
    print(f"| prepare.make_dataloader (pre-tokenized, best-fit, background thread) | {ours / 1e6:.2f} |")
    print(f"| reference-style (tokenize on the fly, list scan) | {ref / 1e6:.2f} |")
    print(f"ratio: {ours / ref:.1f}x")


if __name__ == "__main__":
    main()
