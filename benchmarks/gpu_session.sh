#!/usr/bin/env bash
# One GPU session: the GPU test suite, then the GPU benchmarks, logs under $OUT (the device
# tool's output folder; defaults to ./gpu-out). The machine has no package index: the few
# pure-Python packages kldiv's tests need beside its image travel as wheels in .whl/.
set -u
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
# JAX takes 75% of the GPU per process by default: with several test workers (and torch
# beside it) that starves everyone
export PYTHONUNBUFFERED=1 KLDIV_README_GPU=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, jax, cupy, triton; print('torch', torch.__version__, 'jax', jax.__version__, jax.devices(), 'cupy', cupy.__version__, 'triton', triton.__version__)" 2>&1 | tee -a "$OUT/gpu.txt"
# 1. the tests that exercise the GPU: every backend-parametrised test on torch-cuda, jax-gpu
#    and cupy (the gpu mark), and the CUDA routes (Triton, fused linear, streaming to devices)
if [ "${RUN_TESTS:-1}" = 1 ]; then
timeout "${TEST_S:-150}" python3 -m pytest -q -p no:cacheprovider -n "${WORKERS:-8}" -m "not parity" \
  --tb=short -k "${TEST_K:-gpu or cuda or cupy or triton or device}" ${TEST_FILES:-tests} > "$OUT/tests_gpu.log" 2>&1
echo "tests rc=$?" | tee -a "$OUT/gpu.txt"; tail -5 "$OUT/tests_gpu.log"
grep -E "^(/|E  |[A-Za-z_/]+\.py:[0-9]+: )" "$OUT/tests_gpu.log" | sed 's/0x[0-9a-f]*//g' | sort | uniq -c | sort -rn | head -30
fi
# 2. the fused linear path's pieces and a profile of the whole call
[ "${RUN_PROFILE:-0}" = 1 ] && timeout "${PROFILE_S:-90}" python3 benchmarks/gpu_profile_fused.py --out "$OUT/profile_fused.json" > "$OUT/profile_fused.log" 2>&1
[ "${RUN_PROFILE:-0}" = 1 ] && { echo "profile rc=$?" | tee -a "$OUT/gpu.txt"; grep -E "ms$|MiB|diff" "$OUT/profile_fused.log"; }
# 3. benchmarks: the Keras KL on CUDA/CuPy (and copy bandwidth), the family, fused linear
[ "${RUN_BENCH:-1}" = 1 ] && timeout "${BENCH_S:-60}" python3 benchmarks/run.py --groups gpu --sizes 4096x4096,16384x4096 \
  --dtypes float32 --budget 0.3 --out "$OUT/RESULTS_GPU.md" > "$OUT/run_gpu.log" 2>&1
echo "run.py rc=$?" | tee -a "$OUT/gpu.txt"
[ "${RUN_FAMILY:-1}" = 1 ] && timeout "${FAMILY_S:-150}" python3 benchmarks/family_gpu.py ${FAMILY_ARGS:-} --out "$OUT/family_gpu.json" 2>&1 | tee "$OUT/family_gpu.log" | tail -20
[ "${RUN_FUSED:-1}" = 1 ] && timeout "${FUSED_S:-240}" python3 benchmarks/fused_linear.py --gpu --no-curve ${FUSED_ARGS:-} --out "$OUT/fused_linear_gpu.json" > "$OUT/fused_linear_gpu.log" 2>&1
echo "fused rc=$?" | tee -a "$OUT/gpu.txt"; tail -30 "$OUT/fused_linear_gpu.log"
