"""How CUDA tensors are routed, checked without a GPU: the registry's CUDA kernels, auto's
choice on a GPU, the layers left to torch (cuDNN), and numba-cuda as an optional extra."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from fastconv import dispatch, registry
from fastconv.backend import Pass
from fastconv.cuda import _runtime
from fastconv.errors import AlgorithmUnavailable
from fastconv.problem import conv2d_problem

DEPTHWISE = conv2d_problem((2, 8, 9, 9), (16, 1, 3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 8)
DENSE = conv2d_problem((2, 8, 9, 9), (4, 8, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1)
GROUPED = conv2d_problem((2, 8, 9, 9), (8, 2, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 4)


@pytest.fixture
def without_numba(monkeypatch):
    """As if numba-cuda were not installed."""
    monkeypatch.setattr(_runtime, "import_error",
                        lambda: "numba-cuda is not installed (pip install 'fastconv[cuda]')")
    registry.forget_runnable()
    yield
    registry.forget_runnable()


def test_import_does_not_load_numba():
    code = "import sys, fastconv, fastconv.nn; assert 'numba' not in sys.modules, 'numba loaded'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cuda_kernels_registered():
    assert "cuda" in registry.get("depthwise").devices
    assert "cuda" in registry.get("im2col").devices
    assert ("cuda", torch.float32) in registry.RUNNABLE


@pytest.mark.skipif(_runtime.import_error() is not None, reason="numba-cuda is not installed")
@pytest.mark.parametrize("pass_", list(Pass))
def test_auto_on_a_gpu(pass_):
    assert dispatch.choose(DEPTHWISE, "cuda", torch.float32, pass_=pass_).name == "depthwise"
    assert dispatch.choose(DENSE, "cuda", torch.float32, pass_=pass_).name == "im2col"
    assert dispatch.choose(GROUPED, "cuda", torch.float64, pass_=pass_).name == "im2col"
    assert registry.get("depthwise").unsupported(DENSE, "cuda") is not None


def test_dense_layers_left_to_cudnn_under_auto():
    assert dispatch.leaves_to_torch("cuda", (4, 8, 3, 3), 1)
    assert dispatch.leaves_to_torch("cuda", (8, 2, 3, 3), 4)
    assert not dispatch.leaves_to_torch("cuda", (16, 1, 3, 3), 8)
    assert not dispatch.leaves_to_torch("cpu", (4, 8, 3, 3), 1)


def test_without_numba_cuda(without_numba):
    assert not registry.runnable("cuda", torch.float32)
    assert registry.runnable("cpu", torch.float32)
    assert dispatch.choose(DEPTHWISE, "cuda") is None
    with pytest.raises(AlgorithmUnavailable, match=r"pip install 'fastconv\[cuda\]'"):
        dispatch.resolve("depthwise", DEPTHWISE, "cuda", torch.float32)
    with pytest.raises(AlgorithmUnavailable, match="numba-cuda is not installed"):
        dispatch.resolve("auto", DEPTHWISE, "cuda", torch.float32)
    # CPU tensors keep their kernels.
    assert dispatch.choose(DEPTHWISE, "cpu").name == "depthwise"


def test_launchers_say_why_they_cannot_run(without_numba):
    import fastconv.cuda as fc
    assert not fc.available()
    with pytest.raises(RuntimeError, match=r"fastconv\[cuda\]"):
        fc.depthwise_conv2d_forward(torch.randn(1, 2, 4, 4), torch.randn(2, 1, 3, 3))


@pytest.mark.skipif(_runtime.import_error() is not None, reason="numba-cuda is not installed")
def test_launchers_without_a_gpu_or_simulator():
    import fastconv.cuda as fc
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert "no CUDA device" in fc.unavailable()
    with pytest.raises(RuntimeError, match="no CUDA device"):
        fc.depthwise_conv2d_forward(torch.randn(1, 2, 4, 4), torch.randn(2, 1, 3, 3))
