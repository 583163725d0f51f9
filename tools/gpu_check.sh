#!/bin/bash
# One call on a lent GPU machine (README "CUDA kernels"): versions, a build of the extension
# for that machine's Python, then the steps named in STEPS (default tests,report; also
# profile, ncu), each under its own time limit (TEST_LIMIT, PROFILE_LIMIT, REPORT_LIMIT,
# NCU_LIMIT) so that a slow one leaves the rest. Logs go to $OUT.
#   [STEPS=tests,profile,report,ncu] bash tools/gpu_check.sh [report_cuda.py args...]
# FASTCONV_PORTABLE=1 builds the scalar CPU kernels only (faster; the GPU steps need no others).
# Wheels carried in .whl/ are installed only where numba-cuda does not load (seen 2026-11-26:
# numba-cuda 0.30.4 with numpy 2.5.2: carry numpy 2.4). If the direct-launch test fails, the
# later steps run numba's own launch (FASTCONV_CUDA_LAUNCH=numba).
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=.
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv
start=$(date +%s)
FASTCONV_BUILD_JOBS=16 python3 setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 \
    || { tail -40 "$OUT/build.log"; exit 1; }
echo "built in $(( $(date +%s) - start )) s"
if ! python3 -c "from fastconv.cuda import _runtime as r; e = r.import_error(); print(e or 'numba-cuda loads'); exit(e is not None)"; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:. && echo "installed the carried wheels: $(ls .whl)"
fi
python3 -c "import torch, numpy, numba, numba_cuda, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'numpy', numpy.__version__, 'numba', numba.__version__, 'numba-cuda', numba_cuda.__version__)"
STEPS=${STEPS:-tests,report}
if [[ ,$STEPS, == *,tests,* ]]; then
    timeout "${TEST_LIMIT:-240}" python3 -m pytest -q -p no:cacheprovider -rs --durations=8 \
        tests/test_cuda_device.py 2>&1 | tee "$OUT/tests.log" | tail -40
    if grep -q "^FAILED.*test_direct_launch" "$OUT/tests.log"; then
        echo "the direct launch failed: the steps below take numba's launch"
        export FASTCONV_CUDA_LAUNCH=numba
    fi
fi
if [[ ,$STEPS, == *,profile,* ]]; then
    timeout "${PROFILE_LIMIT:-120}" python3 benchmarks/profile_cuda.py 2>&1 | tee "$OUT/profile.log"
fi
if [[ ,$STEPS, == *,report,* ]]; then
    timeout "${REPORT_LIMIT:-240}" python3 benchmarks/report_cuda.py --json "$OUT/report.json" "$@" \
        2> "$OUT/report.err" | tee "$OUT/report.log"
    tail -5 "$OUT/report.err"
fi
if [[ ,$STEPS, == *,ncu,* ]]; then   # Nsight Compute on one depthwise forward (3x3 144@56, N=32)
    timeout "${NCU_LIMIT:-90}" ncu --kernel-name regex:forward --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section Occupancy --section LaunchStats \
        --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
        python3 -c "import torch, fastconv.cuda as fc
x = torch.randn(32, 144, 56, 56, device='cuda'); w = torch.randn(144, 1, 3, 3, device='cuda')
for _ in range(4): fc.depthwise_conv2d_forward(x, w, None, 1, 1)
torch.cuda.synchronize()" 2>&1 | tee "$OUT/ncu.log" | grep -vE "^==PROF==|^\s*$" | tail -60
fi
