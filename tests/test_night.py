""".agents/night.py's many agents, without an agent CLI: what it refuses, and the environment each
agent starts with (its worktree, branch, GPU and CPU threads).

A stand-in `claude` on PATH writes its environment and exits; when every agent has written its
own it creates the stop file, so a night takes a second or two (another stand-in leaves a process
behind, as a shell tool may). The real CLI, its sessions and
run.sh under the supervisor are tests/test_agent_claude.py's (--gpus, and --agents through Slurm).
"""

import os
import re
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from conftest import REPO, git

FAKE_CLAUDE = """#!/bin/sh
env > "$FAKE_OUT/$(basename "$PWD").env"
[ "$(ls "$FAKE_OUT" | wc -l)" -lt "$FAKE_AGENTS" ] || touch "$FAKE_STOP"
"""


@pytest.fixture
def clone(tmp_path):
    """A clone of the committed HEAD on main, and a stand-in claude on PATH."""
    repo, bin_dir, out = tmp_path / "repo", tmp_path / "bin", tmp_path / "out"
    subprocess.run(["git", "clone", "-q", str(REPO), str(repo)], check=True)
    git(repo, "switch", "-q", "-C", "main")
    bin_dir.mkdir()
    out.mkdir()
    (bin_dir / "claude").write_text(FAKE_CLAUDE)
    (bin_dir / "claude").chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AUTORESEARCH_", "CUDA_", "OMP_", "ANTHROPIC_", "CLAUDE"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", AUTORESEARCH_PYTHON=sys.executable,
               FAKE_OUT=str(out), FAKE_STOP=str(repo / ".agents" / "stop"))
    return SimpleNamespace(repo=repo, out=out, env=env, tmp=tmp_path)


def night(c, *args, agents=1, **env):
    """night.py ARGS with ENV; a night of AGENTS stand-in agents, each once, then the stop file."""
    proc = subprocess.run([sys.executable, str(c.repo / ".agents" / "night.py"), "--pause", "60", *args],
                          cwd=c.repo, env=dict(c.env, FAKE_AGENTS=str(agents), **env), capture_output=True,
                          text=True, timeout=120)
    return proc


def agent_env(c, name):
    lines = (c.out / f"repo-{name}.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line)


def test_gpus_under_slurm_and_agents_without_it_are_refused(clone):
    c = clone
    for args, env, says in (
            (["--gpus", "0,1"], {"AUTORESEARCH_SLURM": "1"}, "use --agents N"),
            (["--gpus", "all"], {"AUTORESEARCH_SLURM": "--partition=gpu"}, "use --agents N"),
            (["--agents", "2"], {}, "give each agent a GPU of its own with --gpus"),
            (["--agents", "2"], {"AUTORESEARCH_SLURM": ""}, "give each agent a GPU of its own with --gpus"),
            (["--agents", "2"], {"AUTORESEARCH_SLURM": "0"}, "give each agent a GPU of its own with --gpus"),
            (["--agents", "0"], {"AUTORESEARCH_SLURM": "1"}, "--agents wants a number of agents, 1 or more, not '0'"),
            (["--agents", "two"], {"AUTORESEARCH_SLURM": "1"}, "--agents wants a number of agents")):
        proc = night(c, *args, **env)
        assert proc.returncode == 1 and says in proc.stderr, (args, env, proc.stderr)
        assert "ERROR" in proc.stderr and "session" not in proc.stderr
    proc = night(c, "--gpus", "0", "--agents", "2", AUTORESEARCH_SLURM="1")
    assert proc.returncode == 2 and "not allowed with argument" in proc.stderr, proc.stderr
    # Nothing made: no worktree, no agent started.
    assert sorted(p.name for p in c.tmp.iterdir()) == ["bin", "out", "repo"]
    assert list(c.out.iterdir()) == [] and git(c.repo, "worktree", "list").count("\n") == 0


def test_agents_under_slurm_have_worktrees_and_branches_and_no_gpu(clone):
    c = clone
    proc = night(c, "--agents", "2", agents=2, AUTORESEARCH_SLURM="--partition=gpu")
    assert proc.returncode == 0, proc.stderr
    assert "agent1, agent2 (each experiment a Slurm job)" in proc.stderr
    for i in (1, 2):
        wt, env = c.tmp / f"repo-agent{i}", agent_env(c, f"agent{i}")
        assert f"made the worktree {wt} from main" in proc.stderr
        assert env["PWD"] == str(wt) and git(wt, "rev-parse", "HEAD") == git(c.repo, "rev-parse", "main")
        assert re.fullmatch(rf"[a-z]{{3}}\d\d-agent{i}", env["AUTORESEARCH_TAG"]), env
        assert env["AUTORESEARCH_SLURM"] == "--partition=gpu" and env["AUTORESEARCH_PYTHON"] == sys.executable
        # Slurm gives each job its GPU and its node's CPUs: nothing pinned here.
        assert not {"CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "OMP_NUM_THREADS"} & env.keys(), env
    log = (c.repo / ".agents" / "night.log").read_text()
    assert " agent1] session 1 starts" in log and " agent2] session 1 starts" in log
    assert "night over for all 2 agents" in log
    # A second night reuses them; a worktree on another agent's branch is refused.
    for f in c.out.iterdir():
        f.unlink()
    proc = night(c, "--agents", "2", agents=2, AUTORESEARCH_SLURM="1")
    assert proc.returncode == 0 and f"reusing the worktree {c.tmp / 'repo-agent2'} (detached)" in proc.stderr
    git(c.tmp / "repo-agent1", "switch", "-q", "-c", "autoresearch/x-agent2")
    proc = night(c, "--agents", "1", AUTORESEARCH_SLURM="1")
    assert proc.returncode == 1 and "not on a branch of agent 1's (autoresearch/<tag>-agent1)" in proc.stderr


def test_agents_on_one_machine_share_its_cpus(clone):
    """--gpus 0,1: each agent's OMP_NUM_THREADS is the CPUs // 2, unless the person set it; one agent
    alone is left torch's default."""
    c = clone
    cpus = len(os.sched_getaffinity(0))
    for omp, want in ((None, str(max(1, cpus // 2))), ("3", "3")):
        for f in c.out.iterdir():
            f.unlink()
        proc = night(c, "--gpus", "0,1", agents=2, **({"OMP_NUM_THREADS": omp} if omp else {}))
        assert proc.returncode == 0, proc.stderr
        for n in (0, 1):
            env = agent_env(c, f"gpu{n}")
            assert env["CUDA_VISIBLE_DEVICES"] == str(n) and env["OMP_NUM_THREADS"] == want, env
        assert (f"OMP_NUM_THREADS={want} for each agent" in proc.stderr) == (omp is None)
    for f in c.out.iterdir():
        f.unlink()
    proc = night(c, "--gpus", "1")
    assert proc.returncode == 0, proc.stderr
    assert "OMP_NUM_THREADS" not in agent_env(c, "gpu1")


# A stand-in claude whose shell tool, like Claude Code's, runs in a session of its own (setsid): it
# leaves a process that would write "late" after 3 s, then asks to stop, or ends its turn, or waits.
LEAVES_A_PROCESS = """#!/bin/sh
setsid sh -c 'sleep 3; touch "$FAKE_OUT/late"' </dev/null >/dev/null 2>&1 &
touch "$FAKE_OUT/started"
[ -z "$FAKE_STOP_NOW" ] || touch "$FAKE_STOP"
sleep "${FAKE_SLEEP:-0}"
"""


@pytest.mark.parametrize("how", ["stopped", "ended its turn", "interrupted"])
def test_nothing_an_agent_started_outlives_its_session(clone, how):
    """A stopped agent, one that ended its turn, or a night interrupted (SIGTERM, as Ctrl-C): the
    agent is ended with all it started, though that runs in a session of its own (an agent's process
    group alone missed it: a ./run.sh started then could run after the night, or beside the next
    session)."""
    c = clone
    (c.tmp / "bin" / "claude").write_text(LEAVES_A_PROCESS)
    if how == "stopped":
        proc = night(c, FAKE_STOP_NOW="1", FAKE_SLEEP="30")
        assert "night over (stop file .agents/stop found) after 1 session(s)" in proc.stderr, proc.stderr
        assert proc.returncode == 0, proc.stderr
    elif how == "ended its turn":
        proc = night(c, "--for", "2s")  # one session (the pause is 60 s), then the deadline
        assert "session 1 ended (exit status 0)" in proc.stderr and "night over (deadline reached)" in proc.stderr
        assert proc.returncode == 0, proc.stderr
    else:
        p = subprocess.Popen([sys.executable, str(c.repo / ".agents" / "night.py")], cwd=c.repo,
                             env=dict(c.env, FAKE_AGENTS="1", FAKE_SLEEP="30"), stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 30
        while not (c.out / "started").exists() and time.time() < deadline:
            time.sleep(0.05)
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=20) == 130, p.stderr.read()
    time.sleep(4)
    assert (c.out / "started").exists() and not (c.out / "late").exists()
