"""The morning report: summarize results.tsv and draw progress.png.

    uv run analysis.py                  # reads ./results.tsv
    uv run analysis.py path/to/results.tsv

results.tsv is written by run.sh, one row per experiment:

    commit  val_bpb  memory_gb  status  description  branch  profile  [more columns...]

status is keep, discard, crash or rerun; profile is gpu, or smoke for the CPU
smoke profile (AUTORESEARCH_SMOKE=1). The reference's files have the first five
columns only; files from before the profile column marked smoke rows with a
"[smoke] " prefix on the description.

The report is printed; the plot is written as progress.png next to the
results file. A malformed row stops the script with its line number and
exit status 1.
"""

import os
import sys

import matplotlib

matplotlib.use("Agg")  # no display on a GPU box
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

HEADER = ["commit", "val_bpb", "memory_gb", "status", "description"]
STATUSES = ("keep", "discard", "crash", "rerun")
SMOKE_PREFIX = "[smoke] "
TOP_N = 10


def fail(message):
    print(f"analysis.py: {message}", file=sys.stderr)
    sys.exit(1)


def read_results(path):
    """Return a DataFrame with one row per experiment, validated line by line."""
    if not os.path.exists(path):
        fail(f"{path} not found (run.sh writes it after the first experiment)")
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()

    rows = []
    header_seen, profile_col = False, None
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if not header_seen:
            if fields[:5] != HEADER:
                fail(f"{path} line {lineno}: expected the header "
                     f"{'<tab>'.join(HEADER)!r}, got {line!r}")
            header_seen = True
            profile_col = fields.index("profile") if "profile" in fields else None
            continue
        if len(fields) < 5:
            fail(f"{path} line {lineno}: expected at least 5 tab-separated "
                 f"columns, got {len(fields)}: {line!r}")
        commit, val_bpb, memory_gb, status, description = fields[:5]
        try:
            val_bpb = float(val_bpb)
        except ValueError:
            fail(f"{path} line {lineno}: val_bpb {val_bpb!r} is not a number")
        try:
            memory_gb = float(memory_gb)
        except ValueError:
            fail(f"{path} line {lineno}: memory_gb {memory_gb!r} is not a number")
        status = status.strip().lower()
        if status not in STATUSES:
            fail(f"{path} line {lineno}: status {fields[3]!r} is not one of "
                 f"{', '.join(STATUSES)}")
        # run.sh quotes a description holding a double quote, CSV-style.
        if len(description) >= 2 and description[0] == description[-1] == '"':
            description = description[1:-1].replace('""', '"')
        if profile_col is not None and len(fields) > profile_col:
            smoke = fields[profile_col].strip() == "smoke"
        else:
            smoke = description.startswith(SMOKE_PREFIX)
            if smoke:
                description = description[len(SMOKE_PREFIX):]
        rows.append({
            "n": len(rows) + 1,  # experiment number, in file order
            "line": lineno,
            "commit": commit.strip(),
            "val_bpb": val_bpb,
            "memory_gb": memory_gb,
            "status": status,
            "description": description.strip(),
            "smoke": smoke,
        })
    columns = ["n", "line", "commit", "val_bpb", "memory_gb", "status",
               "description", "smoke"]
    return pd.DataFrame(rows, columns=columns)


def short(text, width):
    return text if len(text) <= width else text[: width - 3] + "..."


def report(df, path):
    """Print the summary; return the rows the summary (and plot) is about."""
    print(f"autoresearch morning report: {path}")
    if df.empty:
        print("no experiments yet: run ./run.sh \"baseline\" first")
        return df

    n_smoke = int(df["smoke"].sum())
    if n_smoke == len(df):
        print(f"[smoke] all {n_smoke} rows are smoke runs (AUTORESEARCH_SMOKE=1): "
              "a plumbing check on a toy model, not research results")
    elif n_smoke:
        print(f"[smoke] {n_smoke} smoke rows left out below; "
              "their val_bpb is not comparable with real runs")
        df = df[~df["smoke"]]

    counts = df["status"].value_counts()
    kept, discarded = counts.get("keep", 0), counts.get("discard", 0)
    crashed, reruns = counts.get("crash", 0), counts.get("rerun", 0)
    print(f"experiments: {len(df)}  (kept {kept}, discarded {discarded}, "
          f"crashed {crashed}, reruns {reruns})")

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
    return df


def plot(df, out_path, title_prefix):
    fig, ax = plt.subplots(figsize=(14, 7))
    ax.set_xlabel("experiment #")
    ax.set_ylabel("val_bpb (lower is better)")
    ax.grid(True, alpha=0.2)

    keeps = df[df["status"] == "keep"]
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


def main():
    if len(sys.argv) > 2 or (len(sys.argv) == 2 and sys.argv[1] in ("-h", "--help")):
        print(__doc__.strip())
        sys.exit(0 if len(sys.argv) == 2 else 2)
    path = sys.argv[1] if len(sys.argv) == 2 else "results.tsv"
    df = read_results(path)
    shown = report(df, path)
    smoke = not shown.empty and bool(shown["smoke"].all())
    out_path = os.path.join(os.path.dirname(os.path.abspath(path)), "progress.png")
    plot(shown, out_path, "[smoke] " if smoke else "")
    print()
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
