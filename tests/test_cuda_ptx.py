"""Every CUDA kernel compiled ahead of time, without a GPU: PTX for sm_80 and sm_90 (no
float64 instruction in the float32 kernels), then ptxas for sm_90 (no spills; the float32
depthwise kernels within 64 registers per thread: fastconv.cuda.depthwise.MAX_REGISTERS). The register counts are printed at the
end of the run (tests/conftest.py: pytest_terminal_summary)."""
from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess

import pytest

pytest.importorskip("numba.cuda", reason="numba-cuda is not installed (pip install "
                    "'fastconv[cuda]'; requirements-dev.txt installs it for CI)")

from fastconv.cuda import inventory  # noqa: E402

KERNELS = {k.name: k for dtype in ("float32", "float64") for k in inventory.kernels(dtype)}
#: name -> (registers, spill bytes) from ptxas for sm_90, filled as the tests run.
REGISTERS: dict = {}


def _ptxas() -> str:
    found = shutil.which("ptxas")
    if found is None and os.path.exists("/usr/local/cuda/bin/ptxas"):
        found = "/usr/local/cuda/bin/ptxas"
    if found is None:
        pytest.skip("ptxas (the CUDA toolkit) is not installed here")
    return found


@functools.lru_cache(maxsize=None)
def _ptx(name: str, cc: tuple) -> str:
    from numba import cuda
    k = KERNELS[name]
    ptx, _ = cuda.compile_ptx(k.kernel, k.signature, cc=cc)
    return ptx


def _instructions(ptx: str):
    """PTX instruction lines (no comments, declarations or the mangled names)."""
    for line in ptx.splitlines():
        line = line.strip()
        if line and not line.startswith(("//", ".", "{", "}", ")")) and not line.endswith(":"):
            yield line


@pytest.mark.parametrize("cc", [(8, 0), (9, 0)], ids=["sm_80", "sm_90"])
@pytest.mark.parametrize("name", sorted(KERNELS))
def test_compiles_to_ptx(name, cc):
    ptx = _ptx(name, cc)
    assert f".target sm_{cc[0]}{cc[1]}" in ptx
    if name.startswith("f32"):
        f64 = [line for line in _instructions(ptx) if ".f64" in line]
        assert not f64, f"{name}: float64 instructions in a float32 kernel: {f64[:3]}"


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_ptxas_no_spills(name, tmp_path):
    ptxas = _ptxas()
    path = tmp_path / f"{name}.ptx"
    path.write_text(_ptx(name, (9, 0)))
    # numba passes a kernel's max_registers to the JIT linker, not into the PTX: so here too
    cap = KERNELS[name].kernel.targetoptions.get("max_registers")
    limit = ["--maxrregcount", str(cap)] if cap else []
    out = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90", *limit, str(path), "-o",
                          "/dev/null"], capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", out).group(1))
    spills = [int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", out)]
    REGISTERS[name] = (registers, sum(spills))
    assert sum(spills) == 0, f"{name} spills: {out}"
    budget = KERNELS[name].max_registers
    if budget is not None and name.startswith("f32"):
        assert registers <= budget, f"{name} uses {registers} registers per thread"
