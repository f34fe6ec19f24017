"""The morning report (analysis.py), run as the person runs it, on real files."""

import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.image  # noqa: E402
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
ANALYSIS = REPO / "analysis.py"
HEADER = "commit\tval_bpb\tmemory_gb\tstatus\tdescription\n"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_analysis(tmp_path, text, args=None):
    results = tmp_path / "results.tsv"
    if text is not None:
        results.write_text(text, encoding="utf-8")
    cmd = [sys.executable, str(ANALYSIS)] + ([str(results)] if args is None else args)
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    return proc


def rows(*lines):
    return HEADER + "".join("\t".join(map(str, line)) + "\n" for line in lines)


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert b"Matplotlib" in data  # matplotlib's Software metadata chunk
    assert len(data) > 10_000
    image = matplotlib.image.imread(str(path))
    height, width = image.shape[:2]
    assert height > 300 and width > 500
    assert image.std() > 0.01  # not a blank canvas


NIGHT = rows(
    ("a1b2c3d", "0.997900", "44.0", "keep", "baseline"),
    ("a1b2c3d", "0.998500", "44.0", "rerun", "baseline again to learn the noise"),
    ("b2c3d4e", "0.993200", "44.2", "keep", "increase LR to 0.04"),
    ("c3d4e5f", "1.005000", "44.0", "discard", "switch to GeLU activation"),
    ("d4e5f6a", "0.000000", "0.0", "crash", "double model width (OOM)"),
    ("e5f6a7b", "0.983200", "44.1", "keep", "warmup 5 percent"),
    ("f6a7b8c", "3.500000", "44.1", "discard", "all learning rates 0"),
    ("a7b8c9d", "0.982700", "45.0", "keep", "weight decay 0.2"),
    ("b8c9d0e", "0.000000", "0.0", "crash", "syntax error in attention"),
)


def test_full_night(tmp_path):
    proc = run_analysis(tmp_path, NIGHT)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "experiments: 9  (kept 4, discarded 2, crashed 2, reruns 1)" in out
    # After the baseline: 8 rows, one of them a rerun -> 7 changes, 3 kept.
    assert "keep rate: 3/7 = 42.9%" in out
    assert "baseline 0.997900 -> best 0.982700  (-1.52%)" in out
    assert "best: #8 a7b8c9d  45.0 GB  weight decay 0.2" in out
    # Ranked by the drop against the previous kept row.
    top = out.split("top improvements")[1].split("reruns")[0]
    ranked = [line.split()[0] for line in top.splitlines()[1:] if line.strip()]
    assert ranked == ["1.", "2.", "3."]
    assert top.index("warmup 5 percent") < top.index("increase LR to 0.04")
    assert top.index("increase LR to 0.04") < top.index("weight decay 0.2")
    assert "-0.010000" in top and "-0.004700" in top and "-0.000500" in top
    assert "+0.000600  baseline again to learn the noise" in out
    crashes = out.split("crashes:")[1]
    assert "#5    d4e5f6a  double model width (OOM)" in crashes
    assert "#9    b8c9d0e  syntax error in attention" in crashes
    assert "[smoke]" not in out
    assert_png(tmp_path / "progress.png")


def test_default_path_is_results_tsv_in_cwd(tmp_path):
    proc = run_analysis(tmp_path, NIGHT, args=[])
    assert proc.returncode == 0, proc.stderr
    assert "morning report: results.tsv" in proc.stdout
    assert_png(tmp_path / "progress.png")


@pytest.mark.parametrize("text", ["", HEADER, HEADER + "\n\n"])
def test_empty(tmp_path, text):
    proc = run_analysis(tmp_path, text)
    assert proc.returncode == 0, proc.stderr
    assert "no experiments yet" in proc.stdout
    assert_png(tmp_path / "progress.png")


def test_baseline_only(tmp_path):
    proc = run_analysis(tmp_path, rows(("a1b2c3d", "1.234567", "12.3", "keep", "baseline")))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "experiments: 1  (kept 1, discarded 0, crashed 0, reruns 0)" in out
    assert "keep rate: n/a (only the baseline so far)" in out
    assert "baseline 1.234567 -> best 1.234567  (+0.00%)" in out
    assert "top improvements" not in out and "crashes:" not in out
    assert_png(tmp_path / "progress.png")


def test_all_crashes(tmp_path):
    proc = run_analysis(tmp_path, rows(
        ("a1b2c3d", "0.000000", "0.0", "crash", "baseline"),
        ("b2c3d4e", "0.000000", "0.0", "crash", "fix import, still broken"),
    ))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "experiments: 2  (kept 0, discarded 0, crashed 2, reruns 0)" in out
    assert "no successful run yet" in out
    assert "#1    a1b2c3d  baseline" in out
    assert "#2    b2c3d4e  fix import, still broken" in out
    assert_png(tmp_path / "progress.png")


def test_extra_columns_are_ignored(tmp_path):
    text = ("commit\tval_bpb\tmemory_gb\tstatus\tdescription\tseconds\n"
            "a1b2c3d\t1.100000\t10.0\tkeep\tbaseline\t301.2\n"
            "b2c3d4e\t1.000000\t10.0\tkeep\tlonger warmup\t300.9\n")
    proc = run_analysis(tmp_path, text)
    assert proc.returncode == 0, proc.stderr
    assert "baseline 1.100000 -> best 1.000000  (-9.09%)" in proc.stdout


def test_run_sh_quoting_and_branch_column(tmp_path):
    # run.sh adds a branch column and quotes descriptions holding a double quote.
    text = ("commit\tval_bpb\tmemory_gb\tstatus\tdescription\tbranch\n"
            "a1b2c3d\t1.100000\t10.0\tkeep\t[smoke] baseline\tautoresearch/x\n"
            'b2c3d4e\t1.000000\t10.0\tkeep\t"[smoke] say ""hi"" to RoPE"\tautoresearch/x\n')
    proc = run_analysis(tmp_path, text)
    assert proc.returncode == 0, proc.stderr
    assert "[smoke] all 2 rows are smoke runs" in proc.stdout
    assert '-0.100000  say "hi" to RoPE' in proc.stdout


def test_all_smoke_rows_are_flagged(tmp_path):
    proc = run_analysis(tmp_path, rows(
        ("a1b2c3d", "3.100000", "0.0", "keep", "[smoke] baseline"),
        ("b2c3d4e", "3.000000", "0.0", "keep", "[smoke] double the LR"),
    ))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "[smoke] all 2 rows are smoke runs" in out
    assert "experiments: 2  (kept 2" in out
    assert "-0.100000  double the LR" in out  # prefix dropped from the label
    assert_png(tmp_path / "progress.png")


def test_the_profile_column_marks_smoke_rows(tmp_path):
    path = tmp_path / "results.tsv"
    path.write_text("commit\tval_bpb\tmemory_gb\tstatus\tdescription\tbranch\tprofile\n"
                    "a1b2c3d\t3.100000\t0.0\tkeep\tbaseline\tautoresearch/x\tsmoke\n"
                    "b2c3d4e\t1.000000\t40.0\tkeep\t[smoke] looks like smoke\tautoresearch/x\tgpu\n"
                    "c3d4e5f\t0.990000\t40.0\tkeep\tbetter\tautoresearch/x\tgpu\n")
    proc = subprocess.run([sys.executable, ANALYSIS, str(path)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "[smoke] 1 smoke rows left out" in proc.stdout
    # the GPU rows, whatever a description says, are the report
    assert "experiments: 2 " in proc.stdout and "baseline 1.000000 -> best 0.990000" in proc.stdout


def test_mixed_smoke_rows_are_left_out(tmp_path):
    proc = run_analysis(tmp_path, rows(
        ("a1b2c3d", "3.100000", "0.0", "keep", "[smoke] baseline"),
        ("b2c3d4e", "1.000000", "40.0", "keep", "baseline"),
        ("c3d4e5f", "0.990000", "40.0", "keep", "bigger batch"),
    ))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "[smoke] 1 smoke rows left out" in out
    assert "experiments: 2  (kept 2" in out
    assert "baseline 1.000000 -> best 0.990000  (-1.00%)" in out


@pytest.mark.parametrize("bad_line, message", [
    ("c3d4e5f\tabc\t44.0\tdiscard\tbad number", "val_bpb 'abc' is not a number"),
    ("c3d4e5f\t1.0\tlots\tdiscard\tbad memory", "memory_gb 'lots' is not a number"),
    ("c3d4e5f\t1.0\t44.0\tmaybe\tbad status", "status 'maybe' is not one of"),
    ("c3d4e5f 1.0 44.0 keep spaces-not-tabs", "at least 5 tab-separated columns"),
])
def test_malformed_row_names_its_line(tmp_path, bad_line, message):
    text = rows(("a1b2c3d", "0.997900", "44.0", "keep", "baseline"),
                ("b2c3d4e", "0.993200", "44.2", "keep", "increase LR")) + bad_line + "\n"
    proc = run_analysis(tmp_path, text)
    assert proc.returncode == 1
    assert "line 4" in proc.stderr
    assert message in proc.stderr
    assert not (tmp_path / "progress.png").exists()


def test_missing_header(tmp_path):
    proc = run_analysis(tmp_path, "a1b2c3d\t0.997900\t44.0\tkeep\tbaseline\n")
    assert proc.returncode == 1
    assert "line 1" in proc.stderr and "header" in proc.stderr


def test_missing_file(tmp_path):
    proc = run_analysis(tmp_path, None)
    assert proc.returncode == 1
    assert "not found" in proc.stderr


# ------------------------------------------------------------ the held-out check
# run.sh writes results.tsv with branch, profile and decision columns, and the held-out scores
# to .git/autoresearch/heldout.tsv, which analysis.py finds through git.

RUN_SH_HEADER = "commit\tval_bpb\tmemory_gb\tstatus\tdescription\tbranch\tprofile\tdecision\n"
HELDOUT_HEADER = "commit\tval_bpb\tstatus\tbranch\tprofile\theldout_bpb\theldout_runs\tcheckout\ttime\n"
BR = "autoresearch/nov23"

# (commit, val_bpb, status, description, decision, held-out bpb or None)
VAL_ONLY_NIGHT = [
    ("a1b2c3d", "1.000000", "keep", "baseline", "baseline", "1.100000"),
    ("a1b2c3d", "1.001000", "rerun", "baseline noise", "-", "1.101000"),
    ("a1b2c3d", "0.999000", "rerun", "baseline noise 2", "-", "1.099500"),
    ("b2c3d4e", "0.990000", "keep", "increase LR", "single", "1.101000"),
    ("c3d4e5f", "1.020000", "discard", "GeLU", "single", "1.120000"),
    ("d4e5f6a", "0.000000", "crash", "OOM", "-", None),
    ("e5f6a7b", "0.980000", "keep", "warmup", "single", "1.100500"),
    ("f6a7b8c", "0.979500", "keep", "weight decay", "mean of 2 (0.979000, 0.980000; spread 0.001000)", "1.102000"),
]


def write_night(tmp_path, night, heldout=True):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "results.tsv").write_text(RUN_SH_HEADER + "".join(
        f"{c}\t{v}\t44.0\t{s}\t{d}\t{BR}\tgpu\t{dec}\n" for c, v, s, d, dec, _ in night))
    if heldout:
        (tmp_path / ".git/autoresearch").mkdir()
        (tmp_path / ".git/autoresearch/heldout.tsv").write_text(HELDOUT_HEADER + "".join(
            f"{c}\t{v}\t{s}\t{BR}\tgpu\t{h}\t{h}\t{tmp_path}\t2026-11-23 01:00:00\n"
            for c, v, s, _, _, h in night if h))


def chain_line(out, n):
    return next(line for line in out.splitlines() if line.startswith(f"  #{n:<4d}") and "kept chain" not in line
                and out.index(line) > out.index("kept chain"))


def test_validation_improves_but_heldout_does_not_says_so(tmp_path):
    write_night(tmp_path, VAL_ONLY_NIGHT)
    proc = run_analysis(tmp_path, None)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    # sigma, pooled: the baseline measured three times (1.000, 1.001, 0.999: 2e-6 squared deviations,
    # 2 degrees of freedom) and the confirmed keep's two runs (0.979, 0.980: 5e-7, 1): sqrt(2.5e-6 / 3)
    assert "noise: sigma 0.000913 val_bpb, 0.000764 held-out" in out and "5 runs of 2 commit(s)" in out
    assert "night: val_bpb  1.000000 -> 0.979500  (-0.020500, -22.5 sigma)" in out
    assert "night: held-out 1.100000 -> 1.102000  (+0.002000" in out
    assert "VERDICT: validation improved (-0.020500) but held-out did not (+0.002000)" in out
    # each keep against the one before it, on both splits, in units of the noise
    assert "-0.010000  -11.0    1.101000  +0.001000   +1.3" in chain_line(out, 4)
    assert "-0.000500   -0.5    1.102000  +0.001500   +2.0" in chain_line(out, 8)
    assert "[mean of 2 (0.979000, 0.980000; spread 0.001000)] weight decay" in chain_line(out, 8)
    assert "within the noise: 1 of 3 keeps (#8)" in out
    assert_png(tmp_path / "progress.png")
    with_panel = matplotlib.image.imread(str(tmp_path / "progress.png")).shape[0]
    proc = run_analysis(tmp_path, None, args=[str(tmp_path / "results.tsv"), "--no-heldout"])
    assert proc.returncode == 0, proc.stderr
    assert "1.102000" not in proc.stdout and "held-out: left out (--no-heldout)" in proc.stdout
    assert "VERDICT" not in proc.stdout and "within the noise: 1 of 3 keeps" in proc.stdout
    assert with_panel > 1.2 * matplotlib.image.imread(str(tmp_path / "progress.png")).shape[0]


def test_heldout_that_follows_validation_agrees(tmp_path):
    night = [row[:5] + (f"{float(row[1]) + 0.1:.6f}" if row[5] else None,) for row in VAL_ONLY_NIGHT]
    write_night(tmp_path, night)
    proc = run_analysis(tmp_path, None)
    assert proc.returncode == 0, proc.stderr
    assert "night: held-out 1.100000 -> 1.079500  (-0.020500" in proc.stdout
    assert "verdict: held-out agrees with validation within the noise" in proc.stdout
    assert "VERDICT" not in proc.stdout


def test_a_night_without_heldout_scores_or_reruns(tmp_path):
    write_night(tmp_path, [r for r in VAL_ONLY_NIGHT if r[2] != "rerun" and "mean" not in r[4]], heldout=False)
    proc = run_analysis(tmp_path, None)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "noise: unknown (no commit measured twice" in out
    assert "held-out: no scores found in" in out and "VERDICT" not in out
    assert "night: val_bpb  1.000000 -> 0.980000  (-0.020000, n/a sigma)" in out
