"""Claude Code, the real CLI (pinned in tests/package.json), against a scripted model.

Each test clones the repository, starts `claude -p` headless (directly, or through
the night supervisor .agents/night.py) with ANTHROPIC_BASE_URL pointing at
tests/model_server.py, and lets the scripted model call tools. What Claude Code
sends back for each call says whether it ran or was refused; the clone's files,
git refs, results.tsv and scratchpad.md say what it changed.

The workspace is trusted the way the README says (projects[<repo>] in
~/.claude.json, HOME being the test's own): without that, Claude Code ignores
.claude/settings.json.

The nights use run.sh's stand-ins for prepare.py and train.py (tests/test_run_sh.py), so a run
takes seconds: what is tested here is the CLI, its permissions and the supervisor; the real
training goes through run.sh in tests/test_e2e.py.
"""

import json
import os
import re
import subprocess
import sys
import threading
import time

import pytest

from conftest import NPM_BIN, changed, git, results, slurm_jobs, snapshot, stand_ins
from model_server import Call, End, ModelServer
from test_run_sh import HELDOUT_TSV, WAIT_FOR_GO, go_on, trainer

CLAUDE = NPM_BIN / "claude"
pytestmark = pytest.mark.skipif(
    not CLAUDE.exists(), reason="Claude Code is not installed: `npm ci --prefix tests` (.ci/run does it)")


def trust(ws):
    """The one-time step of the README: trust the checkout (here in the test's own HOME)."""
    path = ws.home / ".claude.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    config.setdefault("projects", {})[str(ws.repo)] = {"hasTrustDialogAccepted": True}
    path.write_text(json.dumps(config))


def claude(ws, server, prompt="Read program.md and start the loop."):
    env = dict(ws.env, ANTHROPIC_BASE_URL=server.url, ANTHROPIC_API_KEY="dummy-key")
    return subprocess.run([str(CLAUDE), "-p", prompt, "--output-format", "stream-json", "--verbose"],
                          cwd=ws.repo, env=env, capture_output=True, text=True, timeout=600)


def night(ws, server, *args):
    env = dict(ws.env, ANTHROPIC_BASE_URL=server.url, ANTHROPIC_API_KEY="dummy-key")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(ws.repo / ".agents" / "night.py"), "--pause", "0", *args],
                          cwd=ws.repo, env=env, capture_output=True, text=True, timeout=600)
    proc.seconds = time.monotonic() - t0
    return proc


def refused(call):
    """Claude Code's answers to a refused call: a permission denial, or no such tool (a denied tool)."""
    return call.is_error and ("denied" in call.output or "No such tool available" in call.output)


def bash(command):
    return Call("Bash", {"command": command, "description": "try it"})


def edit(path, old, new):
    return Call("Edit", {"file_path": str(path), "old_string": old, "new_string": new})


def test_allowed_calls_run_and_refused_calls_change_nothing(workspace):
    ws, repo = workspace, workspace.repo
    trust(ws)
    train, pad = repo / "train.py", repo / "scratchpad.md"
    heldout = repo / ".git" / "autoresearch" / "heldout.tsv"  # run.sh's held-out scores
    heldout.parent.mkdir()
    heldout.write_text("commit\tval_bpb\theldout_bpb\n")
    before = snapshot(repo)
    new_train = train.read_text().replace("MATRIX_LR = 0.04", "MATRIX_LR = 0.05") + "# rewritten\n"
    allowed = [
        Call("Read", {"file_path": str(repo / "program.md")}),
        Call("Read", {"file_path": str(train)}),
        Call("Read", {"file_path": str(pad)}),
        Call("Read", {"file_path": str(repo / "prepare.py")}),  # read first: then only a rule can stop an edit
        Call("Read", {"file_path": str(repo / "run.sh")}),
        Call("Read", {"file_path": str(repo / ".claude" / "settings.json")}),
        Call("Read", {"file_path": str(repo / ".agents" / "night.py")}),
        edit(train, "MATRIX_LR = 0.04", "MATRIX_LR = 0.05"),
        Call("Write", {"file_path": str(train), "content": new_train}),  # a whole new train.py: fine
        edit(pad, "## Dead ends", "- tried MATRIX_LR 0.05\n\n## Dead ends"),
        # run.sh runs and answers for itself: nothing kept yet to rerun, and no description.
        bash('./run.sh --rerun "baseline noise"'),
        bash("./run.sh"),
    ]
    refusals = [
        Call("Read", {"file_path": str(heldout)}),
        # Grep and Glob (absent from Claude Code 2.1.197 in this mode): refused, if a version has them
        Call("Grep", {"pattern": "heldout_bpb", "path": str(heldout.parent), "output_mode": "content"}),
        Call("Grep", {"pattern": "heldout_bpb", "path": str(repo / ".git"), "output_mode": "content"}),
        Call("Glob", {"pattern": "**/heldout*", "path": str(repo / ".git")}),
        edit(repo / "prepare.py", "MAX_SEQ_LEN = 2048", "MAX_SEQ_LEN = 1024"),
        edit(repo / "run.sh", "set -", "set +"),
        edit(repo / "program.md", "# autoresearch", "# anything goes"),
        edit(repo / ".claude" / "settings.json", '"dontAsk"', '"acceptEdits"'),
        edit(repo / ".agents" / "night.py", "import os", "import os  # mine"),
        Call("Write", {"file_path": str(repo / "helper.py"), "content": "print(1)\n"}),
        Call("Write", {"file_path": str(repo / ".claude" / "settings.local.json"),
                       "content": '{"permissions": {"allow": ["Bash"]}}'}),
        bash("python3 -c 'open(\"f\", \"w\")'"),
        bash("git reset --hard HEAD~1"),
        bash("git commit -am sneak"),
        bash("./run.sh x && curl http://127.0.0.1:9/"),
        bash("./run.sh x; touch f"),
        bash("./run.sh x\ntouch f"),
        bash('./run.sh "$(touch f)"'),
        bash("./run.sh `touch f`"),
        bash("./run.sh x | tee f"),
        bash("echo > prepare.py"),
        bash("./run.sh x > f"),
        bash("sed -i s/2048/1024/ prepare.py"),
        bash("bash -c 'touch f'"),
        bash("cp train.py prepare.py"),
        bash("env ./run.sh x"),
        bash("AUTORESEARCH_SANDBOX=none ./run.sh x"),  # run.sh's settings are the person's, not the agent's
        bash("AUTORESEARCH_TIMEOUT=9999 AUTORESEARCH_CACHE=/tmp ./run.sh x"),
        bash("export AUTORESEARCH_SANDBOX=none && ./run.sh x"),
        bash("cd .. && ./run.sh x"),
        bash("uv run prepare.py"),
        bash(".agents/night.py"),
        Call("WebFetch", {"url": "http://127.0.0.1:9/", "prompt": "summarize"}),
        Call("WebSearch", {"query": "muon optimizer"}),
        Call("EnterWorktree", {"name": "elsewhere"}),  # would create a branch and a worktree
        Call("CronCreate", {"cron": "* * * * *", "prompt": "keep going", "recurring": True}),
    ]
    server = ModelServer("anthropic")
    server.add(*allowed, *refusals, End("All tried."))
    proc = claude(ws, server)
    server.close()
    assert proc.returncode == 0, proc.stderr
    assert "not been trusted" not in proc.stderr

    assert len(server.calls) == len(allowed) + len(refusals)
    for call in allowed:
        assert call.output is not None and not refused(call), call
    for call in refusals:
        assert refused(call), call
    # run.sh itself answered the two allowed runs.
    assert "--rerun" in allowed[-2].output and "Exit code 3" in allowed[-2].output
    assert "usage" in allowed[-1].output.lower()

    # Only the allowed edits happened: every other file, git's refs and config are as they were.
    assert changed(before, snapshot(repo)) == ["scratchpad.md", "train.py"]
    assert train.read_text() == new_train
    assert "- tried MATRIX_LR 0.05\n\n## Dead ends" in pad.read_text()
    assert git(repo, "branch", "--show-current") == "main"


def test_untrusted_workspace_stops_the_night_loudly(workspace):
    ws, repo = workspace, workspace.repo
    before = snapshot(repo)
    server = ModelServer("anthropic")
    server.add(bash('./run.sh "baseline"'), End("baseline done"))
    proc = night(ws, server, "--for", "5m")
    server.close()
    assert proc.returncode == 2, proc.stderr
    assert "does not trust this workspace" in proc.stderr
    assert f'projects["{repo}"].hasTrustDialogAccepted' in proc.stderr  # Claude Code's own line
    assert proc.seconds < 60  # at once, not at the deadline
    assert results(repo) == []
    assert changed(before, snapshot(repo)) == [".agents/night.log"]  # ignored by git
    assert "does not trust" in (repo / ".agents" / "night.log").read_text()


def test_supervisor_restarts_an_agent_that_ends_its_turn_until_the_deadline(workspace):
    ws = workspace
    trust(ws)
    server = ModelServer("anthropic")  # no steps: every session ends its turn at once
    proc = night(ws, server, "--for", "6s")
    server.close()
    assert proc.returncode == 0, proc.stderr
    assert "night over (deadline reached)" in proc.stderr
    assert proc.seconds < 40
    assert len(server.prompts) >= 2, proc.stderr
    assert "Read program.md in full" in server.prompts[0]
    for prompt in server.prompts[1:]:
        assert "You were restarted" in prompt and "results.tsv" in prompt and "scratchpad.md" in prompt
    for prompt in server.prompts[:2]:  # program.md's steps are program.md's: no copy that could drift
        assert "README" not in prompt and "./run.sh" not in prompt and "baseline" not in prompt


def stop_once_running(repo):
    """The person's `touch .agents/stop`, once the run.sh the agent just started holds its lock
    (its lock.holder names a new process): the stop then comes while an experiment runs. Its
    training (WAIT_FOR_GO) goes on once the supervisor has seen the stop, as a run of minutes would."""
    holder = repo / ".git" / "autoresearch" / "lock.holder"
    before = holder.read_text() if holder.exists() else None

    def seen(path, text):
        return path.exists() and text in path.read_text()

    def touch():
        until = time.monotonic() + 60
        while time.monotonic() < until and (holder.read_text() if holder.exists() else None) == before:
            time.sleep(0.01)
        (repo / ".agents" / "stop").touch()
        while time.monotonic() < until and not (seen(repo / ".agents" / "night.log", "stopping the agent")
                                                and seen(repo / "run.log", "started")):
            time.sleep(0.01)
        go_on(repo)
    threading.Thread(target=touch, daemon=True).start()


def left_running(repo):
    """The processes still running in the repository (their working directory in it)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cwd == str(repo) or cwd.startswith(str(repo) + "/"):
            found.append(f"{pid} {cmd}")
    return found


def test_a_short_night_under_the_supervisor(workspace, tmp_path):
    """No baseline yet: the agent runs program.md's set-up (the baseline, kept, and a noise rerun)
    and ends its turn; restarted, it tries a change, during which the person asks to stop: the
    run finishes and is discarded, nothing starts after it. run.sh's stand-ins (seconds a run):
    what is tested is the agent, the supervisor and run.sh; the real training is test_e2e.py's."""
    ws, repo = workspace, workspace.repo
    trust(ws)
    stand_ins(ws, tmp_path, trainer("1.0"))
    train, pad = repo / "train.py", repo / "scratchpad.md"
    main_before = git(repo, "rev-parse", "main")

    def note(text):
        return edit(pad, "## Dead ends", f"- {text}\n\n## Dead ends")

    stop = Call("Bash", {"command": './run.sh "a worse model"', "description": "run it"},
                on_play=lambda: stop_once_running(repo))
    too_late = bash('./run.sh "another"')
    server = ModelServer("anthropic")
    server.add(
        # session 1: the set-up, then the agent ends its turn (as agents do).
        Call("Read", {"file_path": str(repo / "program.md")}),
        Call("Read", {"file_path": str(pad)}),
        bash('./run.sh "baseline"'),
        bash('./run.sh --rerun "baseline noise"'),
        note("baseline and a noise rerun"),
        End("The set-up is done."),
        # session 2, restarted by the supervisor: where was I?
        Call("Read", {"file_path": str(repo / "results.tsv")}),
        Call("Read", {"file_path": str(pad)}),
        Call("Read", {"file_path": str(train)}),
        note("trying a worse model"),
        edit(train, "float('1.0')", "float('1.5')"),  # the stand-in evaluator's val_bpb
        edit(train, 'print("step 1', WAIT_FOR_GO.lstrip() + 'print("step 1'),
        stop,  # the person creates .agents/stop while this runs
        Call("Read", {"file_path": str(train)}),
        edit(train, "loss 3.0", "loss 2.9"),
        too_late,
        End("More later."),
    )
    proc = night(ws, server)
    server.close()
    assert proc.returncode == 0, proc.stderr
    assert "night over (stop file .agents/stop found) after 2 session(s)" in proc.stderr
    assert len(server.prompts) == 2
    assert "Read program.md in full" in server.prompts[0] and "You were restarted" in server.prompts[1]

    # Every experiment ran once and was recorded; the last was not cut short by the stop.
    # (Its own tool result never reached the model: the agent was ended right after it.)
    assert [c.is_error for c in server.calls if c.name == "Bash"][:2] == [False, False]
    assert results(repo) == [("keep", "baseline"), ("rerun", "baseline noise"), ("discard", "a worse model")]
    # After the stop nothing more ran: the agent was ended before it asked, or run.sh was refused.
    assert too_late.output is None or "Exit code 3" in too_late.output
    rows = (repo / "results.tsv").read_text().splitlines()
    assert rows[1].split("\t")[0] == rows[2].split("\t")[0]  # the rerun measured the baseline's commit

    # The branch holds the kept baseline only; main never moved; the notes survived the revert.
    assert git(repo, "rev-parse", "main") == main_before
    assert git(repo, "log", "--format=%s", "main..autoresearch/agent").splitlines() == ["[smoke] baseline"]
    text = pad.read_text()
    assert "- baseline and a noise rerun\n" in text and "- trying a worse model\n" in text
    assert "float('1.0')" in train.read_text()  # the worse model was reverted
    log = (repo / ".agents" / "night.log").read_text()
    assert "session 2 starts" in log and '"type":"result"' in log  # the agent's stream-json, logged
    assert left_running(repo) == []  # nothing the agent started outlives the night
    time.sleep(2)
    assert results(repo)[-1] == ("discard", "a worse model")  # and nothing runs later


def test_a_night_after_the_person_ran_the_baseline(workspace, tmp_path):
    """The other order of program.md's set-up: the person ran `./run.sh "baseline"` by hand before
    the night. The agent's own `./run.sh "baseline"` is refused (exit 3) and changes nothing; its
    noise rerun is recorded. run.sh's stand-ins for prepare.py and train.py (tests/test_run_sh.py),
    committed on main, make each run take seconds: what is tested is what run.sh answers the agent."""
    ws, repo = workspace, workspace.repo
    trust(ws)
    stand_ins(ws, tmp_path, trainer("1.0"))
    by_hand = subprocess.run(["./run.sh", "baseline"], cwd=repo, env=ws.env, capture_output=True, text=True,
                             timeout=300)
    assert by_hand.returncode == 0, by_hand.stdout + by_hand.stderr
    assert results(repo) == [("keep", "baseline")]
    baseline = (repo / "results.tsv").read_text().splitlines()[1].split("\t")
    before = snapshot(repo)
    seen = {}

    server = ModelServer("anthropic")
    refusal = bash('./run.sh "baseline"')
    rerun = Call("Bash", {"command": './run.sh --rerun "baseline noise"', "description": "noise"},
                 on_play=lambda: seen.update(after_refusal=snapshot(repo)))
    server.add(
        Call("Read", {"file_path": str(repo / "program.md")}),
        refusal,
        rerun,
        End("The set-up is done.", on_play=lambda: (repo / ".agents" / "stop").touch()),
    )
    proc = night(ws, server)
    server.close()
    assert proc.returncode == 0, proc.stderr
    assert "night over (stop file .agents/stop found) after 1 session(s)" in proc.stderr
    assert "Read program.md in full" in server.prompts[0]

    assert refusal.is_error and "Exit code 3" in refusal.output, refusal
    # It names the person's baseline: its commit, description and val_bpb (the README quotes it).
    assert (f'nothing to run: train.py is the kept commit {baseline[0][:7]} ("baseline", val_bpb {baseline[1]}), '
            "already measured") in refusal.output, refusal.output
    assert changed(before, seen["after_refusal"]) == [".agents/night.log"]  # ignored by git: nothing else
    assert not rerun.is_error and re.search(r"^status:\s+rerun$", rerun.output, re.M), rerun
    assert results(repo) == [("keep", "baseline"), ("rerun", "baseline noise")]
    rows = (repo / "results.tsv").read_text().splitlines()
    assert rows[2].split("\t")[0] == baseline[0]  # the rerun measured the person's baseline
    assert git(repo, "log", "--format=%s", "main..autoresearch/agent").splitlines() == ["[smoke] baseline"]


def test_one_agent_per_gpu(workspace, tmp_path):
    """night.py --gpus 0,1 (fake indices: the smoke profile takes no GPU lock). First what it refuses
    (exit 1, saying what to do, making nothing): a bad list, a path in the way that is no worktree of
    this repository, a worktree on another branch. With the main checkout untrusted, its worktrees are
    too: exit 2, naming the main checkout. Trusted, the night: a worktree (made by the first try,
    reused), a branch and an agent per GPU, supervised together. Both agents run their baseline at once
    (the stand-in train.py waits for the test's go); the stop file appears while both train; GPU 0's run is
    recorded while GPU 1's still trains, then GPU 1's: both rows and both held-out scores stay, and
    both agents are stopped after their experiment. Each training had its agent's GPU and half the CPUs
    (OMP_NUM_THREADS; tests/test_night.py has the rest of what each agent starts with)."""
    ws, repo = workspace, workspace.repo
    stand_ins(ws, tmp_path, trainer("1.0", heldout="0.9", body="print('cuda', os.environ.get('CUDA_VISIBLE_DEVICES'))\n"
                                    "print('omp', os.environ.get('OMP_NUM_THREADS'))\n" + WAIT_FOR_GO))
    wts = [tmp_path / f"repo-gpu{n}" for n in (0, 1)]
    server = ModelServer("anthropic")
    proc = night(ws, server, "--gpus", "0,x")
    assert proc.returncode == 1 and "distinct GPU indices" in proc.stderr, proc.stderr
    wts[1].mkdir()
    proc = night(ws, server, "--gpus", "0,1")
    assert proc.returncode == 1 and f"{wts[1]} exists and is not a worktree" in proc.stderr, proc.stderr
    assert not wts[0].exists()  # all checked before any is made
    wts[1].rmdir()
    git(repo, "worktree", "add", "-q", "-b", "elsewhere", str(wts[1]), "main")
    proc = night(ws, server, "--gpus", "1")
    assert proc.returncode == 1 and "is on elsewhere, not on a branch of GPU 1's" in proc.stderr, proc.stderr
    git(repo, "worktree", "remove", str(wts[1]))
    proc = night(ws, server, "--gpus", "0,1", "--for", "5m")
    assert proc.returncode == 2 and "does not trust this workspace" in proc.stderr, proc.stderr
    assert f"run `claude` in {repo}," in proc.stderr and proc.seconds < 60  # the main checkout, at once
    assert all(results(wt) == [] for wt in wts)

    trust(ws)  # the main checkout only: its worktrees share its trust
    for wt in wts:
        server.add(bash('./run.sh "baseline"'), End("The baseline is running."), cwd=wt)

    def wait_for(check, what):
        deadline = time.monotonic() + 240
        while not check():
            assert proc.poll() is None and time.monotonic() < deadline, f"{what}: {proc.communicate()}"
            time.sleep(0.2)

    env = dict(ws.env, ANTHROPIC_BASE_URL=server.url, ANTHROPIC_API_KEY="dummy-key")
    proc = subprocess.Popen([sys.executable, str(repo / ".agents" / "night.py"), "--pause", "0", "--gpus", "0,1"],
                            cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for wt in wts:
            wait_for(lambda: "started" in ((wt / "run.log").read_text() if (wt / "run.log").exists() else ""),
                     f"{wt.name} trains")
        (repo / ".agents" / "stop").touch()
        for wt in wts:  # one after the other: GPU 0's row is recorded while GPU 1 trains
            go_on(wt)
            wait_for(lambda: results(wt), f"{wt.name} records its run")
        err = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
        server.close()
    assert proc.returncode == 0, err
    for n, wt in enumerate(wts):
        assert f"reusing the worktree {wt} (detached)" in err
        assert re.search(rf"gpu{n}\] night over \(stop file \.agents/stop found\) after 1 session\(s\)", err), err
        assert re.fullmatch(rf"autoresearch/[a-z]{{3}}\d\d-gpu{n}", git(wt, "branch", "--show-current"))
        assert f"cuda {n}" in (wt / "run.log").read_text()  # the agent's GPU, passed on by run.sh
        assert f"omp {max(1, len(os.sched_getaffinity(0)) // 2)}\n" in (wt / "run.log").read_text()  # half the CPUs
        assert results(wt) == [("keep", "baseline")]
    assert all("Read program.md in full" in p for p in server.prompts[-2:])
    assert git(repo, "branch", "--show-current") == "main" and results(repo) == []
    stored = [line.split("\t") for line in (repo / HELDOUT_TSV).read_text().splitlines()]
    assert [(r[5], r[7]) for r in stored if r[0] != "commit"] == [("0.900000", str(wt.resolve())) for wt in wts]
    log = (repo / ".agents" / "night.log").read_text()
    assert "[gpu0] " in log and "[gpu1] " in log and "night over for all 2 agents" in log


def test_two_agents_on_two_branches_through_slurm(slurm, workspace, tmp_path):
    """AUTORESEARCH_SLURM and night.py --agents 2: two agents at once, in two worktrees on two branches,
    none pinned to a GPU, each running run.sh whose training runs in a Slurm job step. One job is
    cancelled mid-training (scancel): the agent is told it crashed and why, and its next run is
    recorded. When both have ended their turn the stop file ends the night: one log, exit 0. Both
    branches' rows are recorded, and each worktree's morning report has the whole night. run.sh's
    stand-ins (tests/test_run_sh.py) make each run take seconds. (They hand over no held-out score:
    the worktrees share heldout.tsv, and run.sh's guard of it while the other trains is another
    part's; test_run_sh.py stores one through Slurm.)"""
    ws, repo = workspace, workspace.repo
    stand_ins(ws, tmp_path, trainer("1.0"))
    wts = [tmp_path / f"repo-agent{i}" for i in (1, 2)]
    other = wts[1]

    def cancel_when_started():  # the job of the hanging run, cancelled once training runs
        log, deadline = other / "run.log", time.time() + 120
        while time.time() < deadline and not (log.exists() and "hangs" in log.read_text()):
            time.sleep(0.1)
        name = f"ar-{git(other, 'rev-parse', 'HEAD')[:7]}-"
        jobs = [j[0] for j in slurm_jobs(slurm) if j[1].startswith(name)]
        subprocess.run(["scancel", *jobs], env={**os.environ, **slurm}, check=True)

    ended = []

    def done(tag):  # the stop file once both agents have ended their turn
        ended.append(tag)
        if len(ended) == 2:
            (repo / ".agents" / "stop").touch()

    hang = trainer("0.8", body="print('hangs', flush=True); time.sleep(600)\n")
    cancelled = Call("Bash", {"command": './run.sh "hangs"', "description": "run it"},
                     on_play=lambda: threading.Thread(target=cancel_when_started, daemon=True).start())
    trust(ws)  # the main checkout: its worktrees share its trust (Claude Code)
    server = ModelServer("anthropic")
    agents = []
    for tag, checkout, steps in (
            ("agent1", wts[0], [("val_bpb 0.9", trainer("0.9"))]),
            ("agent2", wts[1], [("hangs", hang), ("val_bpb 1.1", trainer("1.1"))])):
        train = checkout / "train.py"
        runs = [bash('./run.sh "baseline"')]
        server.add(runs[0], cwd=checkout)
        for desc, text in steps:
            runs.append(cancelled if desc == "hangs" else bash(f'./run.sh "{desc}"'))
            server.add(Call("Read", {"file_path": str(train)}), Call("Write", {"file_path": str(train), "content": text}),
                       runs[-1], cwd=checkout)
        server.add(End("Done.", on_play=lambda tag=tag: done(tag)), cwd=checkout)
        agents.append((tag, checkout, runs))
    ws.env.update(slurm, AUTORESEARCH_SLURM="1")
    proc = night(ws, server, "--agents", "2", "--pause", "60")  # the first done waits: no restarts spin
    server.close()
    assert proc.returncode == 0, proc.stderr
    assert "on agent1, agent2 (each experiment a Slurm job)" in proc.stderr
    log = (repo / ".agents" / "night.log").read_text()
    assert "night over for all 2 agents" in log and "[agent1] " in log and "[agent2] " in log
    for tag, checkout, runs in agents:
        assert re.search(rf"{tag}\] night over \(stop file \.agents/stop found\) after 1 session\(s\)", proc.stderr)
        for call in runs:  # run.sh's own answers: recorded, each through a Slurm job
            assert not call.is_error and re.search(r"^slurm: +job \d+ on \S+", call.output, re.M), (tag, call.output)
        assert re.fullmatch(rf"autoresearch/[a-z]{{3}}\d\d-{tag}", git(checkout, "branch", "--show-current"))
    assert git(repo, "branch", "--show-current") == "main" and results(repo) == []
    b1, b2 = (git(wt, "branch", "--show-current") for wt in wts)
    assert re.search(r"^status: +crash$", cancelled.output, re.M), cancelled.output
    assert re.search(r"^reason: +the Slurm job \d+ ended CANCELLED .*\*\*\* STEP \d+\.0 ON \S+ CANCELLED AT", cancelled.output,
                     re.M), cancelled.output
    assert results(wts[0]) == [("keep", "baseline"), ("keep", "val_bpb 0.9")]
    assert results(other) == [("keep", "baseline"), ("crash", "hangs [interrupted by Slurm]"), ("discard", "val_bpb 1.1")]
    assert trainer("0.8", body="print('hangs', flush=True); time.sleep(600)\n") not in git(other, "show", "HEAD:train.py")
    for checkout, lines in ((wts[0], ["val_bpb: baseline 1.000000 -> best 0.900000"]),
                            (other, ["val_bpb: baseline 1.000000 -> best 1.000000", "crashes:"])):
        report = subprocess.run([sys.executable, "analysis.py"], cwd=checkout, capture_output=True, text=True,
                                timeout=120)
        assert report.returncode == 0 and all(line in report.stdout for line in lines), report.stdout + report.stderr
        # One morning report for the night, from either checkout: both agents, the best of the night.
        night_of = report.stdout
        assert "the night, 2 branch(es) in 2 worktree(s)" in night_of, night_of
        assert re.search(rf"^best of the night: 0\.900000  [0-9a-f]{{7}} on {b1} ", night_of, re.M), night_of
        agents = night_of.split("agents, best first:\n")[1].split("\n\n")[0].split()
        assert agents.index(b1) < agents.index(b2), night_of
        assert "hangs [interrupted by Slurm]" in night_of.split(f"== {b2}")[1]
