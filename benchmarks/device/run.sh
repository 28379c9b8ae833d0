#!/usr/bin/env bash
# The device suite: every GPU check of histobench as one prepared command (issue 15).
#
# On the GPU machine, from the repository root, with benchmarks/device/wheels/ carried (fetch_wheels.sh):
#
#     bash benchmarks/device/run.sh                 # results and suite.log -> $OUT (or results/device/)
#
# On a CPU, as the test suite does (tests/test_device_suite.py), so that the script cannot rot:
#
#     bash benchmarks/device/run.sh --dry-run       # same parts, --quick sizes, no CUDA, no installs
#
# Options: --dry-run; --only part,part (run only these); --out DIR; --list (print the table and exit).
# Environment: PYTHON (the interpreter; python3 on the device, .venv/bin/python in a dry run),
# HISTOBENCH_COMMIT (recorded as the commit where the tree has no .git), HISTOBENCH_DEVICE_SUITE_FAIL
# (comma-separated parts whose command is replaced by `false`: tests the failure path),
# HISTOBENCH_DEVICE_SUITE_SCALE (multiplies every time budget; default 1, and 3 in a dry run, whose quick
# parts on a shared CPU say nothing about the device's times).
#
# Each part runs in its own process under `timeout` with its own budget, so one slow part cannot starve the
# rest; a failed part is recorded and the others go on. Budgets add up to 480 s, which leaves two of the GPU
# tool's 10 minutes for the installs and start-up. A part whose script does not exist yet is listed as
# absent and costs nothing, so the method benchmarks join by being written: benchmarks/<part>_speed.py run as
# `--device cuda --out FILE` (dry run: `--quick --device cpu --out FILE`), its default size within its budget.
#
# ------------------------------------------------------------------------------------------- budget table
# part             budget_s  what runs (full size on the GPU; --dry-run: --quick on the CPU)
SUITE='
preflight                20  suite.py preflight: imports and versions, plugins via entry points, CUDA
pretrain                 50  pretrain_speed.py: DINO ViT-S/16, batch 256, 2x224+8x96, bf16 (eager)
pretrain_compile        100  pretrain_speed.py --compile: the same, torch.compile on both sides
extract                  90  extract_speed.py --slides 3 --size 12288: encoder-only, decode ceilings, CLAM-style, nvJPEG
slpd                     75  slpd_speed.py --steps 15: paper size (ViT-4K 192-d, batch 512, 256 x 48 regions)
dirl                     30  dirl_speed.py, when the file exists
hlss                     30  hlss_speed.py, when the file exists
finetune                 30  finetune_speed.py, when the file exists
pytest_gpu               55  pytest -m gpu on the test files that mark gpu tests (per-test timeout 40 s)
'
# ------------------------------------------------------------------------------------------------------------
set -uo pipefail  # no -e: a failed part must not stop the suite

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
HERE="$ROOT/benchmarks/device"
cd "$ROOT" || exit 2

DRY=0 ONLY="" LIST=0 DEST="${OUT:-$ROOT/results/device}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --only) ONLY="${2:?--only needs a comma-separated list of parts}"; shift ;;
    --out) DEST="${2:?--out needs a folder}"; shift ;;
    --list) LIST=1 ;;
    -h|--help) sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d'; exit 0 ;;
    *) echo "run.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

PARTS=()
declare -A BUDGET=() WHAT=()
while read -r part budget what; do
  [[ -z "$part" ]] && continue
  PARTS+=("$part"); BUDGET[$part]=$budget; WHAT[$part]=$what
done <<<"$SUITE"

if [[ $LIST == 1 ]]; then
  total=0
  for p in "${PARTS[@]}"; do printf '%-18s %5s  %s\n' "$p" "${BUDGET[$p]}" "${WHAT[$p]}"; total=$((total + BUDGET[$p])); done
  printf '%-18s %5s\n' total "$total"
  exit 0
fi
if [[ -n "$ONLY" ]]; then
  for p in ${ONLY//,/ }; do
    [[ -n "${BUDGET[$p]:-}" ]] || { echo "run.sh: no part named $p (parts: ${PARTS[*]})" >&2; exit 2; }
  done
fi

if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
elif [[ $DRY == 1 && -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"
else PY=python3; fi

SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/histobench-device-suite.XXXXXX")"
trap 'rm -rf "$SCRATCH"' EXIT
mkdir -p "$DEST" "$SCRATCH/raw"
LOG="$DEST/suite.log" STATE="$SCRATCH/state.jsonl"
for p in "${PARTS[@]}"; do rm -f "$DEST/$p.json"; done  # this run's results only
rm -f "$DEST/parts.json"
: >"$LOG"
say() { echo "$*" | tee -a "$LOG"; }

export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
SCALE="${HISTOBENCH_DEVICE_SUITE_SCALE:-$((DRY ? 3 : 1))}"
if [[ $DRY == 1 ]]; then
  # The CPU stand-in: no CUDA, one thread per process (2 shared cores), and mlflow/sksurv hidden as on the device.
  export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=1
  # Code from core/ and plugins/ as on the device; entry points from the venv's install of histobench.
  export PYTHONPATH="$HERE/dry_run_site:$ROOT/core:$ROOT/plugins${PYTHONPATH:+:$PYTHONPATH}"
else
  # The device: install the carried wheels and histobench itself into a private folder, never the image's venv.
  SITE="$ROOT/.device-site"
  rm -rf "$SITE"; mkdir -p "$SITE"
  t0=$SECONDS
  shopt -s nullglob; wheels=("$HERE"/wheels/*.whl); shopt -u nullglob
  if [[ ${#wheels[@]} -eq 0 ]]; then
    say "no wheels in benchmarks/device/wheels: run benchmarks/device/fetch_wheels.sh and carry that folder"
  elif ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
        --target "$SITE" "${wheels[@]}" >>"$LOG" 2>&1; then
    say "installing the carried wheels failed (see suite.log); the parts that need them will fail"
  fi
  # histobench's entry points need installed metadata; its code is then taken from core/ and plugins/.
  if ! "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --disable-pip-version-check \
      --target "$SITE/histobench-dist" "$ROOT" >>"$LOG" 2>&1; then
    say "pip could not install histobench (see suite.log); writing its entry points by hand"
    "$PY" "$HERE/suite.py" distinfo --target "$SITE/histobench-dist" >>"$LOG" 2>&1
  fi
  export PYTHONPATH="$ROOT/core:$ROOT/plugins:$SITE/histobench-dist:$SITE${PYTHONPATH:+:$PYTHONPATH}"
  say "installs took $((SECONDS - t0)) s"
fi

start_args=(); [[ $DRY == 1 ]] && start_args=(--dry-run)
"$PY" "$HERE/suite.py" start --state "$STATE" "${start_args[@]}" 2>>"$LOG" | tee -a "$LOG" \
  || { echo '{"device": "unknown", "commit": "unknown", "started": "?", "mode": "?"}' >"$STATE"; say "suite start failed"; }

# The command of one part, into CMD (empty when its script is absent).
command_for() {
  local part=$1 raw=$2 dev=(--device cuda)
  [[ $DRY == 1 ]] && dev=(--quick --device cpu)
  CMD=()
  case "$part" in
    preflight) CMD=("$PY" "$HERE/suite.py" preflight --out "$raw" "${start_args[@]}") ;;
    pretrain) CMD=("$PY" benchmarks/pretrain_speed.py "${dev[@]}" --out "$raw") ;;
    pretrain_compile)
      CMD=("$PY" benchmarks/pretrain_speed.py "${dev[@]}" --compile --out "$raw")
      # On the CPU, dynamo is switched off: the dry run checks the script, not inductor (40 s on 2 cores).
      [[ $DRY == 1 ]] && CMD=(env TORCHDYNAMO_DISABLE=1 "${CMD[@]}") ;;
    extract) CMD=("$PY" benchmarks/extract_speed.py "${dev[@]}" --slides 3 --size 12288 --write-workers 3
                  --slides-dir "$SCRATCH/slides" --out "$raw") ;;
    slpd) CMD=("$PY" benchmarks/slpd_speed.py "${dev[@]}" --steps 15 --out "$raw") ;;
    pytest_gpu)
      # Only the test files that mark gpu tests are collected: the same tests as `pytest -m gpu tests`, without
      # importing every other test module (time, and their imports of what does not travel).
      mapfile -t gpu_files < <(grep -rlE --include='test_*.py' 'mark\.gpu' tests | sort)
      CMD=("$PY" -m pytest -m gpu "${gpu_files[@]}" -q -rfE -p no:cacheprovider --continue-on-collection-errors
           --timeout 40 --junitxml "$SCRATCH/junit.xml") ;;
    *) [[ -f "benchmarks/${part}_speed.py" ]] && CMD=("$PY" "benchmarks/${part}_speed.py" "${dev[@]}" --out "$raw") ;;
  esac
}

n=0
for part in "${PARTS[@]}"; do
  [[ -n "$ONLY" && ",$ONLY," != *",$part,"* ]] && continue
  n=$((n + 1)) budget=${BUDGET[$part]} raw="$SCRATCH/raw/$part.json"
  command_for "$part" "$raw"
  if [[ ${#CMD[@]} -eq 0 ]]; then
    "$PY" "$HERE/suite.py" absent --state "$STATE" --part "$part" --budget "$budget" \
      --reason "benchmarks/${part}_speed.py does not exist (yet)"
    say "[$n] $part: absent"
    continue
  fi
  [[ ",${HISTOBENCH_DEVICE_SUITE_FAIL:-}," == *",$part,"* ]] && CMD=(false)  # injected failure
  printf '\n===== %s (budget %s s) %s\n$ %s\n' "$part" "$budget" "$(date -u +%FT%TZ)" "${CMD[*]}" >>"$LOG"
  t0=$(date +%s.%N)
  timeout --kill-after=5 "$((budget * SCALE))" "${CMD[@]}" >>"$LOG" 2>&1
  rc=$?
  secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.2f", b - a}')
  junit=(); [[ $part == pytest_gpu ]] && junit=(--junit "$SCRATCH/junit.xml")
  "$PY" "$HERE/suite.py" record --state "$STATE" --dest "$DEST" --part "$part" --rc "$rc" --seconds "$secs" \
    --budget "$budget" --command "${CMD[*]}" --raw "$raw" "${junit[@]}" 2>>"$LOG"
  say "[$n] $part: exit $rc after $secs s (budget $budget s)"
done

echo >>"$LOG"
"$PY" "$HERE/suite.py" summary --state "$STATE" --dest "$DEST" 2>>"$LOG" | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
