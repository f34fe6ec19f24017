"""Benchmark (not a test): where the seconds of an experiment go, from `./run.sh` being called to
its report, for the runs of a night: the first (cold compile caches), the same train.py again
(a rerun), a changed hyperparameter, and a changed line of the model. Prints a markdown table.

    uv run tests/bench_run.py                     # on a GPU machine with prepared data
    AUTORESEARCH_SMOKE=1 uv run tests/bench_run.py  # the smoke profile, on a CPU
    uv run tests/bench_run.py --slurm 1           # each run also through Slurm (AUTORESEARCH_SLURM=1)
    AUTORESEARCH_SMOKE=1 uv run tests/bench_run.py --slurm 1 --stand-ins 10   # Slurm's cost alone

It works in a throw-away clone of this checkout's HEAD (the branch and results.tsv stay there)
and with the prepared data and compile caches of AUTORESEARCH_CACHE (default ~/.cache/autoresearch);
--cold uses an empty compile cache for the first run (the prepared data hard-linked into a new
cache directory beside AUTORESEARCH_CACHE, removed after). The phases come from run.sh's
`outside:` line (the run record and run.sh's own clock) and its `training:` line.

--slurm OPTIONS measures what going through Slurm costs: every run is made twice, side by side, in
two clones (the order alternating), once as it is and once with AUTORESEARCH_SLURM=OPTIONS (Slurm's
SLURM_CONF and the rest from the environment); a second table gives the difference per run. Slurm's
cost falls in "run.sh before" (srun, the job's start, the node's set-up) and "run.sh after"; the
total also holds the noise of training and the imports. --stand-ins N replaces the night by a
baseline and N experiments with the stand-in prepare.py and train.py of tests/test_run_sh.py (each
trains for a moment, in its own throw-away repository and cache): what remains is run.sh's own
time, and the difference through Slurm is Slurm's alone.
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
    ap.add_argument("--slurm", metavar="OPTIONS", help="each run also through Slurm: AUTORESEARCH_SLURM=OPTIONS")
    ap.add_argument("--stand-ins", type=int, metavar="N", help="a baseline and N experiments with run.sh's stand-ins")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench_run.")
    env = dict({k: v for k, v in os.environ.items() if k != "AUTORESEARCH_SLURM"}, AUTORESEARCH_TAG="bench")
    modes = {"": env}  # a mode's name (a suffix of the run's), its environment
    if args.slurm:
        modes["through Slurm"] = dict(env, AUTORESEARCH_SLURM=args.slurm)
    repos, runs = {}, RUNS
    for mode in modes:
        repos[mode] = os.path.join(tmp, "repo" + str(len(repos)))
        if args.stand_ins:  # run.sh's test repository: stand-ins, prepared data, a cache and HOME of its own
            sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
            from pathlib import Path
            from test_run_sh import Repo, trainer
            stand_in = Repo(Path(repos[mode])).init()
            repos[mode] = str(stand_in.path)
            modes[mode] = {**stand_in.env, **{k: v for k, v in modes[mode].items() if k.startswith(("SLURM_", "AUTORESEARCH_S"))}}
            runs = [("baseline", None, ["baseline"])] + [
                (f"experiment {i}", trainer(f"0.9{i:03d}"), [f"experiment {i}"]) for i in range(1, args.stand_ins + 1)]
            continue
        subprocess.run(["git", "clone", "-q", ROOT, repos[mode]], check=True)
        subprocess.run(["git", "-C", repos[mode], "switch", "-q", "-C", "main"], check=True)  # where run.sh starts a branch
    own = None
    if args.cold:  # the prepared data, hard-linked beside the cache; empty compile caches
        cache = os.path.abspath(os.environ.get("AUTORESEARCH_CACHE") or os.path.expanduser("~/.cache/autoresearch"))
        own = tempfile.mkdtemp(prefix="bench_run-cache.", dir=os.path.dirname(cache))
        cold_cache(cache, own)
        for e in modes.values():
            e["AUTORESEARCH_CACHE"] = own
    rows = []
    try:
        for i, (name, change, run_args) in enumerate(runs):
            for mode in sorted(modes, reverse=i % 2 == 1):  # alternating: neither always goes first
                repo = repos[mode]
                path = os.path.join(repo, "train.py")
                if isinstance(change, str):  # a whole train.py
                    open(path, "w").write(change)
                elif change:
                    text = open(path).read()
                    assert change[0] in text, f"train.py no longer has {change[0]!r}"
                    open(path, "w").write(text.replace(change[0], change[1], 1))
                label = f"{name}, {mode}" if mode else name
                rows.append((label, run(repo, run_args, modes[mode])))
                print(f"{label}: {rows[-1][1]['total']:.1f}s", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if own:
            shutil.rmtree(own, ignore_errors=True)
    print("| run | " + " | ".join(PHASES) + " | outside the budget | training (harness) | run.sh in all |")
    print("|---" * (len(PHASES) + 4) + "|")
    for name, r in rows:
        print(f"| {name} | " + " | ".join(f"{r.get(p, float('nan')):.1f}" for p in PHASES)
              + f" | **{r['outside']:.1f}** | {r['training']:.1f} | {r['total']:.1f} |")
    if args.slurm:
        times = dict(rows)
        print(f"\n| run | run.sh in all | through Slurm ({args.slurm}) | difference | of which run.sh before and after |")
        print("|---|---|---|---|---|")
        diffs = []
        for name, _, _ in runs:
            a, b = times[name], times[f"{name}, through Slurm"]
            ends = sum(b[p] - a[p] for p in ("run.sh before", "run.sh after"))
            diffs.append((b["total"] - a["total"], ends))
            print(f"| {name} | {a['total']:.2f} | {b['total']:.2f} | **{diffs[-1][0]:+.2f}** | {ends:+.2f} |")
        print(f"| mean | | | **{sum(d for d, _ in diffs) / len(diffs):+.2f}** | {sum(e for _, e in diffs) / len(diffs):+.2f} |")


if __name__ == "__main__":
    main()
