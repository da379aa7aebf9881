#!/usr/bin/env bash
# The GPU check, one command on a CUDA machine (docs/benchmarks.md, "GPU"):
#   1. installs the GPU stack (./install.sh --gpu) if .venv holds the CPU build of FBGEMM or torch;
#   2. runs the tests marked gpu (sharded equals unsharded on nccl, training, export on CUDA);
#   3. runs benchmarks/speed.py on one GPU (nccl, one process), writing docs/gpu.json and .png;
# each step under `timeout`, all of them within GPU_CHECK_SECONDS (default 480: 8 minutes).
# Idempotent: a second run installs nothing and rewrites docs/gpu.{json,png}.
#
# Exit status: 0 every step passed, or no CUDA device on this machine (it says so and does
# nothing); 1 a step failed; 124 a step ran out of time. A summary line per step is printed.
# Environment: GPU_CHECK_SECONDS (the whole budget), GPU_CHECK_REPEATS (speed.py repeats,
# default 2), NVIDIA_SMI (the probe for a device, default nvidia-smi).
set -uo pipefail
cd "$(dirname "$0")/.."

BUDGET=${GPU_CHECK_SECONDS:-480}
REPEATS=${GPU_CHECK_REPEATS:-2}
NVIDIA_SMI=${NVIDIA_SMI:-nvidia-smi}
PY=.venv/bin/python
deadline=$((SECONDS + BUDGET))
summary=()
status=0

# Before any install: torch may be the CPU build, which sees no GPU; the driver's tool does.
if ! command -v "$NVIDIA_SMI" >/dev/null 2>&1 || ! "$NVIDIA_SMI" -L 2>/dev/null | grep -q "^GPU"; then
  echo "gpu_check: no CUDA device on this machine ($NVIDIA_SMI lists no GPU): nothing to check"
  exit 0
fi

# step NAME CAP_SECONDS COMMAND...: runs COMMAND under timeout (CAP or what is left), records it.
step() {
  local name=$1 cap=$2 start=$SECONDS left rc
  shift 2
  left=$((deadline - SECONDS))
  ((left < cap)) && cap=$left
  if ((cap <= 0)); then
    summary+=("$name: not run, the ${BUDGET}s budget is spent")
    status=124
    return 124
  fi
  echo "== gpu_check: $name (up to ${cap}s)"
  timeout --kill-after=10 "$cap" "$@"
  rc=$?
  if ((rc == 0)); then
    summary+=("$name: ok in $((SECONDS - start))s")
  elif ((rc == 124 || rc == 137)); then
    summary+=("$name: out of time after $((SECONDS - start))s")
    status=124
  else
    summary+=("$name: FAILED (exit $rc) after $((SECONDS - start))s")
    ((status == 0)) && status=1
  fi
  return "$rc"
}

cpu_stack() {  # true when .venv is missing or holds the CPU build of FBGEMM or torch
  [[ -x $PY ]] || return 0
  $PY -m pip show -q fbgemm-gpu-cpu >/dev/null 2>&1 && return 0
  [[ $($PY -c "import torch; print(torch.version.cuda)" 2>/dev/null) == None ]]
}

install_gpu_stack() {
  if [[ -x $PY ]]; then  # both FBGEMM builds provide fbgemm_gpu; pip keeps a CPU torch that satisfies the pin
    $PY -m pip uninstall -q -y fbgemm-gpu-cpu >/dev/null 2>&1
    [[ $($PY -c "import torch; print(torch.version.cuda)" 2>/dev/null) == None ]] \
      && $PY -m pip uninstall -q -y torch >/dev/null 2>&1
  fi
  ./install.sh --gpu && $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'torch sees no CUDA device after the install')"
}

if cpu_stack; then
  export PY
  export -f install_gpu_stack  # timeout runs programs, not shell functions
  step "install the GPU stack (./install.sh --gpu)" "$BUDGET" bash -c install_gpu_stack
else
  summary+=("install: the GPU stack is installed already")
fi

if ((status == 0)); then
  step "tests marked gpu" 240 "$PY" -m pytest -q -m gpu -p no:cacheprovider
  step "speed.py on one GPU -> docs/gpu.json" "$BUDGET" \
    "$PY" benchmarks/speed.py --nprocs 1 --repeats "$REPEATS" --out docs --name gpu
fi

echo "== gpu_check summary ($((SECONDS))s of ${BUDGET}s)"
printf '  %s\n' "${summary[@]}"
exit "$status"
