"""Evaluation benchmark (not a test): what moving evaluation out of train.py's process costs,
side by side in one run on the same machine, in the current profile (smoke on a CPU).

    AUTORESEARCH_SMOKE=1 uv run tests/bench_eval.py            # train.py's smoke model, 3 rounds
    AUTORESEARCH_SMOKE=1 uv run tests/bench_eval.py --rounds 5

before: what evaluate_bpb did until the hand-over existed: the model called in this process on
        batches of train.py's DEVICE_BATCH_SIZE rows, the validation then the held-out split.
after:  the hand-over (torch.export and writing the files, in this process) plus a new process,
        `prepare.py --evaluate`, from its start to its exit (imports, rebuilding the graph, the
        causality check, both splits).
Rounds alternate before/after so that a busy machine slows both alike; the ratio of medians is the
figure to quote, absolute seconds only from a GPU, with its name.
"""

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import prepare as P  # noqa: E402


def train_model(tok):
    """train.py's model as train.py builds it (its code up to the setup section), random weights."""
    src = open(os.path.join(ROOT, "train.py")).read()
    ns = {"__name__": "train_classes"}
    exec(compile(src[:src.index("t_start = time.time()")], "train.py", "exec"), ns)
    dim = (ns["DEPTH"] * ns["ASPECT_RATIO"] + ns["HEAD_DIM"] - 1) // ns["HEAD_DIM"] * ns["HEAD_DIM"]
    cfg = ns["GPTConfig"](sequence_len=P.MAX_SEQ_LEN, vocab_size=tok.get_vocab_size(), n_layer=ns["DEPTH"],
                          n_head=dim // ns["HEAD_DIM"], n_kv_head=dim // ns["HEAD_DIM"], n_embd=dim,
                          window_pattern=ns["WINDOW_PATTERN"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device("meta"):
        model = ns["GPT"](cfg)
    model.to_empty(device=device)
    model.init_weights()
    return model.eval(), ns["DEVICE_BATCH_SIZE"]


def before(model, tok, batch):
    nbytes = P.get_token_bytes(next(model.parameters()).device)
    for split, tokens in (("val", P.EVAL_TOKENS), ("heldout", P.HELDOUT_TOKENS)):
        rows = P._packed(split, tok.get_bos_token_id(), batch, P.MAX_SEQ_LEN)
        nats = torch.zeros((), dtype=torch.float64, device=nbytes.device)
        total = torch.zeros((), dtype=torch.int64, device=nbytes.device)
        with torch.no_grad():
            for _ in range(max(1, tokens // (batch * P.MAX_SEQ_LEN))):
                b = torch.from_numpy(next(rows)[0].astype(np.int64)).to(nbytes.device)
                y = b[:, 1:].reshape(-1)
                n = F.cross_entropy(model(b[:, :-1]).reshape(y.numel(), -1).float(), y, reduction="none")
                nats += (n * (nbytes[y] > 0)).sum(dtype=torch.float64)
                total += nbytes[y].sum()
        if split == "val":
            val = (nats / (math.log(2) * total.double())).item()
    return val


def after(model, directory):
    t0 = time.time()
    P.handover(model, directory)
    t1 = time.time()
    out = subprocess.run([sys.executable, "-I", os.path.join(ROOT, "prepare.py"), "--evaluate", directory],
                         capture_output=True, text=True, check=True).stdout
    figures = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    return float(figures["val_bpb"]), t1 - t0, time.time() - t1


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    tok = P.Tokenizer.from_directory()
    model, batch = train_model(tok)
    times = {"before": [], "handover": [], "evaluator": [], "after": []}
    with tempfile.TemporaryDirectory() as d:
        for r in range(args.rounds):
            t = time.time()
            v0 = before(model, tok, batch)
            times["before"].append(time.time() - t)
            v1, th, te = after(model, os.path.join(d, f"h{r}"))
            times["handover"].append(th)
            times["evaluator"].append(te)
            times["after"].append(th + te)
            print(f"round {r + 1}: before {times['before'][-1]:.2f}s, after {th + te:.2f}s "
                  f"(hand-over {th:.2f}s + evaluator process {te:.2f}s); val_bpb {v0:.6f} vs {v1:.6f}", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    where = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"{'SMOKE ' if P.SMOKE else ''}{where}, median of {args.rounds}: before {med['before']:.2f}s, "
          f"after {med['after']:.2f}s (hand-over {med['handover']:.2f}s, evaluator {med['evaluator']:.2f}s): "
          f"ratio {med['after'] / med['before']:.2f}")


if __name__ == "__main__":
    main()
