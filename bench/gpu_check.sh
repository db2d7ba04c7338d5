#!/usr/bin/env bash
# One-shot GPU check of the serving stack (issue 20), sized for <= 8 minutes on one H100 / H200. From the repo root:
#     bash bench/gpu_check.sh                  # device tool: run(command="bash bench/gpu_check.sh", timeout_s=540)
# Prints, in order: the device and versions; the gpu extra's install result; recap-build-engine for tiny (bf16 +
# fp16, strongly typed); the gpu-marked tests; bench/policy_latency.py --gpu for tiny, then pi06 (random weights,
# 3 x 448^2, 5 steps; its bundle is written in the background from the start, engine builds get whatever time is
# left, BUDGET_S, default 460 s in all).
# Without network the gpu extra comes from wheels in .whl/ (git-ignored; carried to a lent machine, 64 MiB at most:
# onnxruntime-gpu alone is 244 MiB, and TensorRT's libraries come only from pypi.nvidia.com; see the README);
# a backend that cannot be installed is reported as unavailable, the rest still runs. The image's python3 (with
# CUDA torch) runs the code from this tree through PYTHONPATH; nothing is pip-installed from the tree itself.
# Writes its log to $OUT/gpu_check.log when $OUT is set.
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
BUDGET=${BUDGET_S:-460}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export RECAP_ONNX_EXPORTER=${RECAP_ONNX_EXPORTER:-torchscript}  # pi06: the faster exporter (minutes count here)
LOG=${OUT:+$OUT/gpu_check.log}
[ -n "$LOG" ] && exec > >(tee "$LOG") 2>&1
left() { echo $((BUDGET - ($(date +%s) - T0))); }
step() { echo; echo "=== [$(($(date +%s) - T0)) s] $*"; }

step "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi: not found"
$PY - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
EOF

step "gpu extra (tensorrt>=10.12, onnxruntime-gpu>=1.27)"
pipq() { timeout 150 $PY -m pip install -q --disable-pip-version-check --retries 0 --timeout 5 "$@"; }
fetch() {  # a wheel into /tmp/gpu_whl: the index when reachable, else the carried .whl/
  mkdir -p /tmp/gpu_whl
  timeout 150 $PY -m pip download -q --disable-pip-version-check --retries 0 --timeout 5 -d /tmp/gpu_whl "$@" 2>/dev/null \
    || { [ -d .whl ] && timeout 150 $PY -m pip download -q --no-index --find-links .whl -d /tmp/gpu_whl "$@" 2>/dev/null; }
}
if fetch "tensorrt>=10.12"; then
  pipq --no-index --find-links /tmp/gpu_whl "tensorrt>=10.12" && echo "tensorrt: installed"
else
  echo "tensorrt: no wheel (no network here and none in .whl/): the tensorrt backend will be skipped"
fi
if fetch --no-deps "onnxruntime-gpu>=1.27"; then  # it replaces the CPU onnxruntime (same module): only with a wheel
  $PY -m pip uninstall -y -q onnxruntime && pipq --no-deps /tmp/gpu_whl/onnxruntime_gpu-*.whl && echo "onnxruntime-gpu: installed"
else
  echo "onnxruntime-gpu: no wheel (no network here and none in .whl/): onnxruntime-cuda / -trt will be skipped"
fi
$PY - <<'EOF'
import importlib.util
import onnxruntime
print("onnxruntime", onnxruntime.__version__, onnxruntime.get_available_providers())
spec = importlib.util.find_spec("tensorrt")
if spec:
    import tensorrt
    print("tensorrt", tensorrt.__version__)
else:
    print("tensorrt: not installed")
from recap_ros.policy.backends import AUTO_ORDER, make_backend, pick_backend, gpu_available, tensorrt_available, _ort_providers
print("auto order", AUTO_ORDER, "-> auto picks", pick_backend(tensorrt_available(), gpu_available(), _ort_providers()))
EOF

WORK=${PI06_WORKDIR:-/tmp/recap_pi06_bench}
step "pi06 random-weight bundle: written in the background while the tiny checks use the GPU (log: $WORK.log)"
# (a scaled-down pi06, 2 layers and 0.95 B parameters, took 79 s and 9.6 GB on the 2-core dev machine, 33 s of it
# the torch export: the whole model needs minutes, which would otherwise come after the tiny checks)
mkdir -p "$(dirname "$WORK")"
$PY bench/policy_latency.py --write-pi06 --workdir "$WORK" > "$WORK.log" 2>&1 &
PI06_PID=$!

step "recap-build-engine tiny --precision bf16 fp16 (strongly typed)"
timeout 150 $PY -m recap_ros.policy.cli tiny --precision bf16 fp16 || echo "recap-build-engine: exit $?"

step "gpu-marked tests"
timeout 180 $PY -m pytest -q -p no:cacheprovider -m gpu test/test_policy_tensorrt.py -p no:rerunfailures 2>&1 | tail -25

step "policy_latency --gpu, tiny"
timeout 120 $PY bench/policy_latency.py --gpu --presets tiny --duration 2

step "waiting for the pi06 bundle ($(left) s left)"
while kill -0 "$PI06_PID" 2>/dev/null && [ "$(left)" -gt 60 ]; do sleep 5; done
if kill -0 "$PI06_PID" 2>/dev/null; then
  kill "$PI06_PID"; wait "$PI06_PID" 2>/dev/null
  echo "pi06 bundle: not written within the budget (stopped after $(($(date +%s) - T0)) s); its log:"
  tail -5 "$WORK.log"
else
  wait "$PI06_PID"; RC=$?
  tail -3 "$WORK.log"
  L=$(left)
  step "policy_latency --gpu, pi06 random weights (${L} s left)"
  if [ "$RC" -ne 0 ]; then
    echo "pi06: the bundle writer failed (exit $RC): skipped"
  elif [ "$L" -gt 60 ]; then
    timeout "$L" $PY bench/policy_latency.py --gpu --presets pi06 --duration 3 --workdir "$WORK" \
      || echo "pi06: exit $? after $(($(date +%s) - T0)) s (124: the time left ran out; engine builds need more)"
  else
    echo "pi06: skipped, only ${L} s left"
  fi
fi
step "done in $(($(date +%s) - T0)) s"
