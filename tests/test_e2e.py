"""End to end: test code plays the agent for a short night in the smoke profile.

A temporary clone of this repository's committed HEAD, AUTORESEARCH_SMOKE=1 and
a cache in a temporary directory; everything goes through ./run.sh as
program.md says: the set-up (data check, prepare, baseline, a rerun for the
noise), an edit that may be kept, one that is discarded, a syntax error, a hang
killed at the time limit, an attempted edit of prepare.py, notes in
scratchpad.md after every step. Then the branch history, every results.tsv row,
the scratchpad and the morning report are checked.

About 3-4 minutes on a 2-core CPU (each smoke training takes ~20-60 s there).
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
TAG = "e2e"
BRANCH = f"autoresearch/{TAG}"
NEEDED = ("run.sh", "train.py", "prepare.py", "analysis.py", "program.md", "scratchpad.md")


def git(repo, *args):
    out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def committed(path):
    proc = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"HEAD:{path}"],
                          capture_output=True)
    return proc.returncode == 0


class Agent:
    """What the agent may do: read files, edit train.py and scratchpad.md, run ./run.sh."""

    def __init__(self, repo, env):
        self.repo, self.env, self.notes = repo, env, []

    def note(self, text):
        """One line at the end of the scratchpad's experiment log."""
        path = self.repo / "scratchpad.md"
        pad = path.read_text(encoding="utf-8")
        head, sep, rest = pad.partition("\n## Dead ends")
        path.write_text(head.rstrip("\n") + f"\n- {text}\n" + sep + rest,
                        encoding="utf-8")
        self.notes.append(text)

    def read_train(self):
        return (self.repo / "train.py").read_text(encoding="utf-8")

    def write_train(self, text):
        (self.repo / "train.py").write_text(text, encoding="utf-8")

    def set_constant(self, name, value):
        """Set a top-level `NAME = number` in train.py; return the old value."""
        text = self.read_train()
        pattern = re.compile(rf"^({name}\s*=\s*)([0-9.eE+-]+)", re.M)
        found = pattern.findall(text)
        assert len(found) == 1, f"train.py: expected one top-level {name} = <number>"
        old = float(found[0][1])
        self.write_train(pattern.sub(lambda m: m.group(1) + repr(value(old)), text, count=1))
        return old

    def run(self, *args, timeout=None):
        env = dict(self.env)
        if timeout is not None:
            env["AUTORESEARCH_TIMEOUT"] = str(timeout)
        t0 = time.monotonic()
        proc = subprocess.run(["./run.sh", *args], cwd=self.repo, env=env,
                              capture_output=True, text=True, timeout=900)
        proc.seconds = time.monotonic() - t0
        proc.report = parse_report(proc.stdout)
        return proc


def parse_report(stdout):
    """The `name: value` lines of run.sh's report (the last block, after `---`)."""
    report = {}
    tail = stdout.rsplit("\n---\n", 1)[-1]
    for line in tail.splitlines():
        m = re.match(r"^([a-z_]+):\s+(.*)$", line)
        if m:
            report[m.group(1)] = m.group(2).strip()
    return report


def example_report(doc, after):
    """The `name:` keys, in order, of the example report in the code block that follows `after`."""
    block = doc.split(after, 1)[1].split("```", 2)[1]
    return list(parse_report(block.split("\n", 1)[1]))


def read_rows(repo):
    lines = (repo / "results.tsv").read_text(encoding="utf-8").splitlines()
    assert lines[0].split("\t")[:5] == ["commit", "val_bpb", "memory_gb", "status", "description"]
    return [line.split("\t") for line in lines[1:] if line.strip()]


def processes_in(path):
    """PIDs of processes whose working directory is path (a hang must not survive)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if os.readlink(proc / "cwd") == str(path):
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    missing = [p for p in NEEDED if not committed(p)]
    if missing:
        pytest.skip(f"not committed yet: {', '.join(missing)}")
    tmp = tmp_path_factory.mktemp("e2e")
    repo = tmp / "repo"
    subprocess.run(["git", "clone", "-q", str(REPO), str(repo)], check=True)
    git(repo, "switch", "-q", "-C", "main")
    env = dict(os.environ)
    for name in list(env):
        if name.startswith("AUTORESEARCH_"):
            del env[name]
    env.update(AUTORESEARCH_SMOKE="1", AUTORESEARCH_CACHE=str(tmp / "cache"),
               AUTORESEARCH_PYTHON=PY, AUTORESEARCH_TAG=TAG, AUTORESEARCH_TIMEOUT="300")
    return repo, Agent(repo, env)


def test_a_night_in_the_smoke_profile(night):
    repo, agent = night
    main_before = git(repo, "rev-parse", "main")
    runs = []  # (description, status) of every run that was not refused

    # --- set-up: read the files, check the data; run.sh refuses without it.
    for name in ("prepare.py", "train.py", "program.md", "scratchpad.md"):
        assert (repo / name).read_text(encoding="utf-8")
    agent.note("set-up: read program.md, train.py, prepare.py up to its fence; checking the data")
    refused = agent.run("baseline")
    assert refused.returncode == 3, refused.stdout + refused.stderr
    assert "prepare" in refused.stderr and "uv run prepare.py" in refused.stderr
    assert not (repo / "results.tsv").exists()
    assert git(repo, "branch", "--show-current") == "main"
    # The person prepares the (smoke) data, as program.md asks.
    prep = subprocess.run([PY, "prepare.py"], cwd=repo, env=agent.env,
                          capture_output=True, text=True, timeout=600)
    assert prep.returncode == 0, prep.stdout + prep.stderr
    check = subprocess.run([PY, "prepare.py", "--check"], cwd=repo, env=agent.env,
                           capture_output=True, text=True, timeout=600)
    assert check.returncode == 0, check.stdout + check.stderr
    agent.note("data prepared by the person")

    # --- the baseline, unchanged; run.sh starts the branch.
    base = agent.run("baseline")
    assert base.returncode == 0, base.stdout + base.stderr
    assert base.report["status"] == "keep", base.stdout
    assert base.report["change"] == "baseline"
    assert git(repo, "branch", "--show-current") == BRANCH
    best = float(base.report["val_bpb"])
    assert 0 < best < 20
    best_commit = git(repo, "rev-parse", "--short=7", "HEAD")
    best_train = agent.read_train()
    runs.append(("baseline", "keep"))
    agent.note(f"baseline: val_bpb {best:.6f} at {best_commit}")
    # The report has the lines the README's example shows (a keep).
    readme, program = (REPO / "README.md").read_text(encoding="utf-8"), (REPO / "program.md").read_text(encoding="utf-8")
    assert list(base.report) == example_report(readme, "**Log** one row to `results.tsv` and **report**:")

    # --- program.md's first step, when the person already ran the baseline: a refusal that
    # names it, and changes nothing.
    rows_before = (repo / "results.tsv").read_bytes()
    again = agent.run("baseline")
    assert again.returncode == 3, again.stdout + again.stderr
    # The message as the README quotes it, with this run's commit and val_bpb.
    quoted = re.search(r"`(run.sh: nothing to run: [^`]*) \.\.\.`", " ".join(readme.split()))[1]
    assert quoted.replace("a1b2c3d", best_commit).replace("0.997900", f"{best:.6f}") in again.stderr
    assert (repo / "results.tsv").read_bytes() == rows_before
    assert git(repo, "rev-parse", "--short=7", "HEAD") == best_commit

    # --- learn the noise: the same code again.
    rerun = agent.run("--rerun", "baseline noise")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert rerun.report["status"] == "rerun", rerun.stdout
    assert "spread" in rerun.report["noise"]
    assert git(repo, "rev-parse", "--short=7", "HEAD") == best_commit
    runs.append(("baseline noise", "rerun"))
    agent.note(f"rerun of the baseline: {rerun.report['noise']}")

    # --- a hypothesis that may improve. In the smoke profile the step count (and so
    # val_bpb) swings with CPU load, so no change is reliably better: check that the
    # decision is consistent (keep iff val_bpb < best) and the branch follows it.
    candidates = [
        ("double the learning rates",
         ["EMBEDDING_LR", "UNEMBEDDING_LR", "MATRIX_LR", "SCALAR_LR"], lambda v: v * 2),
    ]
    kept_any = False
    for desc, names, change in candidates:
        agent.note(f"hypothesis: {desc}")
        for name in names:
            agent.set_constant(name, change)
        edited = agent.read_train()
        proc = agent.run(desc)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        status, val = proc.report["status"], float(proc.report["val_bpb"])
        assert status in ("keep", "discard"), proc.stdout
        assert (status == "keep") == (val < best), (val, best, proc.stdout)
        runs.append((desc, status))
        if status == "keep":
            assert git(repo, "log", "-1", "--format=%s") == f"[smoke] {desc}"
            assert agent.read_train() == edited
            best, best_commit, best_train = val, git(repo, "rev-parse", "--short=7", "HEAD"), edited
            kept_any = True
            agent.note(f"kept {desc}: val_bpb {val:.6f} at {best_commit}")
            break
        assert git(repo, "rev-parse", "--short=7", "HEAD") == best_commit
        assert agent.read_train() == best_train  # reverted to the best kept version
        agent.note(f"discarded {desc}: {val:.6f} vs best {best:.6f}")

    # --- a change that reliably hurts: no learning at all.
    agent.note("hypothesis: all learning rates 0 (should be much worse)")
    for name in ("EMBEDDING_LR", "UNEMBEDDING_LR", "MATRIX_LR", "SCALAR_LR"):
        agent.set_constant(name, lambda v: 0.0)
    zero = agent.run("all learning rates 0")
    assert zero.returncode == 0, zero.stdout + zero.stderr
    assert zero.report["status"] == "discard", zero.stdout
    # program.md's example report is a discard: the same lines, in the same order.
    discard_keys = example_report(program, "The report ends like this:")
    assert list(zero.report) == discard_keys
    assert float(zero.report["val_bpb"]) > best
    assert "reverted" in zero.report["commit"]
    assert agent.read_train() == best_train
    assert git(repo, "rev-parse", "--short=7", "HEAD") == best_commit
    runs.append(("all learning rates 0", "discard"))
    agent.note("discarded all learning rates 0: as expected, it does not learn")

    # --- a syntax error: a crash, reverted, with the traceback in the output.
    agent.note("hypothesis: a change with a typo in it")
    agent.write_train("def broken(:\n" + agent.read_train())
    crash = agent.run("typo in train.py")
    assert crash.returncode == 0, crash.stdout + crash.stderr
    assert crash.report["status"] == "crash", crash.stdout
    assert "SyntaxError" in crash.stdout  # the log tail run.sh prints
    # As program.md says: a reason: line after status:, and no training:, decision: or outside:.
    assert list(crash.report) == ["status", "reason"] + [
        k for k in discard_keys if k not in ("status", "training", "decision", "outside")]
    assert agent.read_train() == best_train
    assert git(repo, "rev-parse", "--short=7", "HEAD") == best_commit
    runs.append(("typo in train.py", "crash"))
    agent.note("crash: SyntaxError from a typo; trivial, would fix and rerun")

    # --- a hang: killed at the time limit, reverted, nothing left running.
    agent.note("hypothesis: something that hangs")
    agent.write_train("import time\ntime.sleep(3600)\n" + agent.read_train())
    hang = agent.run("sleep forever", timeout=20)
    assert hang.returncode == 0, hang.stdout + hang.stderr
    assert hang.report["status"] == "crash", hang.stdout
    assert "timed out" in hang.report["reason"]
    assert hang.seconds < 120
    assert agent.read_train() == best_train
    assert git(repo, "rev-parse", "--short=7", "HEAD") == best_commit
    assert processes_in(repo) == []
    runs.append(("sleep forever", "crash"))
    agent.note("crash: killed at the time limit; never sleep in train.py")

    # --- an attempt to edit prepare.py: refused, nothing recorded or committed.
    rows_before = (repo / "results.tsv").read_text(encoding="utf-8")
    with open(repo / "prepare.py", "a", encoding="utf-8") as f:
        f.write("\nEVAL_TOKENS = 1024  # a cheaper evaluation\n")
    agent.set_constant("WARMDOWN_RATIO", lambda v: 0.4)
    cheat = agent.run("evaluate on fewer tokens")
    assert cheat.returncode == 3, cheat.stdout + cheat.stderr
    assert "refused" in cheat.stderr and "prepare.py" in cheat.stderr
    assert (repo / "results.tsv").read_text(encoding="utf-8") == rows_before
    assert git(repo, "rev-parse", "--short=7", "HEAD") == best_commit
    git(repo, "checkout", "--", "prepare.py", "train.py")  # the person puts them back
    agent.note("refused: prepare.py is fixed; never edit it")

    # --- the branch history: baseline and kept runs only; main untouched.
    assert git(repo, "rev-parse", "main") == main_before
    subjects = git(repo, "log", "--format=%s", f"{main_before}..{BRANCH}").splitlines()
    kept = [d for d, s in runs if s == "keep"]
    assert subjects == [f"[smoke] {d}" for d in reversed(kept)]
    assert len(kept) == 1 + kept_any

    # --- every results.tsv row, in order.
    rows = read_rows(repo)
    # The columns program.md and the README show are the file's.
    header = (repo / "results.tsv").read_text(encoding="utf-8").splitlines()[0].split("\t")
    shown = re.search(r"^`(commit  [^`]+)`$", program, re.M)[1].split()
    assert shown == header
    table = readme.split("| column | value |", 1)[1].split("\n\n", 1)[0]
    assert re.findall(r"^\| `([a-z_]+)` \|", table, re.M) == header
    assert [(r[4], r[3]) for r in rows] == runs
    assert all(r[6] == "smoke" for r in rows)  # the profile column, set by run.sh
    for row in rows:
        commit, val, mem, status = row[0], float(row[1]), float(row[2]), row[3]
        assert re.fullmatch(r"[0-9a-f]{7}", commit)
        assert mem >= 0
        assert (val == 0.0) == (status == "crash")
        if len(row) > 5:
            assert row[5] == BRANCH
    assert rows[0][0] == rows[1][0]  # the rerun measured the baseline's commit
    assert float(rows[0][1]) == pytest.approx(float(base.report["val_bpb"]))

    # --- the scratchpad kept every note, whatever run.sh reverted.
    scratchpad = (repo / "scratchpad.md").read_text(encoding="utf-8")
    assert scratchpad.startswith("# Scratchpad")
    for text in agent.notes:
        assert f"- {text}\n" in scratchpad

    # --- the morning report.
    report = subprocess.run([PY, "analysis.py"], cwd=repo, capture_output=True, text=True,
                            timeout=300)
    assert report.returncode == 0, report.stdout + report.stderr
    out = report.stdout
    print(out)
    n_keep = len(kept)
    assert f"[smoke] all {len(runs)} rows are smoke runs" in out
    assert (f"experiments: {len(runs)}  (kept {n_keep}, discarded {len(runs) - n_keep - 3}, "
            f"crashed 2, reruns 1)") in out
    assert "typo in train.py" in out.split("crashes:")[1]
    assert "sleep forever" in out.split("crashes:")[1]
    png = (repo / "progress.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    keep_copy = os.environ.get("AUTORESEARCH_E2E_KEEP")
    if keep_copy:  # to look at the plot and the files afterwards
        Path(keep_copy).mkdir(parents=True, exist_ok=True)
        for name in ("progress.png", "results.tsv", "scratchpad.md", "run.log"):
            (Path(keep_copy) / name).write_bytes((repo / name).read_bytes())
        (Path(keep_copy) / "report.txt").write_text(out, encoding="utf-8")


def test_lockdown_files_are_consistent():
    """The shipped agent permissions allow what program.md allows, and nothing else."""
    settings = json.loads((REPO / ".claude" / "settings.json").read_text(encoding="utf-8"))
    perms = settings["permissions"]
    assert perms["defaultMode"] == "dontAsk"  # refused, never waiting for a click
    allow, deny = perms["allow"], perms["deny"]
    assert "Edit(/train.py)" in allow and "Edit(/scratchpad.md)" in allow
    assert "Bash(./run.sh *)" in allow
    edits = [r for r in allow if r.startswith(("Edit", "Write"))]
    assert sorted(edits) == ["Edit(/scratchpad.md)", "Edit(/train.py)"]
    bash = [r for r in allow if r.startswith("Bash")]
    assert sorted(bash) == ["Bash(./run.sh *)", "Bash(./run.sh)"]
    assert not any(r.startswith(("WebFetch", "WebSearch")) for r in allow)
    for rule in ("Edit(/prepare.py)", "Bash(git push *)", "Bash(pip *)", "Bash(uv *)"):
        assert rule in deny
    assert "./run.sh" in " ".join(settings["sandbox"]["excludedCommands"])
    assert settings["sandbox"]["autoAllowBashIfSandboxed"] is False
    # One experiment takes ~6 minutes; the Bash tool's default limit is 2.
    assert int(settings["env"]["BASH_DEFAULT_TIMEOUT_MS"]) >= 20 * 60 * 1000

    cursor = json.loads((REPO / ".cursor" / "cli.json").read_text(encoding="utf-8"))
    c_allow, c_deny = cursor["permissions"]["allow"], cursor["permissions"]["deny"]
    assert [r for r in c_allow if r.startswith("Shell")] == ["Shell(./run.sh)"]
    assert sorted(r for r in c_allow if r.startswith("Write")) == [
        "Write(scratchpad.md)", "Write(train.py)"]
    for rule in ("Write(prepare.py)", "Shell(git)", "Shell(pip)", "Shell(uv)", "WebFetch(*)"):
        assert rule in c_deny

    for path in ("AGENTS.md", ".cursor/rules/autoresearch.mdc"):
        assert "program.md" in (REPO / path).read_text(encoding="utf-8")


# Written by run.sh, the morning report and uv, never committed, never the agent's.
FIXED_UNTRACKED = {".git": "dir", ".venv": "dir", "results.tsv": "file", "run.log": "file",
                   "progress.png": "file"}


def test_every_client_denies_every_fixed_path():
    """One list of fixed paths: every tracked top-level entry but train.py and scratchpad.md, and
    run.sh's, the report's and uv's outputs. Claude Code and Cursor deny writing each one, Codex
    carves each one out of its writable root, so a path added to the repository without a deny fails
    here. (Cursor's unattended --force runs whatever is not denied, and a write to a fixed file
    makes run.sh refuse every later experiment.) Reading the held-out scores is denied too."""
    tracked = git(REPO, "ls-files").splitlines()
    fixed = dict(FIXED_UNTRACKED)
    for path in tracked:
        top = path.split("/")[0]
        fixed[top] = "dir" if "/" in path else "file"
    for editable in ("train.py", "scratchpad.md"):
        assert fixed.pop(editable) == "file"

    claude = json.loads((REPO / ".claude" / "settings.json").read_text(encoding="utf-8"))["permissions"]
    cursor = json.loads((REPO / ".cursor" / "cli.json").read_text(encoding="utf-8"))["permissions"]
    for path, kind in sorted(fixed.items()):
        pattern = f"{path}/**" if kind == "dir" else path
        assert f"Edit(/{pattern})" in claude["deny"], f"add Edit(/{pattern}) to .claude/settings.json's deny"
        assert f"Write({pattern})" in cursor["deny"], f"add Write({pattern}) to .cursor/cli.json's deny"
    assert "Read(/.git/autoresearch/**)" in claude["deny"] and "Read(//**/.git/autoresearch/**)" in claude["deny"]
    assert "Read(**/.git/autoresearch/**)" in cursor["deny"]

    # Codex: the repository root is writable (a writable single file breaks its sandbox), every
    # fixed path is carved out read-only, and nothing else is.
    text = (REPO / ".codex" / "config.toml").read_text(encoding="utf-8")
    section = text.split('[permissions.autoresearch.filesystem.":workspace_roots"]')[1]
    entries = dict(re.findall(r'^"([^"]+)" = "(\w+)"$', section, re.M))
    assert entries.pop(".") == "write"
    assert set(entries.values()) == {"read"}
    missing = set(fixed) - set(entries)
    assert not missing, f"carve {sorted(missing)} out in .codex/config.toml"
    assert "train.py" not in entries and "scratchpad.md" not in entries
