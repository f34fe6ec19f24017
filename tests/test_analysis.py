"""The morning report (analysis.py), run as the person runs it, on real files."""

import os
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


def test_each_split_has_its_own_noise_band_in_the_plot(tmp_path, monkeypatch):
    """The held-out split is scored on a quarter of validation's tokens, so its noise differs: the
    plot's kept-chain panel draws each split's band from its own sigma, not validation's for both."""
    import matplotlib.pyplot as plt
    write_night(tmp_path, VAL_ONLY_NIGHT)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(REPO))
    import analysis
    held = analysis.heldout_file("results.tsv")
    df = analysis.attach_heldout(analysis.read_results("results.tsv"), held)[0]
    shown, sigmas = analysis.report(df, "results.tsv", held)
    assert sigmas == pytest.approx((0.000913, 0.000764), abs=1e-6)  # as the report prints them (above)
    fig, ax = plt.subplots()
    analysis.plot_heldout(ax, shown[shown["status"] == "keep"], sigmas, 9)
    bands = {p.get_label().split(" noise")[0]: (p.get_y(), p.get_y() + p.get_height()) for p in ax.patches}
    plt.close(fig)
    assert bands == {"val_bpb": pytest.approx((-analysis.WITHIN * sigmas[0], analysis.WITHIN * sigmas[0])),
                     "held-out": pytest.approx((-analysis.WITHIN * sigmas[1], analysis.WITHIN * sigmas[1]))}


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


# ------------------------------------------------------------ the whole night
# Agents side by side, one per git worktree, each with its own results.tsv; a report run in one
# of them reads them all (the worktrees come from git, the code behind each row from the refs
# run.sh keeps for every commit it trained).

def commit_train_py(where, text, when, message):
    """A commit of train.py as run.sh makes one (its ref refs/autoresearch/tried/<hash>), at a
    given time; returns its 7 characters."""
    (where / "train.py").write_text(text)
    when = f"{1_795_000_000 + when} +0000"  # seconds into a night
    env = {"GIT_COMMITTER_DATE": when, "GIT_AUTHOR_DATE": when}
    git = ["git", "-C", str(where), "-c", "user.name=T", "-c", "user.email=t@e"]
    subprocess.run(git + ["add", "train.py"], check=True)
    subprocess.run(git + ["commit", "-q", "--allow-empty", "-m", message], check=True, env={**os.environ, **env})
    full = subprocess.run(git + ["rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    subprocess.run(git + ["update-ref", f"refs/autoresearch/tried/{full}", full], check=True)
    return full[:7]


def test_the_night_of_two_agents_one_report(tmp_path):
    main, wt = tmp_path / "main", tmp_path / "wt1"
    subprocess.run(["git", "init", "-q", "-b", "main", str(main)], check=True)
    (main / ".gitignore").write_text("results.tsv\nprogress.png\n")
    subprocess.run(["git", "-C", str(main), "add", ".gitignore"], check=True)
    commit_train_py(main, "v0\n", 1000, "initial")
    subprocess.run(["git", "-C", str(main), "switch", "-q", "-c", "autoresearch/gpu0"], check=True)
    subprocess.run(["git", "-C", str(main), "worktree", "add", "-q", "-b", "autoresearch/gpu1", str(wt), "main"],
                   check=True)
    undo = ["reset", "-q", "--hard", "HEAD~1"]  # a discard
    b0 = commit_train_py(main, "v0\n", 1001, "baseline")
    b1 = commit_train_py(wt, "v0\n", 1002, "baseline")
    v1 = commit_train_py(main, "v1\n", 1010, "v1")
    w1 = commit_train_py(wt, "w1\n", 1015, "w1")
    subprocess.run(["git", "-C", str(wt), *undo], check=True)
    v2 = commit_train_py(main, "v2\n", 1020, "v2")
    subprocess.run(["git", "-C", str(main), *undo], check=True)
    a1 = commit_train_py(wt, "v1\n", 1030, f"adopt autoresearch/gpu0 {v1}: its best")  # ./run.sh --adopt
    w2 = commit_train_py(wt, "v1 w2\n", 1040, "w2")
    night = {  # branch: (checkout, [(commit, val_bpb, status, description, held-out)])
        "autoresearch/gpu0": (main, [(b0, "1.000000", "keep", "baseline", "1.100000"),
                                     (v1, "0.980000", "keep", "v1", "1.080000"),
                                     (v2, "0.990000", "discard", "v2", "1.090000"),
                                     (v1, "0.981000", "rerun", "v1 noise", "1.081000")]),
        "autoresearch/gpu1": (wt, [(b1, "1.001000", "keep", "baseline", "1.101000"),
                                   (w1, "1.010000", "discard", "w1", None),
                                   (a1, "0.975000", "keep", f"adopt autoresearch/gpu0 {v1}: its best", "1.076000"),
                                   (w2, "0.970000", "keep", "w2", "1.070000"),
                                   (w2, "0.971000", "rerun", "w2 noise", "1.071000")]),
    }
    held = [HELDOUT_HEADER]
    for branch, (checkout, rows) in night.items():
        (checkout / "results.tsv").write_text(RUN_SH_HEADER + "".join(
            f"{c}\t{v}\t44.0\t{s}\t{d}\t{branch}\tgpu\t{'-' if s == 'rerun' else 'single'}\n" for c, v, s, d, _ in rows))
        held += [f"{c}\t{v}\t{s}\t{branch}\tgpu\t{h}\t{h}\t{checkout}\t-\n" for c, v, s, _, h in rows if h]
    (main / ".git/autoresearch").mkdir()
    (main / ".git/autoresearch/heldout.tsv").write_text("".join(held))

    proc = subprocess.run([sys.executable, str(ANALYSIS)], cwd=wt, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("autoresearch morning report: the night, 2 branch(es) in 2 worktree(s)\n")
    assert f"  {main / 'results.tsv'}: 4 rows (autoresearch/gpu0)" in out
    assert "experiments: 9  (kept 5, discarded 2, crashed 0, reruns 2)" in out
    # v1 (0.980, 0.981) on gpu0 and w2 (0.970, 0.971) on gpu1: sqrt(4 x 0.0005^2 / 2)
    assert "noise: sigma 0.000707 val_bpb, 0.000707 held-out" in out and "4 runs of 2 commit(s)" in out
    assert "across 2 agents" in out
    # the best, and where its code came from: git says so, whatever a description says
    assert f"best of the night: 0.970000  {w2} on autoresearch/gpu1 (#4 there)  w2\n" in out
    assert f"  built on autoresearch/gpu0's {v1} (#2 there, 0.980000), adopted at #3\n" in out
    agents = out.split("agents, best first:\n")[1].split("\n\n")[0].splitlines()
    assert [line.split()[0] for line in agents] == ["autoresearch/gpu1", "autoresearch/gpu0"]
    assert "baseline 1.001000 -> best 0.970000 (-3.10%)" in agents[0]
    # each agent's kept chain, held-out beside val_bpb, against the pooled noise
    gpu1 = out.split("== autoresearch/gpu1")[1].split("== ")[0]
    assert "experiments: 5  (kept 3, discarded 1, crashed 0, reruns 1)" in gpu1
    assert f"  #4    {w2}   0.970000  -0.005000   -7.1    1.070000  -0.006000   -8.5   w2" in gpu1
    assert "night: held-out 1.101000 -> 1.070000" in gpu1 and "noise: sigma" not in gpu1
    assert "== autoresearch/gpu0" in out
    assert_png(wt / "progress.png")
    image = matplotlib.image.imread(str(wt / "progress.png"))[..., :3]
    for colour in ((0x1f, 0x77, 0xb4), (0xff, 0x7f, 0x0e)):  # one running best per agent
        assert (abs(image - [c / 255 for c in colour]).max(axis=-1) < 0.02).sum() > 500

    # a named file is that file alone, as before
    proc = subprocess.run([sys.executable, str(ANALYSIS), str(main / "results.tsv")], cwd=wt,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"autoresearch morning report: {main / 'results.tsv'}\nexperiments: 4 " in proc.stdout
    assert "the night," not in proc.stdout and "gpu1" not in proc.stdout
