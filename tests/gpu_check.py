"""The numbers of tests/gpu_check.sh (the one prepared device check): it calls this script to set
the shortened budget, to read the doctor's and run.sh's reports into result lines (KEY<TAB>VALUE,
appended to OUT/results.txt as soon as they are known), to patch the reference's train.py, and to
turn the result lines into the one markdown table.

    python tests/gpu_check.py budget prepare.py SECONDS        # TIME_BUDGET of the active profile
    python tests/gpu_check.py doctor doctor.txt                # result lines of ./run.sh --doctor
    python tests/gpu_check.py run NAME report.txt run.log CACHE_DIR   # of one ./run.sh
    python tests/gpu_check.py reference SRC DST                # the reference's train.py, FA3 replaced
    python tests/gpu_check.py table results.txt                # the markdown table
    python tests/gpu_check.py unpack PACKAGE.deb DIR           # a Debian package's files (no dpkg needed)
"""

import io
import os
import re
import sys
import tarfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_run import PHASES, report_times  # noqa: E402  run.sh's `outside:` phases, as bench_run reads them

DOCTOR_ITEMS = ["sandbox", "driver", "gpu lock", "python", "gpu", "compile", "matmul", "evaluator", "compile cache",
                "data", "git identity"]
RUNS = [("cold", "ours: first run (cold caches)"), ("warm", "ours: rerun (warm caches)"),
        ("reference", "reference train.py (cold)")]
DATASHEET_TFLOPS = 989.5  # the reference's H100_BF16_PEAK_FLOPS; train.py's figure for H100 and H200


def budget(path, seconds):
    """Set TIME_BUDGET of the profile prepare.py runs in (AUTORESEARCH_SMOKE) to seconds."""
    smoke = os.environ.get("AUTORESEARCH_SMOKE", "") not in ("", "0")
    text = open(path).read()
    lines = list(re.finditer(r"^    TIME_BUDGET = \d+\b", text, re.M))  # the GPU profile's, then the smoke one's
    if len(lines) != 2:
        sys.exit("gpu_check.py: prepare.py has no two lines `    TIME_BUDGET = N` (the profiles') to shorten")
    m = lines[1 if smoke else 0]
    open(path, "w").write(text[:m.start()] + f"    TIME_BUDGET = {int(seconds)}" + text[m.end():])


def put(key, value):
    print(f"{key}\t{str(value).replace(chr(9), ' ').replace(chr(10), ' ')}")


def doctor(path):
    """Each doctor item as `doctor.ITEM: STATUS TEXT`, and the measured matrix rate."""
    text = open(path, errors="replace").read()
    for m in re.finditer(r"^(ok|skip|warn|FAIL) +(\S+(?: \S+)?) +(.*)$", text, re.M):
        name = m.group(2).strip()
        if name in DOCTOR_ITEMS:
            put(f"doctor.{name}", f"{m.group(1)} {m.group(3)}")
    rate = re.search(r"^ok +matmul +bf16 \S+: ([\d.]+) TFLOP/s", text, re.M)
    if rate:
        put("matmul_tflops", rate.group(1))
    last = re.findall(r"^run\.sh: doctor: (.*)$", text, re.M)
    put("doctor", last[-1] if last else "did not finish")


def run(name, report_path, log_path, cache_dir):
    """One ./run.sh: its report's lines (status, the harness's clock, the phases outside the budget)
    and train.py's own summary in run.log (steps, tokens, MFU against the datasheet, peak memory)."""
    report = open(report_path, errors="replace").read()
    log = open(log_path, errors="replace").read() if os.path.exists(log_path) else ""
    for key in ("status", "reason", "val_bpb", "memory_gb", "sandbox", "seconds"):
        m = re.findall(rf"^{key}:\s+(.*)$", report, re.M)
        if m:
            put(f"{name}.{key}", m[-1])
    if not re.search(r"^status:", report, re.M):
        tail = [line for line in report.strip().splitlines() if line.strip()][-3:]
        put(f"{name}.status", "no report")
        put(f"{name}.reason", " / ".join(tail) or "run.sh printed nothing")
    for key, value in (report_times(report) or {}).items():
        put(f"{name}.{key}", f"{value:.1f}")
    summary = dict(re.findall(r"^(\w+):\s+(\S+)\s*$", log.split("\n---\n")[-1], re.M)) if "\n---\n" in log else {}
    device = re.search(r"^Device: (.*?)(?: \(bf16 peak ([\d.]+) TFLOP/s\))?$", log, re.M)
    if device:
        put(f"{name}.device", device.group(1))
    for key in ("training_seconds", "num_steps", "total_tokens_M", "mfu_percent", "peak_vram_mb"):
        if key in summary:
            put(f"{name}.{key}", summary[key])
    try:  # tokens per second over the counted steps (after the 10 warm-up steps), as MFU counts them;
        # total_tokens_M has one decimal: under 1 M (a CPU's smoke run) it says too little
        steps, tokens, secs = int(summary["num_steps"]), float(summary["total_tokens_M"]) * 1e6, float(summary["training_seconds"])
        if tokens >= 1e6:
            put(f"{name}.tokens_per_s", f"{tokens / steps * (steps - 10) / secs:.0f}")
    except (KeyError, ValueError, ZeroDivisionError):
        pass
    size = 0
    for root, _, files in os.walk(cache_dir):
        size += sum(os.path.getsize(os.path.join(root, f)) for f in files if os.path.isfile(os.path.join(root, f)))
    put(f"{name}.compile_cache_mb", f"{size / 1e6:.1f}")


SHIM = '''\
# tests/gpu_check.py: the reference's Flash Attention 3 (downloaded from the hub) replaced by the
# PyTorch kernels ours uses: SDPA (cuDNN on Hopper) for full-context layers, FlexAttention with a
# block mask for sliding windows. q, k, v come in FA3's [B, T, H, D].
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from prepare import MAX_SEQ_LEN as _T


def _window_mask(w, T, device):
    return create_block_mask(lambda b, h, q, k: (k <= q) & (q - k <= w), None, None, T, T, device=device)


class fa3:
    masks = {(_T // 2, _T): _window_mask(_T // 2, _T, "cuda")}  # the reference's short window, made before compiling

    @staticmethod
    def flash_attn_func(q, k, v, causal=True, window_size=(-1, -1)):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        T, w = q.size(2), window_size[0]
        if w < 0 or w >= T:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            if (w, T) not in fa3.masks:
                fa3.masks[(w, T)] = _window_mask(w, T, q.device)
            y = flex_attention(q, k, v, block_mask=fa3.masks[(w, T)])
        return y.transpose(1, 2)
'''


def reference(src, dst):
    """The reference's train.py with its FA3 download (from `from kernels import get_kernel` to the
    line that sets fa3) replaced by SHIM; everything else as it is."""
    text = open(src).read()
    new, n = re.subn(r"^from kernels import get_kernel\n(?:.*\n)*?fa3 = get_kernel\(.*\n", SHIM, text, flags=re.M)
    if n != 1 or "get_kernel" in new:
        sys.exit(f"gpu_check.py: {src} does not load FA3 as the reference did (`from kernels import get_kernel` "
                 f"... `fa3 = get_kernel(...)`): update SHIM's anchors")
    open(dst, "w").write(new)


def table(path):
    r = {}
    for line in open(path, errors="replace"):
        if "\t" in line:
            k, v = line.rstrip("\n").split("\t", 1)
            r[k] = v
    cols = [(k, title) for k, title in RUNS if any(key.startswith(k + ".") for key in r)] or RUNS[:2]
    rows = []

    def row(label, values, bold=False):
        cells = [v if v not in (None, "") else "" for v in values]
        rows.append(f"| {label} | " + " | ".join(f"**{c}**" if bold and c else c for c in cells) + " |")

    def each(fmt):
        return [fmt(k) for k, _ in cols]

    def num(key, f="{:.1f}"):
        return lambda k: f.format(float(r[f"{k}.{key}"])) if f"{k}.{key}" in r else ""

    pad = [""] * (len(cols) - 1)
    for key in ("machine", "machine.note", "gpu_check"):
        if key in r:
            row(key, [r[key], *pad])
    for name in DOCTOR_ITEMS:
        if f"doctor.{name}" in r:
            row(f"doctor: {name}", [r[f"doctor.{name}"].replace("|", "/"), *pad])
    if "doctor" in r:
        row("doctor", [r["doctor"], *pad])
    for key in ("corpus", "prepare"):
        if key in r:
            row(key, [r[key], *pad])
    row("sandbox", each(lambda k: r.get(f"{k}.sandbox", "").replace("|", "/")))
    row("status", each(lambda k: r.get(f"{k}.status", "") + (f": {r[k + '.reason']}" if f"{k}.reason" in r else "")))
    row("val_bpb (evaluator)", each(lambda k: r.get(f"{k}.val_bpb", "")))
    row("training, harness's clock (s)", each(num("training")))
    row("counted steps (after 10 warm-up)", each(lambda k: str(int(r[f"{k}.num_steps"]) - 10) if f"{k}.num_steps" in r else ""))
    row("tokens/s, steady state", each(lambda k: f"{int(r[k + '.tokens_per_s']) / 1e6:.2f} M" if f"{k}.tokens_per_s" in r else ""))
    row(f"MFU vs datasheet ({DATASHEET_TFLOPS:g} TFLOP/s)", each(num("mfu_percent", "{:.2f} %")))
    if "matmul_tflops" in r:
        m = float(r["matmul_tflops"])
        row(f"MFU vs measured bf16 matmul ({m:.0f} TFLOP/s)",
            each(lambda k: f"{float(r[k + '.mfu_percent']) * DATASHEET_TFLOPS / m:.2f} %" if f"{k}.mfu_percent" in r else ""))
    row("peak memory, training (GiB)", each(num("memory_gb")))
    row("outside the budget (s)", each(num("outside")), bold=True)
    for phase in PHASES:
        row(f"- {phase} (s)", each(num(phase)))
    row("run.sh in all (s)", each(num("total")))
    row("compile cache after the run (MB)", each(num("compile_cache_mb")))
    head = "| | " + " | ".join(title for _, title in cols) + " |\n|---|" + "---|" * len(cols)
    print(head + "\n" + "\n".join(rows))


def unpack(deb, directory):
    """A Debian package's files into directory, read with the standard library: a .deb is an ar
    archive (an 8-byte magic, then members with 60-byte headers, padded to even sizes) whose
    member data.tar.* holds the files. For git carried to a machine without it (gpu_check.sh)."""
    with open(deb, "rb") as f:
        blob = f.read()
    if not blob.startswith(b"!<arch>\n"):
        sys.exit(f"gpu_check.py: {deb} is not a Debian package (no ar magic)")
    i = 8
    while i + 60 <= len(blob):
        name, size = blob[i:i + 16].decode().strip().rstrip("/"), int(blob[i + 48:i + 58])
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(blob[i + 60:i + 60 + size])) as tar:
                tar.extractall(directory, filter="tar")
            return
        i += 60 + size + size % 2
    sys.exit(f"gpu_check.py: {deb} has no data.tar member")


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"budget": budget, "doctor": doctor, "run": run, "reference": reference, "table": table, "unpack": unpack}[cmd](*args)
