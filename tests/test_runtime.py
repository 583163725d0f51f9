"""Process-level behaviour: ISA selection, one OpenMP runtime, concurrent callers."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fastconv
from conftest import FORWARD, assert_close, outside_domain, run_in_threads


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


@pytest.mark.parametrize("isa", fastconv.available_isas())
def test_env_var_forces_isa(isa):
    r = _run("import fastconv; print(fastconv.get_isa())", FASTCONV_ISA=isa)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == isa


def test_env_var_with_unknown_isa_fails_clearly():
    r = _run("import fastconv", FASTCONV_ISA="sse9")
    assert r.returncode != 0
    assert "unknown ISA" in r.stderr and "avx512" in r.stderr


def test_default_isa_is_the_fastest_available():
    assert fastconv.available_isas()[-1] == "scalar"
    r = _run("import fastconv; print(fastconv.get_isa())", FASTCONV_ISA="")
    assert r.stdout.strip() == fastconv.available_isas()[0]


def test_one_openmp_runtime_shared_with_torch():
    # Our extension must bind to the libgomp torch loaded, not bring a second thread pool.
    x = torch.randn(2, 16, 16, 16)
    fastconv.conv2d(x, torch.randn(16, 16, 3, 3), padding=1)
    with open("/proc/self/maps") as f:
        gomps = {line.split()[-1] for line in f if "libgomp" in line}
    assert len(gomps) == 1, gomps


def test_concurrent_calls_from_python_threads(algo):
    torch.manual_seed(0)
    problems = []
    for i in range(4):
        x = torch.randn(2, 8 + 4 * i, 12, 12)
        w = torch.randn(16, 8 + 4 * i, 3, 3)
        b = torch.randn(16)
        kw = dict(padding=i % 2, stride=1 + i % 2)
        if outside_domain(algo, x.shape, w.shape, x.dtype, FORWARD,
                          lambda: fastconv.conv2d(x, w, b, **kw, algo=algo), **kw):
            return
        problems.append((x, w, b, F.conv2d(x, w, b, **kw)))

    def worker(k):
        for _ in range(20):
            x, w, b, expected = problems[k]
            y = fastconv.conv2d(x, w, b, padding=k % 2, stride=1 + k % 2, algo=algo)
            assert_close(y, expected, atol=1e-4, rtol=1e-4, what=f"thread {k}")

    run_in_threads(worker, 4)


def test_release_workspaces_then_reuse():
    x, w = torch.randn(1, 8, 10, 10), torch.randn(8, 8, 3, 3)
    first = fastconv.conv2d(x, w, padding=1)
    fastconv.release_workspaces()
    assert torch.equal(fastconv.conv2d(x, w, padding=1), first)


def test_outputs_over_32_mib_ask_for_huge_pages():
    # Fresh outputs of 32 MiB or more are advised MADV_HUGEPAGE (only their whole 2 MiB pages)
    # before the kernel writes them; the advice changes nothing but speed.
    from fastconv import backend, ops
    backend._C.advise_huge_pages(0, 0)  # empty and sub-page ranges: nothing to advise
    small = torch.empty(100)
    backend._C.advise_huge_pages(small.data_ptr(), 400)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 8, 1026, 1024, generator=g)  # output 8 x 1026 x 1024 floats: 33.6 MB
    w = torch.randn(8, 1, 3, 3, generator=g)
    assert 8 * 1026 * 1024 * 4 >= ops._HUGE_PAGE_OUTPUT_BYTES
    y = fastconv.conv2d(x, w, padding=1, groups=8)
    assert_close(y, F.conv2d(x, w, padding=1, groups=8), atol=1e-4, rtol=1e-4)
    x.requires_grad_(True)
    gx, = torch.autograd.grad(fastconv.conv2d(x, w, padding=1, groups=8).sum(), x)
    assert_close(gx, torch.nn.grad.conv2d_input(x.shape, w, torch.ones_like(y), padding=1,
                                                groups=8), atol=1e-4, rtol=1e-4)
