#!/usr/bin/env bash
# Installs torchrec-memcom and its pinned stack into .venv at the repo root.
# All version pins live here. Usage: ./install.sh [--gpu]
set -euo pipefail
cd "$(dirname "$0")"

TORCH=2.13.0
FBGEMM=1.8.0
TORCHREC=1.8.0
# What torchrec needs besides fbgemm-gpu (installed --no-deps so pip does not pull CUDA fbgemm-gpu).
TORCHREC_DEPS="tensordict==0.15.3 torchmetrics==1.0.3 tqdm==4.70.1 pyre-extensions==0.0.32 iopath==0.1.10"
# Our own runtime and test dependencies.
OWN_DEPS="pyarrow==26.0.1 pyyaml==6.0.3 numpy==2.4.6 torchx==0.7.0 matplotlib==3.11.2 pytest==9.2.0 hypothesis==6.170.15 ruff==0.17.6 mypy==2.4.1"

if [[ "${1:-}" == "--gpu" ]]; then
  # CUDA stack: torch and fbgemm-gpu built for the same CUDA (see docs/install.md).
  FBGEMM_PKG="fbgemm-gpu==${FBGEMM}"
else
  FBGEMM_PKG="fbgemm-gpu-cpu==${FBGEMM}"
fi

[[ -x .venv/bin/python ]] || python3 -m venv .venv
PIP=".venv/bin/python -m pip install -q --disable-pip-version-check"
$PIP "torch==${TORCH}" "${FBGEMM_PKG}"
$PIP --no-deps "torchrec==${TORCHREC}"
$PIP ${TORCHREC_DEPS} ${OWN_DEPS}
$PIP --no-deps -e .
echo "installed torchrec-memcom into .venv"
