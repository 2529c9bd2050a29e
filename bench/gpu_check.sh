#!/usr/bin/env bash
# The GPU check: install, versions, the kernel tests compiled on the GPU, and `hsort bench` at the paper's
# shapes (ROI 168, batch 2 and 4, float32 and bfloat16), in under 5 minutes on one H100, fetching nothing.
#
#   bench/gpu_check.sh [--dry] [OUT_DIR]        (from the repository root)
#
# Each step runs under its own time limit, all within one budget, and a failing step does not stop the next.
# The training step, head and block are measured before the layer sweep, so a slow sweep cannot cost them.
# OUT_DIR (default: $OUT, else bench/out) receives gpu_check.log, step-<dtype>.json, layers-<dtype>.json,
# static.json (`hsort bench --static`, computed on the CPU meanwhile) and summary.txt; the table of steps, the
# bench's headline numbers and each measured time beside its static lower bound are printed last.  --dry runs the
# same steps on the CPU with tiny sizes and the kernel tests in the Triton interpreter, to prove the script
# without a GPU.  PYTHON picks the interpreter (default: .venv/bin/python if present, else python3).
set -uo pipefail

dry=0
out_dir=""
for argument in "$@"; do
  case "$argument" in
    --dry) dry=1 ;;
    -h | --help) sed -n '2,13p' "$0" | cut -c3-; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $argument (see --help)" >&2; exit 2 ;;
    *) out_dir=$argument ;;
  esac
done
out_dir=${out_dir:-${OUT:-bench/out}}
if [[ -x .venv/bin/python ]]; then default_python=.venv/bin/python; else default_python=python3; fi
python=${PYTHON:-$default_python}
budget=${GPU_CHECK_BUDGET:-285}  # seconds for all steps together
started=$SECONDS
export PYTHONUNBUFFERED=1

mkdir -p "$out_dir"
log="$out_dir/gpu_check.log"
: >"$log"

dtypes=(float32 bfloat16)
if ((dry)); then
  bench_arguments=(--device cpu --size 16 --batch 2 --quick)
  kernel_environment=(TRITON_INTERPRET=1 HSORT_KERNELS=triton)
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # tiny CPU ops stall on busy machines with more threads
  limits=(install=120 environment=30 kernel-tests=300 step=60 layers=60)  # the interpreter runs every program in Python
  budget=${GPU_CHECK_BUDGET:-600}
else
  bench_arguments=(--device cuda --preset paper --size 168 --batch 2,4)
  kernel_environment=()
  limits=(install=60 environment=30 kernel-tests=90 step=70 layers=100)
fi

limit_of() {  # limit_of STEP: its limit in seconds from the table above
  local entry
  for entry in "${limits[@]}"; do [[ ${entry%%=*} == "$1" ]] && echo "${entry#*=}"; done
}

results=()  # "step|status|seconds"
run_step() {  # run_step NAME LIMIT COMMAND...: run it under min(LIMIT, what is left of the budget)
  local name=$1 limit=$2
  shift 2
  local left=$((budget - (SECONDS - started)))
  if ((left < 10)); then
    results+=("$name|skipped: time budget spent|0")
    return
  fi
  ((limit > left)) && limit=$left
  local command="$*"
  echo "=== $name (limit ${limit}s): ${command%%$'\n'*}" | tee -a "$log"
  local step_started=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
  local status=${PIPESTATUS[0]}
  if ((status == 0)); then
    status=ok
  elif ((status == 124 || status == 137)); then
    status="timed out after ${limit}s"
  else
    status="failed (exit $status)"
  fi
  results+=("$name|$status|$((SECONDS - step_started))")
}

run_step install "$(limit_of install)" "$python" -m pip install --no-deps --no-build-isolation -e .

# The static bounds of the same work (`hsort bench --static`: compiled for the GPU, nothing run) are computed on the
# CPU while the GPU steps run, outside the budget, so that the summary can put each measured time beside its bound.
if ((dry)); then
  static_arguments=(--preset small --size 16 --layers conv_0_0,down_0)
else
  static_arguments=(--preset paper --size 168)
fi
static_report="$out_dir/static.json"
rm -f "$static_report"
echo "=== static (in the background, limit 600s): hsort bench --static --batch 2 ${static_arguments[*]}" | tee -a "$log"
static_started=$SECONDS
timeout --kill-after=10 600 env -u TRITON_INTERPRET "$python" -m hypersort_core.cli bench --static --batch 2 \
  --dtype bfloat16,float32 "${static_arguments[@]}" --out "$static_report" >"$out_dir/static.txt" 2>&1 &
static_pid=$!

read -r -d '' versions <<"EOF"
import importlib.metadata as metadata
import platform

import torch

print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
for name in ("triton", "hypersort-core", "nibabel"):
    try:
        print(f"{name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(f"{name}: not installed")
if torch.cuda.is_available():
    print(f"GPU: {torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)")
else:
    print("GPU: none visible to torch")
EOF
run_step environment "$(limit_of environment)" bash -c \
  'if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "nvidia-smi: not found"; fi; "$0" -c "$1"' "$python" "$versions"

run_step kernel-tests "$(limit_of kernel-tests)" env ${kernel_environment[@]+"${kernel_environment[@]}"} \
  "$python" -m pytest tests/test_per_sample_conv3d.py tests/test_hyper_head.py tests/test_dispatch.py -q

reports=()
for sections in step,head,block layers; do
  for dtype in "${dtypes[@]}"; do
    name="${sections%%,*}-$dtype"
    reports+=("$out_dir/$name.json")
    rm -f "$out_dir/$name.json"  # a report left by an earlier run must not pass for this one's
    run_step "$name" "$(limit_of "${sections%%,*}")" "$python" -m hypersort_core.cli bench "${bench_arguments[@]}" \
      --only "$sections" --dtype "$dtype" --out "$out_dir/$name.json"
  done
done

wait "$static_pid"
static_status=$?
cat "$out_dir/static.txt" >>"$log"
case $static_status in
  0) results+=("static|ok|$((SECONDS - static_started))") ;;
  124 | 137) results+=("static|timed out after 600s|$((SECONDS - static_started))") ;;
  *) results+=("static|failed (exit $static_status)|$((SECONDS - static_started))") ;;
esac

{
  echo
  echo "=== summary ($((SECONDS - started))s of a ${budget}s budget$( ((dry)) && echo ', dry run on the CPU'))"
  printf '%-16s %-30s %s\n' step status seconds
  for result in "${results[@]}"; do
    IFS='|' read -r name status seconds <<<"$result"
    printf '%-16s %-30s %s\n' "$name" "$status" "$seconds"
  done
  for report in "${reports[@]}"; do
    "$python" - "$report" <<"EOF"
import json
import sys
from pathlib import Path

path = Path(sys.argv[1])
if not path.is_file():
    print(f"{path.name}: not written")
    sys.exit()
report = json.loads(path.read_text())
failed = sum(1 for row in report["rows"] if row["error"])
print(f"{path.name}: {report['environment']['device_name']}, ours = {report['environment']['ours']}; "
      f"sections done: {', '.join(report['sections_done']) or 'none'}; {len(report['rows'])} measurements, {failed} failed")
for entry in report["summary"]:
    print(f"  {entry['text']}")
EOF
  done
  echo "measured beside the static issue bound (B=2; bench/calibrate.py):"
  "$python" bench/calibrate.py "$static_report" "${reports[@]}"
} | tee "$out_dir/summary.txt" | tee -a "$log"

for result in "${results[@]}"; do
  [[ $result == *"|ok|"* ]] || exit 1
done
