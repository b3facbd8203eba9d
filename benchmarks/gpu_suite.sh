#!/usr/bin/env bash
# The GPU rows of benchmarks/RESULTS.md in one command, run from the repository root:
#
#   bash benchmarks/gpu_suite.sh SHARED OUT [SETTING ...]
#
# SHARED holds data/cifar10-jpeg.npz and tools/cifar10_jpeg.py (the project's ../shared); the JSON rows go to
# OUT/gpu.jsonl, the log to OUT/gpu.log. SETTINGs default to all three GPU settings. Each runs one round
# (plain loop, pack, bank) and takes a few minutes on an H100; where one command may run 10 minutes at
# most, give one SETTING per command. BENCH_ARGS is added to every bank_throughput.py command line
# (BENCH_ARGS=--compile: torch.compile the pack's forward and loss; BENCH_ARGS="--epochs 1": shorter).
#
# On a GPU machine that received the repository with the ignored folders .gpu-shared/ (a copy of SHARED's
# data/cifar10-jpeg.npz and tools/cifar10_jpeg.py) and .whl/ (below):
#   bash benchmarks/gpu_suite.sh .gpu-shared "$OUT" cifar10-airbench
#
# Needs python3 with CUDA torch, numpy, PyYAML, Pillow and pydantic; Ray, MLflow and Optuna are not used. A
# machine without pydantic takes it as wheels in .whl/, made where pip can reach the registry:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 -d .whl pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 \
#     typing-inspection==0.4.2 typing-extensions==4.16.0
set -euo pipefail
shared=${1:?usage: gpu_suite.sh SHARED OUT [SETTING ...]}
out=${2:?usage: gpu_suite.sh SHARED OUT [SETTING ...]}
shift 2
settings=("$@")
[ ${#settings[@]} -gt 0 ] || settings=(cifar10-airbench cifar10-resnet18 cifar10-wrn28-2)
[ -f "$shared/data/cifar10-jpeg.npz" ] || { echo "gpu_suite.sh: $shared/data/cifar10-jpeg.npz not found" >&2; exit 2; }
mkdir -p "$out"
if ! python3 -c "import pydantic" 2>/dev/null; then
  ls .whl/*.whl >/dev/null 2>&1 || { echo "gpu_suite.sh: pydantic is missing and .whl/ holds no wheels" >&2; exit 2; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/raymia-site .whl/*.whl
  export PYTHONPATH=/tmp/raymia-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$out/gpu.log"
for s in "${settings[@]}"; do
  case $s in
    cifar10-airbench) k=32 plain=2 ;;
    *) k=16 plain=1 ;;
  esac
  python3 benchmarks/bank_throughput.py --setting "$s" --device cuda --models "$k" --plain-models "$plain" \
    --repeats 1 --shared "$shared" --json "$out/gpu.jsonl" ${BENCH_ARGS:-} 2>&1 | tee -a "$out/gpu.log"
done
