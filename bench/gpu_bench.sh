#!/usr/bin/env bash
# The GPU figures in one command, on a machine with an NVIDIA GPU and its driver: `bench/gpu_bench.sh`.
#
# 1. the machine described (nvidia-smi, CPU) into bench/results/gpu_machine.txt;
# 2. the CUDA libraries onnxruntime-gpu needs: `pip install -e '.[gpu]'` into .venv (skipped when the GPU is already
#    usable, e.g. a system CUDA 13 + cuDNN 9; an offline machine must have them already);
# 3. the tests that need CUDA (tests/gpu) and the device tests, output into bench/results/gpu_tests.txt;
# 4. the heavy-model bench on CPU and CUDA: ONNX Runtime alone at batch 256/1k/4k for the light and the heavy
#    model, and (unless E2E=0, or when the local stack cannot start) a worker serving the heavy model end to end
#    on each device with the ratio end-to-end / runtime alone: bench/results/heavy_model_gpu.{json,md,png}.
#
# Environment: OUT (results folder, default bench/results), E2E (1 default, 0 to skip the worker runs), INSTALL
# (1 default, 0: never pip install),
# REQUESTS (backlog of each end-to-end run, default 60000), DEVICE_BATCH_ROWS (default 4096).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\033[1m[gpu-bench]\033[0m %s\n' "$*" >&2; }
out=${OUT:-bench/results}
e2e=${E2E:-1}
mkdir -p "$out"
[ -x .venv/bin/python ] || scripts/bootstrap
py=.venv/bin/python

say "1/4 the machine"
{
    date -u +%Y-%m-%dT%H:%M:%SZ
    nvidia-smi 2>/dev/null || echo "nvidia-smi: not found"
    grep -m1 "model name" /proc/cpuinfo || true
    echo "CPUs: $(nproc)"
} > "$out/gpu_machine.txt"
cat "$out/gpu_machine.txt" >&2

usable() { "$py" -c 'from streamscore.workers.devices import cuda_check, refusal; m = cuda_check(); m and print(refusal("cuda", m)); raise SystemExit(1 if m else 0)'; }
say "2/4 the CUDA runtime and cuDNN ([gpu] extra)"
if ! usable >/dev/null && [ "${INSTALL:-1}" = 1 ]; then
    .venv/bin/pip install -q --no-build-isolation -e ".[gpu]" || say "pip install -e '.[gpu]' failed (offline?)"
fi
if ! reason=$(usable); then
    say "$reason"
    exit 1
fi

say "3/4 the tests that need CUDA"
.venv/bin/pytest -q -p no:cacheprovider tests/gpu tests/unit/workers/test_devices.py 2>&1 | tee "$out/gpu_tests.txt"

say "4/4 the heavy-model bench on cpu and cuda"
e2e_flag=()
if [ "$e2e" = 1 ]; then
    if .venv/bin/streamscore stack up; then
        e2e_flag=(--e2e --requests "${REQUESTS:-60000}")
    else
        say "the local stack did not start: runtime-alone figures only (the worker runs need Kafka, Cassandra, Redis)"
    fi
fi
"$py" -m streamscore_bench.heavy_model --devices cpu,cuda --device-batch-rows "${DEVICE_BATCH_ROWS:-4096}" \
    --out "$out" --name heavy_model_gpu "${e2e_flag[@]}"
say "wrote $out/heavy_model_gpu.{json,md,png}, $out/gpu_tests.txt and $out/gpu_machine.txt"
