"""The morning report: summarize results.tsv and draw progress.png.

    uv run analysis.py                  # reads ./results.tsv, or the whole night (below)
    uv run analysis.py path/to/results.tsv
    uv run analysis.py --no-heldout     # leave the held-out scores out (while the agent runs)

Agents that run side by side, one per git worktree of one repository, each on
its own branch with its own results.tsv, make one night: run without a path in
a worktree whose siblings have results too, the report reads every worktree's
results.tsv (git worktree list) and shows each agent's branch, the best of the
night and where its code came from, the noise pooled across agents, and one
running best per agent in progress.png.

results.tsv is written by run.sh, one row per experiment:

    commit  val_bpb  memory_gb  status  description  branch  profile  decision  [more...]

status is keep, discard, crash or rerun; profile is gpu, or smoke for the CPU
smoke profile (AUTORESEARCH_SMOKE=1). The reference's files have the first five
columns only; files from before the profile column marked smoke rows with a
"[smoke] " prefix on the description.

decision (run.sh's AUTORESEARCH_CONFIRM policy) says what a keep or discard
was based on: "single" run, "mean of 2 (a, b; spread s)", "baseline" or "-".
A row is read, the runs behind it (and the rerun spread) are found, and the
night's rows are gathered from every worktree, by the functions below, which
run.sh calls too (`--run-sh`: ./run.sh --night, its refusal of a train.py tried
tonight, --adopt; standard library only:
run.sh runs them with python -I -S, no site-packages, so pandas and matplotlib
are imported only where the report needs them).

The held-out scores, which no decision uses, are in heldout.tsv in the git
directory (.git/autoresearch/), where run.sh keeps them out of the agent's
reach; the report shows them beside val_bpb for the kept chain, with the
noise measured by reruns and a verdict when the two disagree.

The report is printed; the plot is written as progress.png next to the
results file. A malformed row stops the script with its line number and
exit status 1.
"""

import math
import os
import re
import subprocess
import sys
from collections import defaultdict, deque

TOP_N = 10
NOISE_SIGMAS = 2  # "within the noise": a change below 2 standard deviations of a two-run difference
WITHIN = NOISE_SIGMAS * math.sqrt(2)  # ... in units of one run's sigma (a difference of two runs: sigma x sqrt(2))

# ---------------------------------------------------------------- reading results.tsv
# The one definition of a row, the runs behind it and the rerun spread: the report below and
# run.sh (python -I -S analysis.py --run-sh ...) both use it. Standard library only.

HEADER = ["commit", "val_bpb", "memory_gb", "status", "description"]
STATUSES = ("keep", "discard", "crash", "rerun")
SMOKE_PREFIX = "[smoke] "
RUN_SH_COLUMNS = {"branch": 5, "profile": 6, "decision": 7}  # after the first five, where run.sh writes them


def parse_row(fields, columns):
    """One row, split at its tabs, as a dict; columns maps the names of the columns after the
    fifth to their places (from the header). Raises ValueError saying what is wrong."""
    if len(fields) < 5:
        line = "\t".join(fields)
        raise ValueError(f"expected at least 5 tab-separated columns, got {len(fields)}: {line!r}")
    commit, val_bpb, memory_gb, status, description = fields[:5]
    try:
        val_bpb = float(val_bpb)
    except ValueError:
        raise ValueError(f"val_bpb {val_bpb!r} is not a number") from None
    try:
        memory_gb = float(memory_gb)
    except ValueError:
        raise ValueError(f"memory_gb {memory_gb!r} is not a number") from None
    status = status.strip().lower()
    if status not in STATUSES:
        raise ValueError(f"status {fields[3]!r} is not one of {', '.join(STATUSES)}")
    if len(description) >= 2 and description[0] == description[-1] == '"':
        description = description[1:-1].replace('""', '"')
    extra = {name: fields[i].strip() if i < len(fields) else "" for name, i in columns.items()}
    if extra.get("profile"):
        smoke = extra["profile"] == "smoke"
    else:
        smoke = description.startswith(SMOKE_PREFIX)
        if smoke:
            description = description[len(SMOKE_PREFIX):]
    return {
        "commit": commit.strip(),
        "val_bpb": val_bpb,
        "memory_gb": memory_gb,
        "status": status,
        "description": description.strip(),
        "smoke": smoke,
        "branch": extra.get("branch", ""),
        "profile": extra.get("profile") or ("smoke" if smoke else "gpu"),
        "decision": extra.get("decision", ""),
    }


def read(path):
    """The rows of the file at path that parse, in file order; none without a file. A malformed
    row is left out (analysis.py names it): run.sh must not stop on it."""
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    columns, rows = RUN_SH_COLUMNS, []
    for i, line in enumerate(lines):
        fields = line.split("\t")
        if i == 0 and fields[:5] == HEADER:
            columns = {name: j for j, name in enumerate(fields) if j >= 5}
            continue
        try:
            rows.append(parse_row(fields, columns))
        except ValueError:
            pass
    return rows


# ------------------------------------------------------------ measurements and the spread

def runs_of(decision, value):
    """The single measurements behind a row: its value, or the runs of a "mean of N (a, b; ...)"."""
    m = re.match(r"mean of \d+ \(([^;)]*)", decision or "")
    if m:
        try:
            return [float(v) for v in m.group(1).split(",")]
        except ValueError:
            pass
    return [value]


def is_measured(row):
    """Whether a row measured its commit: a keep, a rerun, or the runs of a confirmation."""
    return row["status"] in ("keep", "rerun") or row["decision"].startswith("mean of")


def spread(values):
    """The rerun spread: max - min of the measurements of one commit."""
    return max(values) - min(values)


def mean_of(values):
    """The mean of a confirmation's runs, and the decision it is recorded with."""
    runs = ", ".join(f"{v:.6f}" for v in values)
    return sum(values) / len(values), f"mean of {len(values)} ({runs}; spread {spread(values):.6f})"


def stats(rows, branch, commit, profile):
    """What run.sh reads back, for BRANCH, its HEAD COMMIT (7 characters) and PROFILE: the best
    (COMMIT's keep row in PROFILE, the last if several) and its description; the number of
    BRANCH's rows, in all and by status; the rerun spread of the commit most recently rerun on
    BRANCH in PROFILE (all its measurements: the kept run, the reruns, a confirmation's runs),
    with their number and that commit."""
    best, n, counts, measured, last = None, 0, dict.fromkeys(STATUSES, 0), {}, None
    for row in rows:
        if row["commit"] == commit and row["status"] == "keep" and row["profile"] == profile:
            best = row
        if row["branch"] != branch:
            continue
        n += 1
        counts[row["status"]] += 1
        if row["profile"] == profile and is_measured(row):
            measured.setdefault(row["commit"], []).extend(runs_of(row["decision"], row["val_bpb"]))
            if row["status"] == "rerun":
                last = row["commit"]
    return {
        "best": best["val_bpb"] if best else None,
        "best_description": best["description"] if best else "",
        "n": n,
        "counts": counts,
        "spread": spread(measured[last]) if last else None,
        "spread_runs": len(measured[last]) if last else 0,
        "spread_commit": last,
    }


# ---------------------------------------------------------------- the night: every worktree
# Agents run side by side, one per git worktree of one repository, each on its own branch
# (autoresearch/<tag>) with its own results.tsv, all sharing the git directory: the refs run.sh
# keeps for every commit it trained (refs/autoresearch/tried/<hash>) and where each branch
# started (refs/autoresearch/base/<tag>).

def git(where, *args, stdin=None):
    """git's output, or None when it fails; run as run.sh runs it: the repository's own
    configuration only, no hooks, no fsmonitor."""
    env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull, "LC_ALL": "C"}
    cmd = ["git", "-C", where, "-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false", *args]
    try:
        p = subprocess.run(cmd, input=stdin, capture_output=True, text=True, errors="replace", env=env, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout if p.returncode == 0 else None


def checkouts(where="."):
    """The live worktrees of the repository holding WHERE, as (directory, branch), the main one
    first; a bare one, or one whose directory is gone, is left out."""
    found = []
    for block in (git(where, "worktree", "list", "--porcelain") or "").split("\n\n"):
        lines = block.splitlines()
        if not lines or not lines[0].startswith("worktree ") or "bare" in lines:
            continue
        path = lines[0][len("worktree "):]
        branch = next((line[len("branch refs/heads/"):] for line in lines if line.startswith("branch refs/heads/")), "")
        if os.path.isdir(path):
            found.append((path, branch))
    return found


def gather(where=".", reader=read):
    """Every row of every live worktree's results.tsv (checkouts), in file order, each with its
    checkout; a row from before the branch column gets its worktree's branch. The one gatherer:
    run.sh's night and the morning report's (reader: how a file is read)."""
    rows = []
    for path, branch in checkouts(where):
        results = os.path.join(path, "results.tsv")
        if os.path.isfile(results):
            rows += [{**row, "checkout": path, "branch": row["branch"] or branch} for row in reader(results)]
    return rows


def train_py_of(where, commits):
    """{7-character commit: [(its train.py's blob hash, its commit time), ...]} for the COMMITS that
    run.sh tried (their refs refs/autoresearch/tried/<hash>; a list, should two share 7 characters):
    two git calls however many commits."""
    commits = {c for c in commits if re.fullmatch(r"[0-9a-f]{7}", c)}
    refs = (git(where, "for-each-ref", "--format=%(objectname) %(committerdate:unix)",
                "refs/autoresearch/tried/") or "").split("\n")
    named = [line.split(" ", 1) for line in refs if line[:7] in commits and re.fullmatch(r"\w+ \d+", line)]
    out = git(where, "cat-file", "--batch-check=%(objectname)", stdin="".join(f"{h}:train.py\n" for h, _ in named))
    found = defaultdict(list)
    for (commit, time), blob in zip(named, (out or "").splitlines()):
        if re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", blob):  # not "... missing"
            found[commit[:7]].append((blob, int(time)))
    return found


def night(where, branch, base, profile):
    """The night of BRANCH, started at commit BASE: the rows in PROFILE of every live worktree
    (gather) on the branches that started from the same files as BASE (the same tree: the same
    harness, the same baseline train.py, so their results compare), BRANCH's own included."""
    refs = [line.split(" ", 1) for line in (git(where, "for-each-ref", "--format=%(objectname) %(refname)",
                                                 "refs/autoresearch/base/") or "").splitlines()]
    starts = [(commit, "autoresearch/" + ref[len("refs/autoresearch/base/"):]) for commit, ref in refs]
    out = git(where, "cat-file", "--batch-check=%(objectname)",
              stdin="".join(f"{c}^{{tree}}\n" for c in [base] + [c for c, _ in starts]))
    trees = (out or "").splitlines()
    same = {branch} | {b for (_, b), tree in zip(starts, trees[1:]) if tree == trees[0]}
    return [row for row in gather(where) if row["branch"] in same and row["profile"] == profile]


def is_interrupted(row):
    """A run that recover recorded, or one whose Slurm job was ended: it may be run again."""
    return row["status"] == "crash" and row["description"].endswith(("[interrupted]", "[interrupted by Slurm]"))


def tried(rows, branch, blob, where, scope="night"):
    """The row of ROWS (the night) that tried a train.py with BLOB, or None; with scope "branch"
    (--adopt) BRANCH's rows only. The completion of one of BRANCH's interrupted runs is no repeat.
    The row named: BRANCH's first, a measurement rather than a rerun of it, the latest."""
    blobs = train_py_of(where, {row["commit"] for row in rows})
    same = [(i, row) for i, row in enumerate(rows) if any(b == blob for b, _ in blobs.get(row["commit"], ()))]
    mine = [row for _, row in same if row["branch"] == branch]
    if mine and is_interrupted(mine[-1]):
        return None
    same = [(i, row) for i, row in same if not is_interrupted(row) and (scope == "night" or row["branch"] == branch)]
    if not same:
        return None
    return min(same, key=lambda ir: (ir[1]["branch"] != branch, ir[1]["status"] == "rerun", -ir[0]))[1]


def best_kept(rows, branch):
    """BRANCH's best kept row in ROWS (the lowest val_bpb; the first of equals), or None."""
    keeps = [row for row in rows if row["branch"] == branch and row["status"] == "keep"]
    return min(keeps, key=lambda row: row["val_bpb"]) if keeps else None


def night_table(rows, branch, profile):
    """./run.sh --night: per branch of the night its best and its counts, best first, and what
    --adopt would take. Short: it is read by the agent, whose context is precious."""
    branches = list(dict.fromkeys(row["branch"] for row in rows))
    if not branches:
        return (f"night: no results yet on the branches started from these files ({profile} profile)")
    best = {b: best_kept(rows, b) for b in branches}
    branches.sort(key=lambda b: (best[b] is None, best[b]["val_bpb"] if best[b] else 0))
    width = max(len(b) for b in branches)
    lines = [f"night: {len(branches)} branch(es) started from the same files as this one, {profile} profile, "
             "best first (* this branch)",
             f"  {'branch':<{width}s}  {'best':<8s}  commit   runs keep discard crash rerun  the best's description"]
    for b in branches:
        counts = {s: sum(row["branch"] == b and row["status"] == s for row in rows) for s in STATUSES}
        k = best[b]
        lines.append(f"{'*' if b == branch else ' '} {b:<{width}s}  "
                     + (f"{k['val_bpb']:.6f}  {k['commit']:<7s}" if k else f"{'-':<8s}  {'-':<7s}")
                     + f"  {sum(counts.values()):4d} {counts['keep']:4d} {counts['discard']:7d} {counts['crash']:5d}"
                     f" {counts['rerun']:5d}  " + (short(k["description"], 60) if k else "(no keep yet)"))
    top = next((b for b in branches if b != branch and best[b]), None)
    if best.get(branch) is None:
        lines.append("--adopt: this branch has no kept result yet; run its baseline first")
    elif top is None:
        lines.append("--adopt: no other branch has a kept result yet")
    elif best[branch]["val_bpb"] <= best[top]["val_bpb"]:
        lines.append("--adopt: this branch has the night's best")
    else:
        lines.append(f"--adopt: ./run.sh --adopt {top} \"why\" trains that branch's best ({best[top]['commit']}, "
                     f"{best[top]['val_bpb']:.6f}) here, judged against this branch's best "
                     f"({best[branch]['val_bpb']:.6f}) like any change")
    return "\n".join(lines)


def run_sh(args):
    """run.sh's calls (python -I -S analysis.py --run-sh ...): standard library only."""
    if args[:1] == ["night"] and len(args) == 4:  # BRANCH BASE PROFILE: ./run.sh --night
        print(night_table(night(".", *args[1:]), args[1], args[3]))
    elif args[:1] == ["tried"] and len(args) == 6:  # BRANCH BASE PROFILE BLOB night|branch
        row = tried(night(".", *args[1:4]), args[1], args[4], ".", args[5])
        if row:
            print("\t".join([row["branch"], row["commit"], row["status"], f"{row['val_bpb']:.6f}", row["description"]]))
    elif args[:1] == ["best"] and len(args) == 5:  # BRANCH BASE PROFILE OTHER: what --adopt takes
        row = best_kept(night(".", *args[1:4]), args[4])
        refs = (git(".", "for-each-ref", "--format=%(objectname)", "refs/autoresearch/tried/") or "").split()
        commits = [h for h in refs if row and h[:7] == row["commit"]]
        if len(commits) == 1:  # its full hash (none: no keep; two: 7 characters are not enough)
            print("\t".join([commits[0], f"{row['val_bpb']:.6f}", row["description"]]))
    elif args[:1] == ["stats"] and len(args) == 5:
        s = stats(read(args[1]), *args[2:])
        print("\t".join([
            "-" if s["best"] is None else f"{s['best']:.6f}",
            str(s["n"]), *(str(s["counts"][k]) for k in STATUSES),
            *(["-", "-", "-"] if s["spread_commit"] is None else
              [f"{s['spread']:.6f}", str(s["spread_runs"]), s["spread_commit"]]),
            s["best_description"]]))
    elif args[:1] == ["mean"] and len(args) > 1:
        mean, decision = mean_of([float(v) for v in args[1:]])
        print(f"{mean:.6f}\t{decision}")
    else:
        sys.exit("analysis.py --run-sh: stats FILE BRANCH COMMIT PROFILE | mean VALUE... | night BRANCH BASE PROFILE"
                 " | tried BRANCH BASE PROFILE BLOB night|branch | best BRANCH BASE PROFILE OTHER")


# ---------------------------------------------------------------- the morning report



def fail(message):
    print(f"analysis.py: {message}", file=sys.stderr)
    sys.exit(1)


def read_results(path):
    """Return a DataFrame with one row per experiment, validated line by line."""
    return frame(read_rows(path))


def read_rows(path):
    """The rows of the file at path, each numbered (n, in file order) with its line; a malformed
    row or a missing header stops the report, naming the file and the line."""
    if not os.path.exists(path):
        fail(f"{path} not found (run.sh writes it after the first experiment)")
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()

    rows = []
    header_seen, columns = False, {}
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if not header_seen:
            if fields[:5] != HEADER:
                fail(f"{path} line {lineno}: expected the header "
                     f"{'<tab>'.join(HEADER)!r}, got {line!r}")
            header_seen = True
            columns = {name: i for i, name in enumerate(fields) if i >= 5}
            continue
        try:
            row = parse_row(fields, columns)
        except ValueError as e:
            fail(f"{path} line {lineno}: {e}")
        rows.append({"n": len(rows) + 1, "line": lineno, **row})  # n: experiment number, in file order
    return rows


def frame(rows):
    names = ["n", "line", "commit", "val_bpb", "memory_gb", "status",
             "description", "smoke", "branch", "profile", "decision", "checkout"]
    import pandas as pd
    return pd.DataFrame(rows, columns=names)


# ---------------------------------------------------------------- held-out

def heldout_file(results_path):
    """run.sh's heldout.tsv: in the git common directory of the checkout holding results.tsv."""
    where = os.path.dirname(os.path.abspath(results_path))
    try:
        common = subprocess.run(["git", "-C", where, "rev-parse", "--path-format=absolute", "--git-common-dir"],
                                capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        common = ""
    return os.path.join(common or os.path.join(where, ".git"), "autoresearch", "heldout.tsv")


def attach_heldout(df, path):
    """Add heldout_bpb and heldout_runs to the rows of df that run.sh stored a held-out score for.
    A stored line is matched on commit, val_bpb, status, branch and profile, in file order."""
    df = df.copy()
    df["heldout_bpb"] = math.nan
    df["heldout_runs"] = [[] for _ in range(len(df))]
    if not os.path.exists(path):
        return df, 0
    stored, seen = defaultdict(deque), set()
    with open(path, encoding="utf-8") as f:
        for line in f.read().splitlines():
            fields = line.split("\t")
            if line in seen or len(fields) < 7 or fields[0] == "commit":
                continue  # a repeated line (a recovery), a torn line, a header
            seen.add(line)
            try:
                value, runs = float(fields[5]), [float(v) for v in fields[6].split(",")]
            except ValueError:
                continue
            stored[tuple(fields[:5])].append((value, runs))
    for i, row in df.iterrows():
        key = (row["commit"], f"{row['val_bpb']:.6f}", row["status"], row["branch"], row["profile"])
        if stored.get(key):
            value, runs = stored[key].popleft()
            df.at[i, "heldout_bpb"] = value
            df.at[i, "heldout_runs"] = runs
    return df, int(df["heldout_bpb"].notna().sum())


def noise(groups):
    """Pooled standard deviation of repeated measurements: groups are lists of values of the same
    code. Returns (sigma or None, runs, groups used)."""
    groups = [g for g in groups if len(g) >= 2]
    dof = sum(len(g) - 1 for g in groups)
    if not dof:
        return None, 0, 0
    ss = sum(sum((v - sum(g) / len(g)) ** 2 for v in g) for g in groups)
    return math.sqrt(ss / dof), sum(len(g) for g in groups), len(groups)


def measured_noise(df):
    """(val sigma, held-out sigma, runs, commits): from commits measured more than once (a kept run
    and its reruns, and the two runs behind a confirmation, kept or not)."""
    val, held = defaultdict(list), defaultdict(list)
    for _, row in df[df.apply(is_measured, axis=1)].iterrows():
        key = (row["commit"], row["branch"])
        val[key] += runs_of(row["decision"], row["val_bpb"])
        held[key] += row["heldout_runs"] if "heldout_runs" in row else []
    sigma, runs, commits = noise(list(val.values()))
    return sigma, noise(list(held.values()))[0], runs, commits


def in_sigmas(delta, sigma):
    return f"{delta / sigma:+.1f}" if sigma else "n/a"


def print_noise(df, across=""):
    """Print the noise line (ACROSS: over how many agents); return (val sigma, held-out sigma)."""
    sigma, h_sigma, runs, commits = measured_noise(df)
    if sigma:
        print(f"noise: sigma {sigma:.6f} val_bpb"
              + (f", {h_sigma:.6f} held-out" if h_sigma else "")
              + f"  (pooled standard deviation of {runs} runs of {commits} commit(s) measured more than once{across};"
              f" within the noise = a change between two runs below {NOISE_SIGMAS} x sqrt(2) = {WITHIN:.1f} sigma)")
    else:
        print("noise: unknown (no commit measured twice: ./run.sh --rerun \"why\" measures it)")
    return sigma, h_sigma


def heldout_report(df, keeps, heldout_path, pooled=None):
    """The kept chain with val_bpb and held-out bpb side by side, each gain against the noise,
    and the verdict. pooled: the night's (val sigma, held-out sigma), printed once above; without
    it df's noise is printed here. Returns (val sigma, held-out sigma) for the plot."""
    print()
    sigma, h_sigma = pooled or print_noise(df)
    has_heldout = keeps["heldout_bpb"].notna().any()
    print("kept chain (delta against the previous kept run, and that delta / sigma):")
    print(f"  {'#':<5s} {'commit':<8s} {'val_bpb':>9s} {'delta':>10s} {'/sigma':>6s}   "
          f"{'held-out':>9s} {'delta':>10s} {'/sigma':>6s}   [decision] description")
    prev, within = None, []
    for _, row in keeps.iterrows():
        held = f"{row['heldout_bpb']:9.6f}" if not math.isnan(row["heldout_bpb"]) else f"{'-':>9s}"
        if prev is None:
            cols = f"{'baseline':>10s} {'':>6s}   {held} {'':>10s} {'':>6s}"
        else:
            d = row["val_bpb"] - prev["val_bpb"]
            hd = row["heldout_bpb"] - prev["heldout_bpb"]
            hcol = (f"{hd:+10.6f} {in_sigmas(hd, h_sigma or sigma):>6s}" if not math.isnan(hd)
                    else f"{'-':>10s} {'':>6s}")
            cols = f"{d:+10.6f} {in_sigmas(d, sigma):>6s}   {held} {hcol}"
            if sigma and abs(d) < WITHIN * sigma:
                within.append(f"#{row['n']}")
        decision = f"[{row['decision']}] " if row["decision"] not in ("", "single", "baseline") else ""
        print(f"  #{row['n']:<4d} {row['commit']:<8s} {row['val_bpb']:9.6f} {cols}   "
              f"{decision}{short(row['description'], 50)}")
        prev = row
    if sigma and len(keeps) > 1:
        print(f"within the noise: {len(within)} of {len(keeps) - 1} keeps"
              + (f" ({', '.join(within)}): their gains may be luck; rerun them to confirm" if within else ""))

    base, last = keeps.iloc[0], keeps.iloc[-1]
    gain = last["val_bpb"] - base["val_bpb"]
    print(f"night: val_bpb  {base['val_bpb']:.6f} -> {last['val_bpb']:.6f}  ({gain:+.6f}, "
          f"{in_sigmas(gain, sigma)} sigma)")
    if heldout_path is None:
        print("held-out: left out (--no-heldout)")
        return sigma, h_sigma
    if not has_heldout:
        print(f"held-out: no scores found in {heldout_path} (a file from the reference, or runs from "
              "before the held-out split)")
        return sigma, h_sigma
    if math.isnan(base["heldout_bpb"]) or math.isnan(last["heldout_bpb"]):
        print("held-out: the baseline or the last keep has no held-out score; no verdict")
        return sigma, h_sigma
    h_gain = last["heldout_bpb"] - base["heldout_bpb"]
    print(f"night: held-out {base['heldout_bpb']:.6f} -> {last['heldout_bpb']:.6f}  ({h_gain:+.6f}, "
          f"{in_sigmas(h_gain, h_sigma or sigma)} sigma)")
    print(verdict(gain, h_gain, sigma, h_sigma))
    return sigma, h_sigma


def verdict(gain, h_gain, sigma, h_sigma):
    """Plain words on whether the night's val_bpb gain shows on the held-out split. gain and
    h_gain are last - baseline (negative is better). Each is a difference of two runs, so its
    noise is sigma * sqrt(2); the gap between them is compared with 2 x its own noise."""
    if not sigma:
        if gain < 0 <= h_gain:
            return ("verdict: validation improved but held-out did not; the noise is unknown (no reruns), "
                    "so this may be chance: ./run.sh --rerun \"why\" measures it")
        return "verdict: unknown noise (no reruns), so no verdict on the held-out difference"
    h_sigma = h_sigma or sigma
    tolerance = NOISE_SIGMAS * math.sqrt(2 * sigma ** 2 + 2 * h_sigma ** 2)
    gap = h_gain - gain  # > 0: held-out gained less than validation
    if gain < -WITHIN * sigma and gap > tolerance:
        if h_gain > -WITHIN * h_sigma:
            return (f"VERDICT: validation improved ({gain:+.6f}) but held-out did not ({h_gain:+.6f}): "
                    f"the night's gain does not carry to unseen data beyond the noise (gap {gap:.6f} > "
                    f"{tolerance:.6f}); the kept changes fit the validation split or were picked from noise")
        return (f"VERDICT: held-out improved less than validation ({h_gain:+.6f} against {gain:+.6f}, gap "
                f"{gap:.6f} > {tolerance:.6f}): part of the night's gain is specific to the validation split")
    if gain < -WITHIN * sigma:
        return f"verdict: held-out agrees with validation within the noise (gap {gap:+.6f}, tolerance {tolerance:.6f})"
    return (f"verdict: the night's val_bpb change ({gain:+.6f}) is within the noise "
            f"({WITHIN * sigma:.6f}); nothing to confirm on the held-out split")


def short(text, width):
    return text if len(text) <= width else text[: width - 3] + "..."


def report(df, path, heldout_path=None):
    """Print the summary; return the rows the summary (and plot) is about, and the noise
    (val sigma, held-out sigma)."""
    print(f"autoresearch morning report: {path}")
    if df.empty:
        print("no experiments yet: run ./run.sh \"baseline\" first")
        return df, (None, None)
    df = without_smoke(df)
    keeps = summary(df)
    sigmas = (None, None)
    if not keeps.empty:
        sigmas = heldout_report(df, keeps, heldout_path)
    return df, sigmas


def without_smoke(df):
    """The rows to report: all, or only the GPU rows of a file that mixes both (said here)."""
    n_smoke = int(df["smoke"].sum())
    if n_smoke == len(df):
        print(f"[smoke] all {n_smoke} rows are smoke runs (AUTORESEARCH_SMOKE=1): "
              "a plumbing check on a toy model, not research results")
    elif n_smoke:
        print(f"[smoke] {n_smoke} smoke rows left out below; "
              "their val_bpb is not comparable with real runs")
        df = df[~df["smoke"]]
    return df


def print_counts(df):
    counts = df["status"].value_counts()
    kept, discarded = counts.get("keep", 0), counts.get("discard", 0)
    crashed, reruns = counts.get("crash", 0), counts.get("rerun", 0)
    print(f"experiments: {len(df)}  (kept {kept}, discarded {discarded}, "
          f"crashed {crashed}, reruns {reruns})")


def summary(df):
    """The counts, the keep rate, baseline and best, the top improvements, reruns and crashes of
    one branch's (or one file's) rows, numbered n; returns the kept rows."""
    print_counts(df)
    keeps = df[df["status"] == "keep"]
    if keeps.empty:
        print("no successful run yet: every experiment crashed "
              "(see the crashes below and the tail of run.log)")
    else:
        base = keeps.iloc[0]
        best = keeps.loc[keeps["val_bpb"].idxmin()]
        # Changes tried after the baseline; a rerun changes nothing.
        tried = df[(df["n"] > base["n"]) & (df["status"] != "rerun")]
        tried_kept = int((tried["status"] == "keep").sum())
        if len(tried):
            print(f"keep rate: {tried_kept}/{len(tried)} = "
                  f"{100 * tried_kept / len(tried):.1f}%  "
                  "(changes tried after the baseline, crashes included)")
        else:
            print("keep rate: n/a (only the baseline so far)")
        change = 100 * (best["val_bpb"] - base["val_bpb"]) / base["val_bpb"]
        print(f"val_bpb: baseline {base['val_bpb']:.6f} -> best "
              f"{best['val_bpb']:.6f}  ({change:+.2f}%)")
        print(f"best: #{best['n']} {best['commit']}  {best['memory_gb']:.1f} GB  "
              f"{best['description']}")

        hits = keeps.copy()
        hits["delta"] = hits["val_bpb"] - hits["val_bpb"].shift(1)
        hits = hits.iloc[1:].sort_values("delta")
        if not hits.empty:
            print()
            print("top improvements (delta val_bpb against the previous kept run):")
            for rank, (_, row) in enumerate(hits.head(TOP_N).iterrows(), start=1):
                print(f"  {rank:2d}. #{row['n']:<4d} {row['commit']:<8s} "
                      f"{row['val_bpb']:.6f}  {row['delta']:+.6f}  "
                      f"{row['description']}")

    reruns_df = df[df["status"] == "rerun"]
    if not reruns_df.empty:
        print()
        print("reruns (delta val_bpb against the kept run they repeat):")
        for _, row in reruns_df.iterrows():
            before = keeps[keeps["n"] < row["n"]]
            delta = (f"{row['val_bpb'] - before.iloc[-1]['val_bpb']:+.6f}"
                     if not before.empty else "    n/a  ")
            print(f"  #{row['n']:<4d} {row['commit']:<8s} {row['val_bpb']:.6f}  "
                  f"{delta}  {row['description']}")

    crashes = df[df["status"] == "crash"]
    if not crashes.empty:
        print()
        print("crashes:")
        for _, row in crashes.iterrows():
            print(f"  #{row['n']:<4d} {row['commit']:<8s} {row['description']}")
    return keeps


# ---------------------------------------------------------------- the whole night

def is_night(where="."):
    """Whether the report is the whole night's: WHERE is the top of a worktree and another
    worktree of its repository has a results.tsv (checkouts)."""
    here, found = os.path.realpath(where), checkouts(where)
    return (any(os.path.realpath(p) == here for p, _ in found)
            and any(os.path.realpath(p) != here and os.path.isfile(os.path.join(p, "results.tsv")) for p, _ in found))


def read_night(where="."):
    """Every worktree's rows (gather), each numbered n on its own branch: an agent's experiments."""
    df = frame(gather(where, reader=read_rows))
    df["n"] = df.groupby("branch", sort=False).cumcount() + 1
    return df


def adoptions(df, where="."):
    """{index of a keep: index of the row on another branch that tried the same train.py (the
    same blob) first, by commit time}: code an agent took from another (./run.sh --adopt), found
    in git, not in the description. The baselines' train.py, every branch's, is left out."""
    info = train_py_of(where, set(df["commit"]))
    keeps = df[df["status"] == "keep"]
    baselines = {b for i in keeps.groupby("branch", sort=False).head(1).index for b, _ in info.get(df.at[i, "commit"], ())}
    first = {}  # blob -> (commit time, index of the row)
    for i, row in df.iterrows():
        for blob, time in info.get(row["commit"], ()):
            if blob not in baselines and (blob not in first or time < first[blob][0]):
                first[blob] = (time, i)
    found = {}
    for i, row in keeps.iterrows():
        for blob, time in info.get(row["commit"], ()):
            if blob in first and first[blob][0] < time and df.at[first[blob][1], "branch"] != row["branch"]:
                found[i] = first[blob][1]
    return found


def night_report(df, heldout_path, where="."):
    """The whole night: every agent's branch, from every worktree's results.tsv. Prints the best
    of the night and where it came from, the noise pooled across agents, then each branch as
    report() shows one file. Returns the rows shown and the pooled noise."""
    print(f"autoresearch morning report: the night, {df['branch'].nunique()} branch(es) in "
          f"{df['checkout'].nunique()} worktree(s)")
    for checkout, rows in df.groupby("checkout", sort=False):
        print(f"  {os.path.join(checkout, 'results.tsv')}: {len(rows)} rows ({', '.join(rows['branch'].unique())})")
    if df.empty:
        print("no experiments yet: run ./run.sh \"baseline\" first")
        return df, (None, None)
    df = without_smoke(df)
    print_counts(df)
    pooled = print_noise(df, f", across {df['branch'].nunique()} agents")
    keeps = df[df["status"] == "keep"]
    bests = keeps.groupby("branch")["val_bpb"].min()
    order = sorted(df["branch"].unique(), key=lambda b: (b not in bests, bests.get(b, 0)))
    if not keeps.empty:
        best = keeps.loc[keeps["val_bpb"].idxmin()]
        print(f"best of the night: {best['val_bpb']:.6f}  {best['commit']} on {best['branch']} (#{best['n']} there)  "
              f"{best['description']}")
        taken = adoptions(df, where)
        chain = [i for i in keeps[(keeps["branch"] == best["branch"]) & (keeps["n"] <= best["n"])].index if i in taken]
        if chain:
            src = df.loc[taken[chain[-1]]]
            origin = f"{src['branch']}'s {src['commit']} (#{src['n']} there, {src['val_bpb']:.6f})"
            if chain[-1] == best.name:
                print(f"  its train.py came from {origin}: adopted (./run.sh --adopt)")
            else:
                print(f"  built on {origin}, adopted at #{df.at[chain[-1], 'n']}")
        print("agents, best first:")
        for b in order:
            rows, k = df[df["branch"] == b], keeps[keeps["branch"] == b]
            line = f"  {b:<24s} {len(rows):4d} experiments, {len(k):3d} kept"
            if len(k):
                line += (f"  baseline {k.iloc[0]['val_bpb']:.6f} -> best {bests[b]:.6f} "
                         f"({100 * (bests[b] - k.iloc[0]['val_bpb']) / k.iloc[0]['val_bpb']:+.2f}%)")
            print(line)
    for b in order:
        rows = df[df["branch"] == b]
        print()
        print(f"== {b}  ({', '.join(rows['checkout'].unique())})")
        k = summary(rows)
        if not k.empty:
            heldout_report(rows, k, heldout_path, pooled)
    return df, pooled


def plot_night(df, out_path, title_prefix):
    """progress.png for the whole night: one running best per agent (branch), against the
    experiment number on its own branch, with its keeps, discards and crashes in its colour."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    fig, ax = plt.subplots(figsize=(14, 7))
    ax.set_xlabel("experiment # on its branch")
    ax.set_ylabel("val_bpb (lower is better)")
    ax.grid(True, alpha=0.2)
    keeps = df[df["status"] == "keep"]
    if keeps.empty:
        ax.text(0.5, 0.5, "no experiments yet" if df.empty else "no successful run yet", transform=ax.transAxes,
                ha="center", va="center", fontsize=16, color="#888888")
    measured = df[df["status"].isin(["keep", "rerun"])]
    low, high = 0.0, 1.0
    if not measured.empty:
        low, high = measured["val_bpb"].min(), measured["val_bpb"].max()
        span = max(high - low, 0.002 * abs(high), 1e-6)
        low, high = low - 0.2 * span, high + 0.8 * span
        ax.set_ylim(low, high)
        ax.set_xlim(0.5, df["n"].max() + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    bests = keeps.groupby("branch")["val_bpb"].min()
    for k, branch in enumerate(sorted(df["branch"].unique(), key=lambda b: (b not in bests, bests.get(b, 0)))):
        rows, c = df[df["branch"] == branch], colours[k % len(colours)]
        discards = rows[(rows["status"] == "discard") & (rows["val_bpb"] <= high)]
        ax.scatter(discards["n"], discards["val_bpb"], s=14, color=c, alpha=0.4, zorder=2)
        reruns = rows[rows["status"] == "rerun"]
        ax.scatter(reruns["n"], reruns["val_bpb"], s=40, marker="D", facecolors="none", edgecolors=c, zorder=4)
        crashes = rows[rows["status"] == "crash"]
        ax.scatter(crashes["n"], [low] * len(crashes), s=30, marker="x", color=c, clip_on=False, zorder=4)
        kept = rows[rows["status"] == "keep"]
        if kept.empty:
            continue
        best = kept.set_index("n")["val_bpb"].cummin()
        ax.step(list(best.index) + [rows["n"].max() + 0.5], list(best.values) + [best.values[-1]], where="post",
                color=c, linewidth=2, zorder=3, label=f"{branch}: running best {best.values[-1]:.6f}")
        ax.scatter(kept["n"], kept["val_bpb"], s=45, color=c, edgecolors="black", linewidths=0.6, zorder=5)
    ax.set_title(f"{title_prefix}autoresearch night: {df['branch'].nunique()} agents, {len(df)} experiments, "
                 f"{len(keeps)} kept (dots: keeps; faint: discards; diamonds: reruns; x: crashes)")
    if len(bests):
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)
    fig.savefig(out_path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot(df, out_path, title_prefix, sigmas=(None, None)):
    import matplotlib
    matplotlib.use("Agg")  # no display on a GPU box
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    keeps = df[df["status"] == "keep"]
    chain = keeps[keeps["heldout_bpb"].notna()] if "heldout_bpb" in keeps else keeps.iloc[:0]
    if len(chain):  # a second panel: the kept chain's val_bpb and held-out bpb, as change since the baseline
        fig, (ax, ax2) = plt.subplots(2, 1, figsize=(14, 10), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
        plot_heldout(ax2, keeps, sigmas, df["n"].max() + 0.5)
    else:
        fig, ax = plt.subplots(figsize=(14, 7))
    if not len(chain):
        ax.set_xlabel("experiment #")
    ax.set_ylabel("val_bpb (lower is better)")
    ax.grid(True, alpha=0.2)

    if df.empty or keeps.empty:
        message = "no experiments yet" if df.empty else "no successful run yet"
        ax.text(0.5, 0.5, message, transform=ax.transAxes, ha="center",
                va="center", fontsize=16, color="#888888")
    if df.empty:
        ax.set_title(f"{title_prefix}autoresearch: no experiments")
        fig.savefig(out_path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        return

    ax.set_xlim(0.5, df["n"].max() + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # experiments are whole numbers (shared x)

    # Zoom on the interesting band: the kept runs and the reruns (the noise),
    # plus some room above. Discarded runs far above it go on the top edge.
    measured = df[df["status"].isin(["keep", "rerun"])]
    if measured.empty:
        measured = df[df["status"] == "discard"]
    if not measured.empty:
        low, high = measured["val_bpb"].min(), measured["val_bpb"].max()
        span = max(high - low, 0.002 * abs(high), 1e-6)
        low, high = low - 0.2 * span, high + 0.8 * span
        ax.set_ylim(low, high)
    else:
        low, high = 0.0, 1.0
        ax.set_yticks([])

    discards = df[df["status"] == "discard"]
    inside = discards[discards["val_bpb"] <= high]
    above = discards[discards["val_bpb"] > high]
    ax.scatter(inside["n"], inside["val_bpb"], s=14, c="#bbbbbb", alpha=0.6,
               zorder=2, label="discarded")
    if not above.empty:
        ax.scatter(above["n"], [high] * len(above), s=30, marker="^",
                   facecolors="none", edgecolors="#bbbbbb", clip_on=False,
                   zorder=2, label="discarded, above the plotted range")

    reruns = df[df["status"] == "rerun"]
    if not reruns.empty:
        ax.scatter(reruns["n"], reruns["val_bpb"], s=45,
                   marker="D", facecolors="none", edgecolors="#2c7fb8",
                   linewidths=1.5, zorder=4, label="rerun (same code)")

    crashes = df[df["status"] == "crash"]
    if not crashes.empty:
        # Crashes have no val_bpb: mark them on the bottom edge, not at 0.
        ax.scatter(crashes["n"], [low] * len(crashes), s=40, marker="x",
                   c="#d62728", clip_on=False, zorder=4, label="crash")

    if not keeps.empty:
        best_so_far = keeps.set_index("n")["val_bpb"].cummin()
        steps_x = list(best_so_far.index) + [df["n"].max() + 0.5]
        steps_y = list(best_so_far.values) + [best_so_far.values[-1]]
        ax.step(steps_x, steps_y, where="post", color="#27ae60", linewidth=2,
                alpha=0.7, zorder=3, label="running best")
        ax.scatter(keeps["n"], keeps["val_bpb"], s=60, c="#2ecc71",
                   edgecolors="black", linewidths=0.6, zorder=5, label="kept")
        for _, row in keeps.iterrows():
            ax.annotate(short(row["description"], 45), (row["n"], row["val_bpb"]),
                        textcoords="offset points", xytext=(6, 6), fontsize=8,
                        color="#1a7a3a", rotation=25, ha="left", va="bottom")

    n_kept = len(keeps)
    ax.set_title(f"{title_prefix}autoresearch: {len(df)} experiments, "
                 f"{n_kept} kept")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)
    fig.savefig(out_path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_heldout(ax, keeps, sigmas, right):
    """The kept chain: val_bpb and held-out bpb as their change since the baseline, each with its
    own noise band (the held-out split is scored on fewer tokens: its noise is larger); each line
    holds its last keep's value up to the right edge (right)."""
    import pandas as pd
    base = keeps.iloc[0]
    keeps = pd.concat([keeps, keeps.iloc[-1:].assign(n=right)])
    ax.axhline(0, color="#888888", linewidth=0.8)
    for sigma, what, colour in ((sigmas[0], "val_bpb", "#27ae60"), (sigmas[1], "held-out", "#8e44ad")):
        if sigma:  # the noise of a difference of two runs
            ax.axhspan(-WITHIN * sigma, WITHIN * sigma, color=colour, alpha=0.08, zorder=1,
                       label=f"{what} noise: within {NOISE_SIGMAS} sigma of a two-run difference "
                             f"({WITHIN:.1f} x one run's, {WITHIN * sigma:.4f})")
    ax.plot(keeps["n"], keeps["val_bpb"] - base["val_bpb"], marker="o", markevery=list(range(len(keeps) - 1)),
            color="#27ae60", linewidth=2, drawstyle="steps-post", zorder=3,
            label="val_bpb (every decision is made on it)")
    held = keeps[keeps["heldout_bpb"].notna()]
    if not math.isnan(base["heldout_bpb"]):
        ax.plot(held["n"], held["heldout_bpb"] - base["heldout_bpb"], marker="s", markevery=list(range(len(held) - 1)),
                color="#8e44ad", drawstyle="steps-post", linewidth=2, linestyle="--", zorder=4,
                label="held-out bpb (no decision uses it)")
    ax.set_xlabel("experiment #")
    ax.set_ylabel("change since the baseline\n(kept chain; lower is better)")
    ax.set_title("kept chain: validation against held-out", fontsize=10)
    ax.grid(True, alpha=0.2)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)


def main():
    args = sys.argv[1:]
    with_heldout = "--no-heldout" not in args
    args = [a for a in args if a != "--no-heldout"]
    if len(args) > 1 or (len(args) == 1 and args[0] in ("-h", "--help")):
        print(__doc__.strip())
        sys.exit(0 if len(args) == 1 else 2)
    path = args[0] if len(args) == 1 else "results.tsv"
    whole_night = not args and is_night(".")  # sibling worktrees with results: the night's report
    df = read_night(".") if whole_night else read_results(path)
    heldout_path = heldout_file(path) if with_heldout else None
    df = attach_heldout(df, heldout_path)[0] if heldout_path else attach_heldout(df, "")[0]
    shown, sigmas = night_report(df, heldout_path) if whole_night else report(df, path, heldout_path)
    smoke = not shown.empty and bool(shown["smoke"].all())
    out_path = os.path.join(os.path.dirname(os.path.abspath(path)), "progress.png")
    if whole_night:
        plot_night(shown, out_path, "[smoke] " if smoke else "")
    else:
        plot(shown, out_path, "[smoke] " if smoke else "", sigmas)
    print()
    print(f"wrote {out_path}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--run-sh"]:
        run_sh(sys.argv[2:])
    else:
        main()
