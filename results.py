"""results.tsv, the record of the experiments, and what is read back from it.

run.sh appends one row per experiment:

    commit  val_bpb  memory_gb  status  description  branch  profile  decision

and reads the file back through this module (the best so far, the counts, the rerun
spread), as analysis.py does for the morning report. Older files have fewer columns:
the reference's the first five; before the profile column, smoke rows were marked by
a "[smoke] " prefix on the description. A description that holds a double quote is
quoted CSV-style.

Standard library only: run.sh runs it outside the sandbox with python -I -S (no site,
so no .pth file or sitecustomize is executed).

    python results.py stats FILE BRANCH COMMIT PROFILE   (run.sh) one tab-separated line: see stats()
    python results.py mean VALUE...                       (run.sh) the mean and its decision text
"""

import os
import re
import sys

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


def main(args):
    if args[:1] == ["stats"] and len(args) == 5:
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
        sys.exit(__doc__.strip())


if __name__ == "__main__":
    main(sys.argv[1:])
