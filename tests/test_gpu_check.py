"""tests/gpu_check.sh, the one prepared device check, end to end on the CPU (--cpu: the smoke
profile, a small corpus), so that the one GPU attempt is never lost to a typo: the doctor, the
corpus and prepare.py --data, a cold run and a warm rerun through the real run.sh in a throw-away
repository, and the table of their figures."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench_run import PHASES
from gpu_check import DOCTOR_ITEMS, run, unpack

REPO = Path(__file__).resolve().parent.parent


def git_state():
    return subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--ignored"], capture_output=True,
                          text=True).stdout


def test_the_device_check_runs_end_to_end_on_the_cpu(tmp_path):
    out, home = tmp_path / "out", tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTORESEARCH_", "GPU_CHECK_"))}
    env.update(HOME=str(home), TMPDIR=str(tmp_path), AUTORESEARCH_PYTHON=sys.executable)
    before = git_state()
    p = subprocess.run(["bash", "tests/gpu_check.sh", "--cpu", str(out)], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=480)
    assert p.returncode == 0, p.stdout[-5000:] + p.stderr[-2000:]
    r = dict(line.split("\t", 1) for line in (out / "results.txt").read_text().splitlines())
    assert [f"doctor.{i}" in r for i in DOCTOR_ITEMS] == [True] * len(DOCTOR_ITEMS), r
    assert r["doctor.data"].startswith("ok ") and "checked again after step 2" in r["doctor.data"]
    assert r["doctor.gpu"] == "skip no GPU: only the smoke profile (AUTORESEARCH_SMOKE=1) will run"
    assert "MB of jsonl" in r["corpus"] and "Done:" in r["prepare"]
    assert (r["cold.status"], r["warm.status"]) == ("keep", "rerun"), r
    for run in ("cold", "warm"):
        assert r[f"{run}.sandbox"].startswith(("bubblewrap", "NONE")), r
        # (the harness's clock starts at the 32nd batch: on a loaded CPU the 5 s budget can end first)
        assert 0 <= float(r[f"{run}.training"]) < 20 and int(r[f"{run}.num_steps"]) > 10
        assert float(r.get(f"{run}.tokens_per_s", 1)) > 0  # (none under 1 M tokens: the summary's one decimal)
        phases = [float(r[f"{run}.{phase}"]) for phase in PHASES]
        assert abs(sum(phases) - float(r[f"{run}.outside"])) < 0.5
    assert r["reference.status"].startswith("skipped")  # it needs CUDA
    table = (out / "table.md").read_text()
    assert table.startswith("| | ours: first run (cold caches) | ours: rerun (warm caches) | reference train.py (cold) |")
    assert f"| **{float(r['cold.outside']):.1f}** | **{float(r['warm.outside']):.1f}** |" in table
    assert {f.name for f in out.iterdir()} <= {"results.txt", "table.md", "gpu_check.log", "doctor.txt", "cold.txt",
                                               "warm.txt", "reference.txt"}  # at most 8 files come back
    assert git_state() == before  # the checkout is as it was; the work went to a copy
    assert list(tmp_path.glob("gpu_check.*")) == []  # and the copy is gone


@pytest.mark.skipif(not shutil.which("dpkg-deb"), reason="dpkg-deb makes the package (CI's Debian has it)")
def test_a_carried_debian_package_unpacks_without_dpkg(tmp_path):
    """The device may have no git: gpu_check.sh unpacks Debian's, carried in .devdata, with Python alone."""
    pkg = tmp_path / "pkg"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "DEBIAN/control").write_text("Package: probe\nVersion: 1.0\nArchitecture: all\n"
                                        "Maintainer: t <t@example.com>\nDescription: a probe\n")
    (pkg / "usr/bin").mkdir(parents=True)
    (pkg / "usr/bin/probe").write_text("#!/bin/sh\necho probe ran\n")
    (pkg / "usr/bin/probe").chmod(0o755)
    (pkg / "usr/bin/alias").symlink_to("probe")
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(pkg), str(tmp_path / "probe.deb")], check=True,
                   capture_output=True)
    unpack(tmp_path / "probe.deb", tmp_path / "out")
    ran = subprocess.run([tmp_path / "out/usr/bin/alias"], capture_output=True, text=True)
    assert ran.stdout == "probe ran\n" and not (tmp_path / "out/DEBIAN").exists()
    (tmp_path / "not.deb").write_text("plain text")
    with pytest.raises(SystemExit, match="is not a Debian package"):
        unpack(tmp_path / "not.deb", tmp_path / "out2")


def test_the_steady_state_figures_from_a_gpu_run_log(tmp_path, capsys):
    """tokens/s over the counted steps, from train.py's summary: the README's H100 run (901 steps,
    472.4 M tokens, 300.3 s) gives the 1.55 M tokens/s its table states, and a smoke run's
    summary, whose total_tokens_M is 0.0, gives none rather than 0."""
    log = tmp_path / "run.log"
    log.write_text("Device: NVIDIA H100 80GB HBM3 (bf16 peak 989.5 TFLOP/s)\nstep 00900 ...\n---\n"
                   "val_bpb:          nan\ntraining_seconds: 300.3\nmfu_percent:      37.59\n"
                   "total_tokens_M:   472.4\nnum_steps:        901\npeak_vram_mb:     45061.2\n")
    (tmp_path / "report").write_text("status:       keep\nval_bpb:      0.595645\n")
    run("cold", tmp_path / "report", log, tmp_path / "no-cache")
    r = dict(line.split("\t", 1) for line in capsys.readouterr().out.splitlines())
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    stated = re.search(r"^\| tokens/s \(counted steps\) \| ([\d.]+) M \|$", readme, re.M).group(1)
    assert abs(int(r["cold.tokens_per_s"]) / 1e6 - float(stated)) < 0.01  # (the README's 1.55 is 1.5557, cut)
    assert (r["cold.device"], r["cold.mfu_percent"], r["cold.status"]) == ("NVIDIA H100 80GB HBM3", "37.59", "keep")
    log.write_text(log.read_text().replace("472.4", "0.0"))
    run("cold", tmp_path / "report", log, tmp_path / "no-cache")
    assert "cold.tokens_per_s" not in capsys.readouterr().out
