#!/usr/bin/env python3
"""Run the research agent headless for a night, restarting it whenever it stops.

    .agents/night.py --until 07:00                 # Claude Code (claude -p)
    .agents/night.py --agent codex --for 8h        # Codex (codex exec)
    .agents/night.py --gpus all --for 8h           # one agent per GPU, each in its own worktree
    .agents/night.py --agents 4 --for 8h           # under Slurm (AUTORESEARCH_SLURM): 4 agents, 4 worktrees
    touch .agents/stop                             # ask it to stop (every agent)

The agent is told to read program.md in full and follow it (START below): what
to read, the set-up and the loop are program.md's alone, the prompts add only
what is particular to a headless night. When the agent ends its turn (which headless
agents do, "never stop" or not), it is started again, in a fresh session, with a
prompt to go on from scratchpad.md and results.tsv (RESTART), until the deadline or
until the stop file appears. Everything goes to .agents/night.log.

An experiment is never cut short or repeated by this script: when a session ends or
is stopped, it takes run.sh's lock of the checkout (so the running experiment finishes
and no new one can start), then ends the agent and every process it started, its shell
tools included though they run in sessions of their own (all carry a mark in their
environment), and only then releases the lock: nothing of a session outlives it.
Ctrl-C or SIGTERM ends them all at once instead (run.sh then records the running
experiment as an interrupted crash).

With --gpus (a list of GPU indices, or all that nvidia-smi lists) there is one agent
per GPU, each in a git worktree beside the repository (<repo>-gpu<N>, made from main
the first time, reused after), pinned to its GPU (CUDA_VISIBLE_DEVICES=<N>) and to a
branch of its own (AUTORESEARCH_TAG=<date>-gpu<N>: run.sh starts autoresearch/<tag>
at the first run), each supervised as above, side by side: one process, one log (each
line tagged with its GPU), one exit status. The stop file and the deadline stop them
all, each after its running experiment. The worktrees use the main checkout's Python
(AUTORESEARCH_PYTHON), which `uv sync` made and ./run.sh --doctor checked. Agents on
one machine share its CPUs: each gets OMP_NUM_THREADS = max(1, CPUs // agents) (the CPUs
this process may use), unless OMP_NUM_THREADS is set already (torchrun, too, sets it for
several processes: torch would start a thread per core in each).

Under Slurm (AUTORESEARCH_SLURM set and not 0, as run.sh reads it) the GPUs are on the nodes and
Slurm gives each experiment its own, so --gpus is refused and --agents N takes its place:
N agents in the worktrees <repo>-agent1 ... <repo>-agentN on the branches <date>-agent<i>,
the same in every other way, none pinned to a GPU and none given OMP_NUM_THREADS (each
job has its node's CPUs, --cpus-per-task in AUTORESEARCH_SLURM). Without Slurm --agents
is refused: on one machine each agent needs a GPU of its own (--gpus).

Claude Code ignores .claude/settings.json, and Codex .codex/, in a checkout that
the person has not trusted once; a night would then end within seconds. When the
CLI says so, this script stops with an error saying what to do (exit 2). Both trust
the worktrees of a trusted main checkout (Claude Code 2.1.197 and Codex 0.169 look up
a worktree's trust under its main checkout), so the worktrees need nothing more and
this script writes no trust of its own. See the README, "Running the agent".

Python's standard library only (system python3): it watches a deadline, a stop
file, the agent's stderr and the processes it started, and takes an flock, which is
clearer here than in bash.
"""

import argparse
import datetime as dt
import fcntl
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HERE = ROOT / ".agents"
# The prompts defer to program.md and repeat none of its steps, so they cannot drift from it.
START = """Read program.md in full and follow it: its set-up first, then the experiment loop.
This is a headless night: I am asleep and cannot answer, so never stop to ask whether
to continue. If this session ends, a fresh one goes on from scratchpad.md and results.tsv."""
RESTART = """You were restarted: your previous session ended, and the night goes on.
Read program.md in full again and follow it from where the night stands, not from
the start: scratchpad.md holds your notes and plan, results.tsv every experiment that
finished (the last row is the most recent) and run.log the last run's output. Finish
program.md's set-up only if results.tsv shows it unfinished, never repeat an experiment
that results.tsv already records, and carry on with the loop from where your notes
stand. I am asleep and cannot answer, so never stop to ask whether to continue."""
# What each CLI prints when it ignores the project's settings in an untrusted workspace.
UNTRUSTED = {"claude": "has not been trusted", "codex": "Untrusted project-local configuration is disabled"}
TRUST_STEP = {
    "claude": "run `claude` in {root}, accept 'trust this folder', then /exit (or set "
              "projects[\"{root}\"].hasTrustDialogAccepted: true in ~/.claude.json)",
    "codex": "run `codex` in {root} and trust it (or add [projects.\"{root}\"] with "
             "trust_level = \"trusted\" to ~/.codex/config.toml, which `codex exec --trust` writes)",
}


def command(agent, prompt, extra):
    if agent == "claude":
        return ["claude", "-p", prompt, "--output-format", "stream-json", "--verbose",
                "--permission-mode", "dontAsk", *extra]
    # Codex reads .codex/config.toml (sandbox, approvals) in a trusted project.
    return ["codex", "exec", "--json", *extra, prompt]


def deadline_of(args):
    if args.until:
        hour, minute = map(int, args.until.split(":"))
        now = dt.datetime.now()
        end = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
        if end <= now:
            end += dt.timedelta(days=1)
        return time.time() + (end - now).total_seconds()
    if args.duration:
        m = re.fullmatch(r"(\d+(?:\.\d+)?)([smh])", args.duration)
        if not m:
            sys.exit(f"night.py: --for wants a number and s, m or h (8h, 90m), not {args.duration!r}")
        return time.time() + float(m[1]) * {"s": 1, "m": 60, "h": 3600}[m[2]]
    return float("inf")


def git(where, *args):
    """git's output, stripped; None when it fails."""
    out = subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


def started_at(pid):
    """When process PID started, in clock ticks after boot (/proc/PID/stat's 22nd field)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])


def started_by(marks):
    """The processes whose environment carries one of MARKS (NAME=VALUE): agents and all they started.
    Found by their environment, not their process group: an agent's shell tools may run in sessions of
    their own (Claude Code's do), and they outlive the agent, reparented, when it ends. Only this user's
    processes started after this one are read: reading an environment waits on the process's memory,
    and one stuck in the kernel elsewhere (a wedged GPU, NFS) must not stop the night."""
    found, uid, since = [], os.getuid(), started_at(os.getpid())
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{pid}").st_uid != uid or started_at(pid) < since:
                continue
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):  # gone
            continue
        if any(m in environ for m in marks):
            found.append(int(pid))
    return found


def end(agents):
    """End the agents and every process they started: TERM, then KILL, each once; return when none is
    left, or after 15 s (what KILL leaves is stuck in the kernel)."""
    marks = [a.mark for a in agents]
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        for a in agents:  # the group too: a process there may have scrubbed its environment
            if a.proc is not None and a.proc.returncode is None:  # (not reaped: its group id is its own)
                try:
                    os.killpg(a.proc.pid, sig)
                except OSError:
                    pass
        until, signalled = time.time() + wait, set()
        while time.time() < until:
            for a in agents:
                if a.proc is not None:
                    a.proc.poll()  # reaps it once ended (a zombie shows no environment)
            pids = set(started_by(marks))
            if not pids:
                return
            for pid in pids - signalled:  # once each: run.sh's trap must not fire twice
                try:
                    os.kill(pid, sig)
                except OSError:  # gone
                    pass
                signalled.add(pid)
            time.sleep(0.1)


class Refused(Exception):
    """A set-up the night cannot start with; the message says what to do."""


class Night:
    """What the agents of a night share: the deadline, the stop file, the log, the outcome."""

    def __init__(self, args):
        self.args, self.deadline = args, deadline_of(args)
        self.stop_file = HERE / "stop"
        self.log = open(HERE / "night.log", "a", buffering=1, encoding="utf-8")
        self.log_lock = threading.Lock()
        self.failed = None  # (exit status, why): an agent that cannot go on stops the others
        self.starting = threading.Lock()  # held to start an agent, and to interrupt the night (run)

    def write(self, text):
        with self.log_lock:
            self.log.write(text)

    def say(self, text, loud=False, tag=""):
        line = f"[night {time.strftime('%Y-%m-%d %H:%M:%S')}{' ' + tag if tag else ''}] {text}"
        self.write(line + "\n" + ("\n" if loud else ""))
        print(line, file=sys.stderr, flush=True)

    def stop_reason(self):
        if self.failed:
            return self.failed[1]
        if self.stop_file.exists():
            return f"stop file {self.stop_file.relative_to(ROOT)} found"  # removed at the next start
        if time.time() >= self.deadline:
            return "deadline reached"
        return None

    def fail(self, code, why):
        with self.log_lock:
            self.failed = self.failed or (code, why)

    def agents(self):
        """One agent in this checkout; with --gpus one per GPU, with --agents N (Slurm) N, each in its worktree."""
        args, slurm = self.args, os.environ.get("AUTORESEARCH_SLURM", "") not in ("", "0")  # as run.sh reads it
        if args.gpus and slurm:
            raise Refused("--gpus pins each agent to a GPU of this machine, but AUTORESEARCH_SLURM is set: "
                          "the GPUs are on the nodes and Slurm gives each experiment its own; use --agents N "
                          "(N agents, each in its worktree, none pinned), or unset AUTORESEARCH_SLURM")
        if args.agents and not slurm:
            raise Refused("--agents N is for a Slurm cluster (AUTORESEARCH_SLURM set), where Slurm gives each "
                          "experiment its GPU; on this machine give each agent a GPU of its own with --gpus "
                          "(--gpus all, or --gpus 0,1)")
        if args.agents and not re.fullmatch(r"[1-9]\d*", args.agents):
            raise Refused(f"--agents wants a number of agents, 1 or more, not {args.agents!r}")
        if not args.gpus and not args.agents:
            return [Agent(self, ROOT)]
        names = ([f"gpu{gpu}" for gpu in gpu_indices(args.gpus)] if args.gpus
                 else [f"agent{i}" for i in range(1, int(args.agents) + 1)])
        start = next((b for b in ("main", "master") if git(ROOT, "rev-parse", "-q", "--verify", f"refs/heads/{b}")),
                     None)
        if start is None:
            raise Refused(f"no branch main or master in {ROOT} to make the agents' worktrees from")
        env = {}
        if not os.environ.get("AUTORESEARCH_PYTHON"):
            env["AUTORESEARCH_PYTHON"] = project_python()
        if args.gpus:
            # The same numbering as nvidia-smi's (CUDA's own order may differ) and run.sh's GPU locks.
            env["CUDA_DEVICE_ORDER"] = os.environ.get("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
            if len(names) > 1 and not os.environ.get("OMP_NUM_THREADS"):
                # Agents on one machine share its CPUs: torch would start all cores' threads in each.
                env["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // len(names)))
        found = [worktree(name, start) for name in names]  # all checked before any is made
        if "OMP_NUM_THREADS" in env:
            self.say(f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']} for each agent: this machine's CPUs shared by "
                     f"{len(names)} (set OMP_NUM_THREADS to choose)")
        agents = []
        for name, (path, branch, tag) in zip(names, found):
            if branch is None:
                add = subprocess.run(["git", "-C", str(ROOT), "-c", "core.hooksPath=/dev/null", "worktree", "add", "-q",
                                      "--detach", str(path), start], capture_output=True, text=True)
                if add.returncode != 0:
                    raise Refused(f"could not make the worktree {path}: {add.stderr.strip()}")
                self.say(f"made the worktree {path} from {start}; run.sh starts autoresearch/{tag} there at "
                         "the first run", tag=name)
            else:
                self.say(f"reusing the worktree {path} ({'on ' + branch if branch else 'detached'})", tag=name)
            wt_env = dict(env, AUTORESEARCH_TAG=tag)
            if args.gpus:
                wt_env["CUDA_VISIBLE_DEVICES"] = name.removeprefix("gpu")
            if "AUTORESEARCH_PYTHON" in env and (path / "uv.lock").read_bytes() != (ROOT / "uv.lock").read_bytes():
                del wt_env["AUTORESEARCH_PYTHON"]  # other dependencies: its own environment (uv run syncs it)
                self.say("its uv.lock is not the main checkout's: run.sh there uses its own environment", tag=name)
            agents.append(Agent(self, path, name, wt_env))
        return agents

    def run(self):
        try:
            agents = self.agents()
        except Refused as e:
            self.say(f"ERROR: {e}", loud=True)
            return 1
        where = "" if len(agents) == 1 and not agents[0].tag else " on " + ", ".join(a.tag for a in agents)
        if self.args.agents:
            where += " (each experiment a Slurm job)"
        self.say(f"night starts: agent {self.args.agent}{where}, "
                 + ("no deadline" if self.deadline == float("inf")
                    else time.strftime("until %Y-%m-%d %H:%M:%S", time.localtime(self.deadline)))
                 + f", stop file {self.stop_file.relative_to(ROOT)}, log {self.log.name}")
        if self.stop_file.exists():
            self.stop_file.unlink()
            self.say("removed a stop file left from an earlier night")
        threads = [threading.Thread(target=a.supervise, daemon=True) for a in agents]
        for t in threads:
            t.start()
        try:
            for t in threads:
                while t.is_alive():
                    t.join(timeout=1)
        except BaseException:  # Ctrl-C or SIGTERM: every agent ends at once, and none starts after
            with self.starting:
                self.fail(130, "interrupted")
            end(agents)
            raise
        if len(agents) > 1:
            self.say(f"night over for all {len(agents)} agents" + (f" ({self.failed[1]})" if self.failed else ""))
        return self.failed[0] if self.failed else 0


class Agent:
    """One agent in its checkout: started, watched, restarted, stopped."""

    def __init__(self, night, root, tag="", env=()):
        self.night, self.root, self.tag = night, root, tag
        # Every process of this agent carries the mark in its environment (end, started_by).
        mark = f"{os.getpid()}.{secrets.token_hex(4)}.{tag or 'agent'}"
        self.mark = f"AUTORESEARCH_NIGHT_AGENT={mark}".encode()
        self.env = dict(os.environ, CLAUDE_CODE_DISABLE_BACKGROUND_TASKS="1",  # experiments in the foreground
                        PWD=str(root), **dict(env), AUTORESEARCH_NIGHT_AGENT=mark)
        # run.sh's per-checkout lock (an flock, held while an experiment runs).
        self.lock_path = Path(git(root, "rev-parse", "--absolute-git-dir")) / "autoresearch" / "lock"
        self.untrusted = None
        self.proc = None

    def say(self, text, loud=False):
        self.night.say(text, loud, self.tag)

    def take_lock(self):
        """Wait until no run.sh runs here; return the held lock (close it to release)."""
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = open(self.lock_path, "a+")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.say("an experiment is running; waiting for it to finish")
            fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    def copy(self, stream, stderr):
        """The agent's output into the log, each line tagged; on stderr, watch for the untrusted warning."""
        prefix = f"[{self.tag}] " if self.tag else ""
        for line in stream:
            self.night.write(prefix + line)
            if stderr and UNTRUSTED[self.night.args.agent] in line and not self.untrusted:
                self.untrusted = line.strip()
                try:
                    os.killpg(self.proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    def session(self, prompt):
        """One agent session; returns why it ended: 'ended (...)', 'untrusted', 'missing' or a stop reason."""
        with self.night.starting:  # none starts once the night is interrupted (Night.run ends them all)
            if self.night.failed:
                return self.night.failed[1]
            try:
                self.proc = proc = subprocess.Popen(
                    command(self.night.args.agent, prompt, self.night.args.extra), cwd=self.root, env=self.env,
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                    errors="replace", start_new_session=True)
            except FileNotFoundError:
                return "missing"
        copiers = [threading.Thread(target=self.copy, args=(stream, stream is proc.stderr), daemon=True)
                   for stream in (proc.stdout, proc.stderr)]
        for t in copiers:
            t.start()
        reason = None
        try:
            while proc.poll() is None and not (reason := self.night.stop_reason()):
                time.sleep(1)
            if reason:
                self.say(f"{reason}: stopping the agent once no experiment is running")
            # Stopped or ended, the agent and all it started end once no experiment runs (never
            # cut short), the lock held meanwhile: a ./run.sh it starts now is refused, and none
            # outlives the session to start later.
            with self.take_lock():
                end([self])
        except BaseException:
            end([self])  # at once, on an error here
            raise
        finally:
            for t in copiers:
                t.join(timeout=5)
        if reason:
            return reason
        return "untrusted" if self.untrusted else f"ended (exit status {proc.returncode})"

    def supervise(self):
        """The agent's night, in its own thread; an agent that cannot go on stops the others."""
        try:
            code, why = self.sessions()
        except Exception as e:  # noqa: BLE001  (said, and the others stopped, rather than a silent thread)
            code, why = 1, f"night.py failed: {e!r}"
            self.say(f"ERROR: {why}", loud=True)
        if code:
            self.night.fail(code, f"{self.tag or 'the agent'} stopped: {why}")

    def sessions(self):
        agent, args = self.night.args.agent, self.night.args
        prompt, pause, n = START, args.pause, 0
        while True:
            n += 1
            self.say(f"session {n} starts")
            t0 = time.time()
            why = self.session(prompt)
            if why == "missing":
                self.say(f"ERROR: `{agent}` is not on PATH; install it (README, \"Running the agent\")", loud=True)
                return 1, f"{agent} not found"
            if why == "untrusted":
                # A worktree's trust is its main checkout's: that is the one to trust.
                self.say(f"ERROR: {agent} does not trust this workspace, so it ignores the "
                         "project's settings (.claude/ or .codex/): the agent could not edit train.py "
                         f"or run ./run.sh, and the night would end at once. {agent} said:\n"
                         f"    {self.untrusted}\nDo this once, then start again: "
                         + TRUST_STEP[agent].format(root=ROOT)
                         + " (README, \"Running the agent\").", loud=True)
                return 2, "untrusted"
            if not why.startswith("ended"):
                self.say(f"night over ({why}) after {n} session(s)")
                return 0, why
            self.say(f"session {n} {why} after {time.time() - t0:.0f}s")
            # A session that ends at once (an API error, a broken set-up) must not spin all night.
            pause = min(pause * 2, 600) if time.time() - t0 < 60 else args.pause
            until = time.time() + pause
            while time.time() < until and not self.night.stop_reason():
                time.sleep(1)
            reason = self.night.stop_reason()
            if reason:
                self.say(f"night over ({reason}) after {n} session(s)")
                return 0, reason
            prompt = RESTART


# ------------------------------------------------------------------ --gpus, --agents

def gpu_indices(spec):
    """The GPU indices of --gpus: a list such as 0,1,3, or all that nvidia-smi lists."""
    if spec == "all":
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=120)
        except FileNotFoundError:
            raise Refused("--gpus all asks nvidia-smi for the GPUs, and it is not on PATH; "
                          "name them instead, e.g. --gpus 0,1") from None
        if out.returncode != 0 or not out.stdout.split():
            raise Refused(f"nvidia-smi lists no GPU ({(out.stderr or out.stdout).strip() or out.returncode}); "
                          "name them instead, e.g. --gpus 0,1")
        ids = out.stdout.split()
    else:
        ids = spec.split(",")
    if not all(re.fullmatch(r"\d+", i) for i in ids) or len(set(map(int, ids))) != len(ids):
        raise Refused(f"--gpus wants all, or distinct GPU indices separated by commas (0,1,3), not {spec!r}")
    return [int(i) for i in ids]


def worktree(name, start):
    """The worktree of agent NAME (gpu<N>, agent<i>) beside the repository: (path, its branch, the tag
    for run.sh); the branch is None when the worktree is still to be made, '' when it is detached. An
    existing one is reused only if it is a worktree of this repository, detached or on a branch of NAME's."""
    path = ROOT.parent / f"{ROOT.name}-{name}"
    who = f"GPU {name[3:]}" if name.startswith("gpu") else f"agent {name[5:]}"
    date = time.strftime("%b%d").lower()  # as run.sh names a branch it starts
    free = next(t for t in (f"{date}{s}-{name}" for s in ["", *"bcdefghijklmnopqrstuvwxyz"])
                if not git(ROOT, "rev-parse", "-q", "--verify", f"refs/heads/autoresearch/{t}"))
    if not path.exists() and not path.is_symlink():
        return path, None, free
    top, common = git(path, "rev-parse", "--show-toplevel"), git(path, "rev-parse", "--git-common-dir")
    ours = git(ROOT, "rev-parse", "--git-common-dir")
    if top is None or Path(top).resolve() != path.resolve() or \
            (path / common).resolve() != (ROOT / ours).resolve():
        raise Refused(f"{path} exists and is not a worktree of this repository; move it away "
                      f"(night.py makes {who}'s worktree there)"
                      + (f", or leave {who} out of --gpus" if name.startswith("gpu") else ""))
    branch = git(path, "symbolic-ref", "-q", "--short", "HEAD") or ""
    if branch and not re.fullmatch(rf"autoresearch/.+-{name}", branch):
        raise Refused(f"the worktree {path} is on {branch}, not on a branch of {who}'s (autoresearch/"
                      f"<tag>-{name}) nor detached; start it afresh from main with "
                      f"`git -C {path} switch --detach main` (its branch stays), or move it away")
    return path, branch, branch.removeprefix("autoresearch/") if branch else free


def project_python():
    """The main checkout's Python, found as run.sh finds it (uv), for every worktree."""
    try:
        out = subprocess.run(["uv", "run", "--project", str(ROOT), "--frozen", "python", "-I", "-S", "-c",
                              "import sys; print(sys.executable)"], cwd="/", capture_output=True, text=True,
                             timeout=600)
    except FileNotFoundError:
        out = None
    if out is None or out.returncode != 0 or not out.stdout.strip():
        why = "uv is not installed" if out is None else (out.stderr.strip().splitlines() or ["uv failed"])[-1]
        raise Refused(f"could not get the project's Python ({why}): run `uv sync` in {ROOT}, or set "
                      "AUTORESEARCH_PYTHON to a Python with PyTorch")
    return out.stdout.strip()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--agent", choices=["claude", "codex"], default="claude")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--until", metavar="HH:MM", help="stop at this local time (the next one)")
    when.add_argument("--for", dest="duration", metavar="DURATION", help="stop after 8h, 90m, 30s ...")
    many = p.add_mutually_exclusive_group()
    many.add_argument("--gpus", metavar="LIST", help="one agent per GPU of this machine, each in a worktree "
                      "<repo>-gpu<N>: GPU indices (0,1,3) or all (from nvidia-smi)")
    many.add_argument("--agents", metavar="N", help="under Slurm (AUTORESEARCH_SLURM): N agents, each in a "
                      "worktree <repo>-agent<i>, none pinned to a GPU (Slurm gives each experiment one)")
    p.add_argument("--pause", type=float, default=15,
                   help="seconds between sessions (doubled, up to 600, after a session under a minute)")
    p.add_argument("extra", nargs="*", help="after --: more arguments for the agent CLI (e.g. -- --model opus)")
    args = p.parse_args()
    night = Night(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
    try:
        return night.run()
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
