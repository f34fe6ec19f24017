"""README.md and program.md: what they tell the agent and the person is what the code does.

What needs a real run (the report's lines, the results.tsv columns, the baseline refusal) is
checked against the smoke night of tests/test_e2e.py; the figures prepare.py defines (the
allowances, the time limit) in tests/test_prepare.py. Here: what the agent reads at set-up,
and the statements that need no run.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
READING_BUDGET = 16_000  # tokens (characters / 4) the agent reads at set-up (issue 18; was ~46k)


def read(name):
    return (REPO / name).read_text(encoding="utf-8")


def supervisor():
    """.agents/night.py as a module (its prompts)."""
    sys.path.insert(0, str(REPO / ".agents"))
    try:
        import night
    finally:
        sys.path.pop(0)
    return night


def reading_list():
    """[(file, text)]: what program.md's set-up tells the agent to read, cut where it says."""
    setup = read("program.md").split("## 1. Set-up", 1)[1].split("\n2. ", 1)[0]
    items = re.findall(r"^   - `([^`]+)`(?:, up to the line `([^`]+)`)?", setup, re.M)
    out = []
    for name, fence in items:
        text = read(name)
        if fence:
            assert text.count(fence) == 1, f"{name}: the fence {fence!r} must appear exactly once"
            text = text[:text.index(fence)]
        out.append((name, text))
    return out


def test_what_the_agent_reads_at_set_up_fits_the_budget():
    """program.md names the files (and where to stop in prepare.py); their sum is the figure."""
    files = reading_list()
    names = [n for n, _ in files]
    assert sorted(names) == ["prepare.py", "program.md", "scratchpad.md", "train.py"], names
    tokens = {n: len(t) // 4 for n, t in files}
    total = sum(tokens.values())
    print(f"set-up reading: {total} tokens (characters / 4): {tokens}")
    assert total <= READING_BUDGET, f"the agent's set-up reading is {total} tokens: {tokens}"
    # The README is for the person: the set-up and the restart prompts never send the agent there.
    # (What train.py imports is above prepare.py's fence: tests/test_prepare.py.)
    night = supervisor()
    for text in (read("program.md"), night.START, night.RESTART):
        assert "README" not in text


def test_the_readme_file_table_names_every_tracked_top_level_entry():
    ls = subprocess.run(["git", "-C", str(REPO), "ls-files"], capture_output=True, text=True)
    if ls.returncode != 0:
        pytest.skip("not a git checkout")
    entries = {p.split("/")[0] for p in ls.stdout.splitlines()}
    table = read("README.md").split("| file | what it is |", 1)[1].split("\n\n", 1)[0]
    named = set(re.findall(r"`([^`/]+)/?[^`]*`", table))
    assert entries <= named, f"not in the README's file table: {sorted(entries - named)}"


def test_the_experiments_an_hour_follow_from_the_example_report():
    """The README's time per experiment and experiments per hour agree with its example report."""
    readme = " ".join(read("README.md").split())
    minutes = {int(m) for m in re.findall(r"experiment takes about (\d+) minutes", readme)}
    minutes |= {int(m) for m in re.findall(r"One experiment takes about (\d+) minutes",
                                            " ".join(read("program.md").split()))}
    assert len(minutes) == 1, minutes
    (m,) = minutes
    total = float(re.search(r"^outside: .* of ([0-9.]+)s outside the budget", read("README.md"), re.M)[1])
    assert round(total / 60) == m, (total, m)
    per_hour, per_night = map(int, re.search(r"so about (\d+) run an hour and (\d+) a night", readme).groups())
    assert per_hour == 60 // m and per_night == 8 * per_hour


def test_the_interactive_prompt_in_the_readme_is_the_supervisors():
    night = supervisor()
    block = read("README.md").split("**Interactive instead.**", 1)[1].split("```text\n", 1)[1]
    assert " ".join(block.split("```", 1)[0].split()) == " ".join(night.START.split())


def constant(name, file):
    """The first value of a constant (the GPU profile's: the smoke profile's come after)."""
    return int(re.search(rf"^\s*{name} = (\d+)", read(file), re.M)[1])


@pytest.mark.parametrize("name", ["program.md", "README.md"])
def test_the_example_reports_add_up(name):
    """An example report's figures are one run's, as run.sh computes them: the training process's
    seconds are start-up + compile and warm-up + the harness's training clock, the whole is run.sh
    before + those seconds + the evaluator's three parts + run.sh after, outside is the whole less
    training; the tokens are the batches of the default train.py; the counts, the change and the
    sandbox line are as run.sh prints them."""
    (block,) = re.findall(r"^```\n(---\nstatus: .*?)^```", read(name), re.S | re.M)
    r = dict(re.findall(r"^([a-z_]+):\s+(.*)$", block, re.M))
    f = float
    train, budget, batches, hand, tokens, ev = re.fullmatch(
        r"([0-9.]+)s by the harness's clock \(budget (\d+)s; from training batch \d+ of (\d+) to the exit, "
        r"hand-over ([0-9.]+)s\), (\d+) tokens; evaluation ([0-9.]+)s", r["training"]).groups()
    assert int(budget) == constant("TIME_BUDGET", "prepare.py")
    per_batch = constant("DEVICE_BATCH_SIZE", "train.py") * constant("MAX_SEQ_LEN", "prepare.py")
    assert int(tokens) == int(batches) * per_batch, (tokens, batches, per_batch)
    out, total, before, up, warm, ev0, ev1, held, after = map(f, re.fullmatch(
        r"([0-9.]+)s of ([0-9.]+)s outside the budget: run.sh before ([0-9.]+), start-up ([0-9.]+), compile and "
        r"warm-up ([0-9.]+), evaluator start-up ([0-9.]+), evaluation ([0-9.]+), held-out evaluation ([0-9.]+), "
        r"run.sh after ([0-9.]+)", r["outside"]).groups())
    assert ev1 == f(ev)
    assert abs(f(r["seconds"]) - (up + warm + f(train))) < 0.15, "seconds: start-up + warm-up + training"
    assert abs(total - (before + f(r["seconds"]) + ev0 + ev1 + held + after)) < 0.35, "the whole, by phase"
    assert abs(out - (total - f(train))) < 0.15, "outside: the whole less training"
    n, keep, discard, crash, rerun = map(int, re.match(
        r"(\d+) on \S+ \((\d+) keep, (\d+) discard, (\d+) crash, (\d+) rerun\)", r["experiments"]).groups())
    assert n == keep + discard + crash + rerun
    change, spread = f(r["change"].split()[0]), f(re.match(r"val_bpb spread ([0-9.]+)", r["noise"])[1])
    if r["status"] == "discard":
        assert abs(change - (f(r["val_bpb"]) - f(r["best"].split()[0]))) < 1e-9
    assert r["change"].endswith("(within the rerun spread: may be noise)" if abs(change) <= spread
                               else "(beyond the rerun spread)")
    assert re.fullmatch(r"bubblewrap [0-9.]+ \(/\S+/bwrap\)", r["sandbox"]), r["sandbox"]


def test_the_readme_quotes_the_agent_kit_as_it_is():
    """What the README quotes of the shipped kit: the count of allow rules in Claude Code's warning
    on an untrusted checkout, the Bash time-outs, and the CLI versions tested (tests/package.json)."""
    readme = " ".join(read("README.md").split())
    settings = json.loads(read(".claude/settings.json"))
    (n,) = set(re.findall(r"Ignoring (\d+) permissions\.allow entries", readme))
    assert int(n) == len(settings["permissions"]["allow"])
    (ms,) = set(re.findall(r"BASH_DEFAULT_TIMEOUT_MS, BASH_MAX_TIMEOUT_MS = (\d+)", readme))
    assert set(settings["env"].values()) == {ms}
    pinned = json.loads(read("tests/package.json"))["dependencies"]
    texts = {"README.md": readme, ".agents/night.py": " ".join(read(".agents/night.py").split()),
             ".codex/config.toml": " ".join(read(".codex/config.toml").split())}
    for cli, package in (("Claude Code", "@anthropic-ai/claude-code"), ("Codex", "@openai/codex")):
        said = {(name, v) for name, text in texts.items() for v in re.findall(rf"\b{cli} (\d+\.\d+(?:\.\d+)?)\b", text)}
        assert said and all(pinned[package] == v or pinned[package].startswith(v + ".") for _, v in said), \
            (cli, pinned[package], said)


def test_every_setting_run_sh_reads_is_in_the_readme_table():
    """The environment variables run.sh reads as settings (${NAME:-default}) are the README's table's."""
    read_by_run_sh = set(re.findall(r"\$\{(AUTORESEARCH_[A-Z_]+):?-", read("run.sh")))
    table = read("README.md").split("| variable | default | meaning |", 1)[1].split("\n\n", 1)[0]
    rows = set(re.findall(r"^\| `([A-Z_]+)` \|", table, re.M))
    assert read_by_run_sh and read_by_run_sh <= rows, sorted(read_by_run_sh - rows)
    assert rows - read_by_run_sh == {"CUDA_VISIBLE_DEVICES"}, sorted(rows - read_by_run_sh)
    defaults = dict(re.findall(r"^\| `([A-Z_]+)` \| ([^|]*) \|", table, re.M))
    for name, default in re.findall(r"\$\{(AUTORESEARCH_[A-Z_]+):-([a-z0-9]+)\}", read("run.sh")):
        assert defaults[name].strip() == f"`{default}`", (name, default, defaults[name])
