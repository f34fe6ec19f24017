#!/usr/bin/env python3
"""Run the research agent headless for a night, restarting it whenever it stops.

    .agents/night.py --until 07:00                 # Claude Code (claude -p)
    .agents/night.py --agent codex --for 8h        # Codex (codex exec)
    touch .agents/stop                             # ask it to stop

The agent is told to read program.md in full and follow it (START below): what
to read, the set-up and the loop are program.md's alone, the prompts add only
what is particular to a headless night. When the agent ends its turn (which headless
agents do, "never stop" or not), it is started again, in a fresh session, with a
prompt to go on from scratchpad.md and results.tsv (RESTART), until the deadline or
until the stop file appears. Everything goes to .agents/night.log.

An experiment is never cut short or repeated by this script: before a restart it
waits until no run.sh holds the checkout's lock, and to stop it takes that lock
itself (so the running experiment finishes and no new one can start), then ends
the agent. Ctrl-C or SIGTERM ends the agent at once instead (run.sh then records
the running experiment as an interrupted crash).

Claude Code ignores .claude/settings.json, and Codex .codex/, in a checkout that
the person has not trusted once; a night would then end within seconds. When the
CLI says so, this script stops with an error saying what to do (exit 2). See the
README, "Running the agent".

Python's standard library only (system python3): it watches a deadline, a stop
file, the agent's stderr and its process group, and takes an flock, which is
clearer here than in bash.
"""

import argparse
import datetime as dt
import fcntl
import os
import re
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


class Night:
    def __init__(self, args):
        self.args, self.deadline = args, deadline_of(args)
        self.stop_file = HERE / "stop"
        self.log = open(HERE / "night.log", "a", buffering=1, encoding="utf-8")
        git_dir = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--absolute-git-dir"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        # run.sh's per-checkout lock (an flock, held while an experiment runs).
        self.lock_path = Path(git_dir) / "autoresearch" / "lock"
        self.untrusted = None

    def say(self, text, loud=False):
        line = f"[night {time.strftime('%Y-%m-%d %H:%M:%S')}] {text}"
        self.log.write(line + "\n")
        print(line, file=sys.stderr, flush=True)
        if loud:
            self.log.write("\n")

    def stop_reason(self):
        if self.stop_file.exists():
            return f"stop file {self.stop_file.relative_to(ROOT)} found"  # removed at the next start
        if time.time() >= self.deadline:
            return "deadline reached"
        return None

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

    def watch_stderr(self, proc):
        for line in proc.stderr:
            self.log.write(line)
            if UNTRUSTED[self.args.agent] in line and not self.untrusted:
                self.untrusted = line.strip()
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    def session(self, prompt):
        """One agent session; returns why it ended: 'ended (...)', 'untrusted' or a stop reason."""
        env = dict(os.environ, CLAUDE_CODE_DISABLE_BACKGROUND_TASKS="1")  # experiments in the foreground
        try:
            proc = subprocess.Popen(command(self.args.agent, prompt, self.args.extra), cwd=ROOT, env=env,
                                    stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.PIPE,
                                    text=True, start_new_session=True)
        except FileNotFoundError:
            return "missing"
        watcher = threading.Thread(target=self.watch_stderr, args=(proc,), daemon=True)
        watcher.start()
        try:
            while proc.poll() is None:
                reason = self.stop_reason()
                if reason:
                    self.say(f"{reason}: stopping the agent once no experiment is running")
                    with self.take_lock():  # held: a new ./run.sh is refused meanwhile
                        self.end(proc)
                    return reason
                time.sleep(1)
        finally:
            self.end(proc)
            watcher.join(timeout=5)
        return "untrusted" if self.untrusted else f"ended (exit status {proc.returncode})"

    def end(self, proc):
        """End the agent's whole process group (its shell tools included)."""
        if proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=wait)
                return
            except ProcessLookupError:
                return
            except subprocess.TimeoutExpired:
                pass

    def run(self):
        self.say(f"night starts: agent {self.args.agent}, "
                 + ("no deadline" if self.deadline == float("inf")
                    else time.strftime("until %Y-%m-%d %H:%M:%S", time.localtime(self.deadline)))
                 + f", stop file {self.stop_file.relative_to(ROOT)}, log {self.log.name}")
        if self.stop_file.exists():
            self.stop_file.unlink()
            self.say("removed a stop file left from an earlier night")
        prompt, pause, n = START, self.args.pause, 0
        while True:
            n += 1
            self.say(f"session {n} starts")
            t0 = time.time()
            why = self.session(prompt)
            if why == "missing":
                self.say(f"ERROR: `{self.args.agent}` is not on PATH; install it (README, "
                         "\"Running the agent\")", loud=True)
                return 1
            if why == "untrusted":
                self.say(f"ERROR: {self.args.agent} does not trust this workspace, so it ignores the "
                         "project's settings (.claude/ or .codex/): the agent could not edit train.py "
                         f"or run ./run.sh, and the night would end at once. {self.args.agent} said:\n"
                         f"    {self.untrusted}\nDo this once, then start again: "
                         + TRUST_STEP[self.args.agent].format(root=ROOT)
                         + " (README, \"Running the agent\").", loud=True)
                return 2
            if not why.startswith("ended"):
                self.say(f"night over ({why}) after {n} session(s)")
                return 0
            self.say(f"session {n} {why} after {time.time() - t0:.0f}s")
            self.take_lock().close()  # never restart while an experiment runs
            # A session that ends at once (an API error, a broken set-up) must not spin all night.
            pause = min(pause * 2, 600) if time.time() - t0 < 60 else self.args.pause
            end = time.time() + pause
            while time.time() < end and not self.stop_reason():
                time.sleep(1)
            reason = self.stop_reason()
            if reason:
                self.say(f"night over ({reason}) after {n} session(s)")
                return 0
            prompt = RESTART


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--agent", choices=["claude", "codex"], default="claude")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--until", metavar="HH:MM", help="stop at this local time (the next one)")
    when.add_argument("--for", dest="duration", metavar="DURATION", help="stop after 8h, 90m, 30s ...")
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
