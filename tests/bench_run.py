"""Benchmark (not a test): where the seconds of an experiment go, from `./run.sh` being called to
its report, for the runs of a night: the first (cold compile caches), the same train.py again
(a rerun), a changed hyperparameter, and a changed line of the model. Prints a markdown table.

    uv run tests/bench_run.py                     # on a GPU machine with prepared data
    AUTORESEARCH_SMOKE=1 uv run tests/bench_run.py  # the smoke profile, on a CPU

It works in a throw-away clone of this checkout's HEAD (the branch and results.tsv stay there)
and with the prepared data and compile caches of AUTORESEARCH_CACHE (default ~/.cache/autoresearch);
--cold uses an empty compile cache for the first run (the prepared data hard-linked into a new
cache directory beside AUTORESEARCH_CACHE, removed after). The phases come from run.sh's
`outside:` line (the run record and run.sh's own clock) and its `training:` line.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = ["run.sh before", "start-up", "compile and warm-up", "evaluator start-up", "evaluation", "held-out evaluation",
          "run.sh after"]
RUNS = [  # (name, how train.py changes before the run, run.sh arguments)
    ("first run", None, ["first run"]),
    ("same train.py (rerun)", None, ["--rerun", "same code"]),
    ("changed hyperparameter", ("MATRIX_LR = 0.04", "MATRIX_LR = 0.045"), ["MATRIX_LR 0.045"]),
    ("changed model line", ("x = x + self.mlp(norm(x))", "x = x + 1.0 * self.mlp(norm(x))"), ["1.0 * mlp"]),
]


def report_times(out):
    """The times of run.sh's report: its `outside:` line (total, outside and each of PHASES) and the
    harness's clock from its `training:` line; None when the report has no such lines (a crash)."""
    m = re.search(r"^outside:\s+([\d.]+)s of ([\d.]+)s outside the budget: (.*)$", out, re.M)
    t = re.search(r"^training:\s+([\d.]+)s", out, re.M)
    if not m or not t:
        return None
    phases = dict(re.findall(r"([a-z .-]+?) ([\d.]+)(?:,|$)", m.group(3)))
    return {"total": float(m.group(2)), "outside": float(m.group(1)), "training": float(t.group(1)),
            **{k.strip(): float(v) for k, v in phases.items()}}


def run(repo, args, env):
    p = subprocess.run(["./run.sh", *args], cwd=repo, env=env, capture_output=True, text=True)
    times = report_times(p.stdout)
    if p.returncode != 0 or not times:
        sys.exit(f"run.sh {' '.join(args)} did not report its times:\n{p.stdout[-3000:]}\n{p.stderr[-2000:]}")
    return times


def cold_cache(cache, own):
    """The prepared data of cache (both profiles) in own, beside empty compile caches. As hard
    links, so on cache's file system: symbolic links into $HOME would dangle in the sandbox,
    which hides $HOME (a copy where hard links cannot be made)."""
    for base, sub in ((cache, own), (os.path.join(cache, "smoke"), os.path.join(own, "smoke"))):
        os.makedirs(sub, exist_ok=True)
        for name in ("tokenizer", "tokens", "manifest.json"):  # what run.sh and the evaluator read
            src = os.path.join(base, name)
            if os.path.exists(src) and subprocess.run(["cp", "-al", src, sub], capture_output=True).returncode != 0:
                subprocess.run(["cp", "-a", src, sub], check=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cold", action="store_true", help="start with an empty compile cache")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench_run.")
    repo = os.path.join(tmp, "repo")
    subprocess.run(["git", "clone", "-q", ROOT, repo], check=True)
    env = dict(os.environ, AUTORESEARCH_TAG="bench")
    own = None
    if args.cold:  # the prepared data, hard-linked beside the cache; empty compile caches
        cache = os.path.abspath(os.environ.get("AUTORESEARCH_CACHE") or os.path.expanduser("~/.cache/autoresearch"))
        own = tempfile.mkdtemp(prefix="bench_run-cache.", dir=os.path.dirname(cache))
        cold_cache(cache, own)
        env["AUTORESEARCH_CACHE"] = own
    rows = []
    try:
        for name, change, run_args in RUNS:
            if change:
                path = os.path.join(repo, "train.py")
                text = open(path).read()
                assert change[0] in text, f"train.py no longer has {change[0]!r}"
                open(path, "w").write(text.replace(change[0], change[1], 1))
            rows.append((name, run(repo, run_args, env)))
            print(f"{name}: {rows[-1][1]['total']:.1f}s", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if own:
            shutil.rmtree(own, ignore_errors=True)
    print("| run | " + " | ".join(PHASES) + " | outside the budget | training (harness) | run.sh in all |")
    print("|---" * (len(PHASES) + 4) + "|")
    for name, r in rows:
        print(f"| {name} | " + " | ".join(f"{r.get(p, float('nan')):.1f}" for p in PHASES)
              + f" | **{r['outside']:.1f}** | {r['training']:.1f} | {r['total']:.1f} |")


if __name__ == "__main__":
    main()
