#!/usr/bin/env bash
# Issue 17 item 7: the GPU figures, in one prepared run on a CUDA machine (not run in CI).
#
#   benchmarks/gpu_bench.sh            # from the repository root; PYTHON=... to pick the interpreter
#
# Prints ms per training iteration of the tutorial's 32w net (bench_train.py), seconds per
# 1388x1040 image of the 10-crop evaluation (bench_eval.py; windows/s and crops/s), and ms per
# iteration of ResNet-18/50, ours vs plain PyTorch, fp32 and bf16 autocast (bench_arch.py), all on
# CUDA.  Each step has its own time limit so that one slow step cannot use up a short device lease.
set -u
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
STEP_LIMIT=${STEP_LIMIT:-150}

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_bench: torch reports no CUDA device (torch $("$PYTHON" -c 'import torch; print(torch.__version__)' 2>/dev/null))" >&2
    exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
"$PYTHON" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name(0))'

status=0
step() {  # step NAME COMMAND...: run with a time limit, keep going after a failure
    local name=$1; shift
    echo "== $name"
    timeout "$STEP_LIMIT" "$@" || { echo "gpu_bench: $name failed or timed out (status $?)"; status=1; }
}
step "train, 32w net, batch 128" "$PYTHON" benchmarks/bench_train.py --device cuda --iterations 50
step "train, 32w net, batch 1024" "$PYTHON" benchmarks/bench_train.py --device cuda --iterations 50 --batch 1024 --records 8192
step "evaluate, one image, 10 crops" "$PYTHON" benchmarks/bench_eval.py --device cuda --loop-windows 50 --repeats 5 --process-repeats 2
step "architectures, fp32" "$PYTHON" benchmarks/bench_arch.py --device cuda --repeat 5
step "architectures, bf16 autocast" "$PYTHON" benchmarks/bench_arch.py --device cuda --repeat 5 --amp bf16
exit $status
