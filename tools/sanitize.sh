#!/usr/bin/env bash
# Builds the extension with -fsanitize=address,undefined into build/asan/ (the normal in-place
# build is left alone) and runs the kernel tests against it.
#   bash tools/sanitize.sh [extra pytest args]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out="$root/build/asan"
cd "$root"
rm -rf "$out"
mkdir -p "$out"
FASTCONV_SANITIZE=1 python setup.py -q build_ext --build-lib "$out" --build-temp "$out/tmp" >/dev/null
cp -r fastconv/*.py fastconv/bench "$out/fastconv/"
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
cd "$out"   # so that `import fastconv` finds the sanitized build
python -c "import fastconv, sys; assert fastconv.__file__.startswith('$out'), fastconv.__file__"
exec python -m pytest -q -p no:cacheprovider "$root/tests/test_conv2d.py" "$root/tests/test_gemm.py" "$root/tests/test_winograd.py" \
    "$root/tests/test_paths.py" "$root/tests/test_edge_cases.py" "$root/tests/test_properties.py" \
    "$root/tests/test_nn.py" "$root/tests/test_errors.py" "$root/tests/test_runtime.py" "$root/tests/test_weight_cache.py" "$root/tests/test_depthwise.py" \
    "$root/tests/test_fused.py" "$root/tests/test_grouped.py" \
    -k "not no_memory_growth" "$@"   # AddressSanitizer keeps freed memory: RSS grows there
