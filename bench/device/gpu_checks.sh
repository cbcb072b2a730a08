#!/usr/bin/env bash
# One device run for issue 13 (and issue 10's CUDA rows when given): CUDA tests, then
# bench/gpu_swarm.py and bench/gpu_engine.py, everything logged under $OUT (<= 8 files).
# Run from the repository root on a CUDA machine:  OUT=/tmp/out bash bench/device/gpu_checks.sh
# Wheels of the pinned grpcio/protobuf in ../.whl (optional) are installed to /tmp/site first.
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
root=$(pwd)
if ls ../.whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ../.whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$root/proto:$root/node:$root/client:$root/coordinator
export PYTHONUNBUFFERED=1
log=$OUT/run.log
{
  date; nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv
  python3 -c "import torch, grpc, google.protobuf as pb, transformers; print(torch.__version__, grpc.__version__, pb.__version__, transformers.__version__)"
} 2>&1 | tee -a "$log"
echo "=== CUDA tests" | tee -a "$log"
tests="tests/node/test_graphs.py tests/node/test_sampler.py::test_cuda_draws_match_cpu"
[ -f tests/node/test_quant_cuda.py ] && tests="$tests tests/node/test_quant_cuda.py"  # issue 10's CUDA kernels
timeout "${TESTS_S:-150}" python3 -m pytest -q -p no:cacheprovider $tests 2>&1 | tail -40 | tee -a "$log"
echo "=== gpu_swarm" | tee -a "$log"
timeout "${SWARM_S:-260}" python3 bench/gpu_swarm.py --device "${DEVICE:-cuda}" --shape "${SHAPE:-8b}" --dir "/tmp/llama-${SHAPE:-8b}-random" --runs 3 --tokens 48 \
  --budget "${SWARM_BUDGET:-230}" ${PROFILE:+--profile-node} --out "$OUT/gpu_swarm.json" 2>&1 | tee -a "$log"
cat "$OUT"/gpu-swarm-logs/*.log > "$OUT/nodes.log" 2>/dev/null; rm -rf "$OUT/gpu-swarm-logs"
if [ "${QUANT_S:-0}" != 0 ] && grep -q -- "--gpu" bench/quant.py; then  # issue 10's GPU rows, same checkpoint
  echo "=== quant --gpu" | tee -a "$log"
  timeout "$QUANT_S" python3 bench/quant.py --gpu --gpu-dir "/tmp/llama-${SHAPE:-8b}-random" --runs 3 \
    --budget "${QUANT_BUDGET:-120}" --out "$OUT/quant_gpu.json" 2>&1 | tee -a "$log"
fi
if [ "${ENGINE_S:-0}" != 0 ]; then
  echo "=== gpu_engine" | tee -a "$log"
  timeout "$ENGINE_S" python3 bench/gpu_engine.py --runs 3 --steps 32 --out "$OUT/gpu_engine.json" 2>&1 | tee -a "$log"
fi
date | tee -a "$log"
