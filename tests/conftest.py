"""Fixtures for the tests that drive the real agent CLIs (test_agent_claude.py, test_agent_codex.py),
and the test Slurm cluster (test_run_sh.py, test_agent_claude.py).

The CLIs are pinned in tests/package.json and installed by `.ci/run` with
`npm ci --prefix tests` into tests/node_modules (ignored by git); without them
those tests skip. Likewise Slurm: `.ci/run` installs Debian's slurm-wlm and munge
and starts a single-node cluster (tests/slurm/start.sh); without them the Slurm
tests skip.
"""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parent.parent
NPM_BIN = REPO / "tests" / "node_modules" / ".bin"
PY = sys.executable


@pytest.fixture(scope="session")
def smoke_cache(tmp_path_factory):
    """The smoke profile's prepared data, once per test session (a few seconds)."""
    cache = tmp_path_factory.mktemp("agent-cache")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_")}
    env.update(AUTORESEARCH_SMOKE="1", AUTORESEARCH_CACHE=str(cache))
    prep = subprocess.run([PY, "prepare.py"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert prep.returncode == 0, prep.stdout + prep.stderr
    return cache


@pytest.fixture(scope="session")
def slurm():
    """A single-node Slurm cluster on this machine (CPU only), as the environment that selects it:
    tests/slurm/start.sh starts it unless it is up (.ci/run starts it first)."""
    missing = [t for t in ("srun", "scancel", "slurmctld", "slurmd", "munged") if not shutil.which(t)]
    if missing:
        pytest.skip(f"Slurm is not installed (no {', '.join(missing)}): apt-get install slurm-wlm munge, as .ci/run does")
    if os.geteuid() != 0:
        pytest.skip("the test cluster (tests/slurm/start.sh) runs its daemons as root")
    start = subprocess.run([str(REPO / "tests" / "slurm" / "start.sh")], capture_output=True, text=True, timeout=120)
    assert start.returncode == 0, start.stdout + start.stderr
    return {"SLURM_CONF": start.stdout.strip()}


def slurm_jobs(env, *args):
    """squeue's lines for this cluster's jobs: id, name, state (pending, running, completing by
    default; args such as ("-t", "all") for all it remembers)."""
    out = subprocess.run(["squeue", "-h", "-o", "%i %j %T", *args], env={**os.environ, **env},
                         capture_output=True, text=True, check=True)
    return [line.split() for line in out.stdout.splitlines()]


@pytest.fixture
def workspace(tmp_path, smoke_cache):
    """A fresh clone of the committed HEAD on main, with a HOME of its own, in the smoke profile.

    The agent CLIs keep their state (trust, sessions, config) under HOME, so a
    test never sees the person's own and never leaves anything there.
    """
    repo, home = tmp_path / "repo", tmp_path / "home"
    home.mkdir()
    subprocess.run(["git", "clone", "-q", str(REPO), str(repo)], check=True)
    git(repo, "switch", "-q", "-C", "main")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AUTORESEARCH_", "ANTHROPIC_", "CLAUDE", "OPENAI_", "CODEX_", "XDG_"))}
    env.update(HOME=str(home), PATH=f"{NPM_BIN}{os.pathsep}{env.get('PATH', '')}",
               AUTORESEARCH_SMOKE="1", AUTORESEARCH_CACHE=str(smoke_cache), AUTORESEARCH_PYTHON=PY,
               AUTORESEARCH_TAG="agent", AUTORESEARCH_TIMEOUT="300",
               DISABLE_AUTOUPDATER="1", CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1")
    return SimpleNamespace(repo=repo, home=home, env=env)


def git(repo, *args):
    out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def snapshot(repo):
    """What a refused call must leave as it was: every file, git's config, hooks and refs.

    (Not the rest of .git: git itself refreshes the index when asked for a status.)
    """
    files = {}
    for path in sorted(repo.rglob("*")):
        rel = path.relative_to(repo)
        if rel.parts[0] == ".git" and rel.parts[1:2] not in [("config",), ("hooks",), ("info",)]:
            continue
        if path.is_file() and not path.is_symlink() and "__pycache__" not in rel.parts:
            files[str(rel)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"files": files, "refs": git(repo, "for-each-ref"), "head": git(repo, "symbolic-ref", "HEAD")}


def changed(before, after):
    """Paths added, removed or modified between two snapshots, plus 'refs'/'HEAD' if those moved."""
    a, b = before["files"], after["files"]
    out = sorted(p for p in a.keys() | b.keys() if a.get(p) != b.get(p))
    return out + [k for k in ("refs", "head") if before[k] != after[k]]


def results(repo):
    """results.tsv as (status, description) pairs."""
    path = repo / "results.tsv"
    if not path.exists():
        return []
    rows = [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()[1:] if line]
    return [(r[3], r[4]) for r in rows]


def stand_ins(ws, tmp_path, train):
    """run.sh's stand-ins for prepare.py and train.py (tests/test_run_sh.py), committed on main, with
    their prepared data: each run takes seconds."""
    from test_run_sh import PREPARE, Repo
    cache = tmp_path / "cache"
    for d in (cache, cache / "smoke"):
        d.mkdir(parents=True)
        Repo.prepare_data(d)
    ws.env["AUTORESEARCH_CACHE"] = str(cache)
    (ws.repo / "prepare.py").write_text(PREPARE)
    (ws.repo / "train.py").write_text(train)
    git(ws.repo, "-c", "user.name=T", "-c", "user.email=t@example.com", "commit", "-qam", "stand-ins")
