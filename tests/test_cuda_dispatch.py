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


def test_depthwise_launch_geometry():
    """Tiles as wide as the row, several planes per block on small maps (one when reducing
    statistics), fewer rows when the halo would pass 48 KiB, none when one row would;
    narrower where a halo row would pass THREADS columns (one thread stages one column)."""
    from fastconv.cuda import geometry
    small = geometry.conv_geometry(conv2d_problem((2, 6, 7, 7), (6, 1, 3, 3), (1, 1),
                                                  (1, 1, 1, 1), (1, 1), 6))
    tile = geometry.depthwise_tile(small)
    assert (tile.tile_w, tile.planes, tile.thread_rows) == (8, 2, 8)
    assert geometry.depthwise_tile(small, with_stats=True).planes == 1
    big = geometry.conv_geometry(conv2d_problem((1, 4, 112, 112), (4, 1, 3, 3), (1, 1),
                                                (1, 1, 1, 1), (1, 1), 4))
    tile = geometry.depthwise_tile(big)
    assert (tile.tile_w, tile.thread_rows, tile.rows, tile.planes) == (32, 4, 4, 1)
    assert tile.shared_values(big, False) == 18 * 34 + 9
    dilated = geometry.conv_geometry(conv2d_problem((1, 1, 200, 200), (1, 1, 3, 3), (1, 1),
                                                    (0, 0, 0, 0), (45, 45), 1))
    tile = geometry.depthwise_tile(dilated)
    assert tile.rows < 4 and tile.shared_values(dilated, False) * 4 <= geometry.SHARED_BYTES
    huge = geometry.conv_geometry(conv2d_problem((1, 1, 400, 400), (1, 1, 3, 3), (1, 1),
                                                 (0, 0, 0, 0), (150, 150), 1))
    assert geometry.depthwise_tile(huge) is None
    strided = geometry.conv_geometry(conv2d_problem((1, 1, 5, 100), (1, 1, 3, 3), (5, 5),
                                                    (1, 1, 1, 1), (1, 1), 1))
    tile = geometry.depthwise_tile(strided)   # 32 outputs would stage 158 > 128 halo columns
    assert (tile.tile_w, tile.in_w) == (16, 78)


def test_depthwise_rows_geometry():
    """The generated kernels' shapes: 4 output rows per thread where the loads stay within
    ROWS_MAX_LOADS (3x3: 6 input rows, 18 loads), fewer on longer reaches or shorter maps,
    rows between a dilated filter's taps not loaded; none past ROWS_MAX_TAPS."""
    from fastconv.cuda import geometry

    def rows(x_shape, k, stride=1, dilation=1):
        g = geometry.conv_geometry(conv2d_problem(x_shape, (x_shape[1], 1, k, k),
                                                  (stride,) * 2, (0, 0, 0, 0),
                                                  (dilation,) * 2, x_shape[1]))
        return geometry.depthwise_rows(g)

    spec = rows((1, 4, 56, 56), 3)
    assert (spec.rows, spec.in_rows, spec.loads) == (4, 6, 18)
    assert spec.taps(2) == [(0, 2), (1, 1), (2, 0)]
    assert rows((1, 4, 56, 56), 5, stride=2).loads == 55      # 11 rows x 5
    assert rows((1, 4, 56, 56), 5, stride=3).rows == 2     # 4 rows: 14 x 5 = 70 loads
    assert rows((1, 4, 5, 5), 3).rows == 3                   # a 3-row output
    dilated = rows((1, 4, 300, 300), 3, dilation=60)
    assert dilated.rows == 4 and dilated.loads == 36         # 124 rows reached, 12 read
    assert rows((1, 4, 56, 56), 7) is None


def test_depthwise_grad_rows_geometry():
    """The generated grad-inputs: whole stride phases per thread (rows a multiple of sh, sw
    columns), as many rows as GRAD_ROWS_MAX_VALUES allows; the taps of each phase and the
    grad_output offsets they read fixed by the padding modulo the stride."""
    from fastconv.cuda import geometry

    def spec(k, stride, pad, multiplier=1):
        g = geometry.conv_geometry(conv2d_problem((1, 4, 20, 20), (4 * multiplier, 1, k, k),
                                                  (stride,) * 2, (pad,) * 4, (1, 1), 4))
        return geometry.depthwise_grad_rows(g)

    s2 = spec(3, 2, 1)
    assert (s2.rows, s2.ph, len(s2.loads)) == (4, 1, 6)
    assert s2.row_taps(0) == [(1, 0)] and s2.row_taps(1) == [(0, 1), (2, 0)]
    assert spec(3, 1, 1, multiplier=2).rows == 2     # 4 rows: 18 loads + 4 sums + 9 weights
    assert spec(3, 3, 0).rows == 3
    assert spec(5, 2, 2) is None                     # 25 weights: the gather kernel


def test_grad_input_as_forward():
    """Stride-1, multiplier-1 depthwise grad-inputs as forwards of the turned filter: padding
    = reach - padding (negative past the reach), the maps swapped; others None."""
    from fastconv.cuda import geometry
    g = geometry.conv_geometry(conv2d_problem((2, 3, 9, 8), (3, 1, 3, 5), (1, 1),
                                              (4, 0, 1, 2), (2, 1), 3))
    f = geometry.grad_input_as_forward(g)
    assert (f.H, f.W, f.OH, f.OW) == (g.OH, g.OW, 9, 8)
    assert (f.pt, f.pl) == (2 * 2 - 4, 4 - 1)
    assert geometry.grad_input_as_forward(g._replace(sh=2)) is None
    assert geometry.grad_input_as_forward(g._replace(Kg=2, K=6)) is None


def test_kernel_geometry_is_int32():
    import numpy as np
    from fastconv.cuda import geometry
    g = geometry.kernel_arg(geometry.conv_geometry(DENSE))
    assert all(isinstance(v, np.int32) for v in g) and g.K == 4
    with pytest.raises(ValueError, match="32 bits"):
        geometry.kernel_arg(g._replace(N=2 ** 31))


@pytest.mark.skipif(_runtime.import_error() is not None, reason="numba-cuda is not installed")
def test_explain_on_a_gpu():
    import fastconv
    dense = fastconv.explain((2, 8, 9, 9), (4, 8, 3, 3), padding=1, device="cuda")
    assert dense.choice is None and "cuDNN" in dense.why and dense.grad_weight_choice is None
    dw = fastconv.explain((2, 8, 9, 9), (8, 1, 3, 3), padding=1, groups=8, device="cuda")
    assert dw.choice == "depthwise" and "CUDA" in dw.why
    assert dw.grad_input_choice == dw.grad_weight_choice == "depthwise"


def test_gpu_report_says_why_it_cannot_run(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the report would run")
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).parent.parent / "benchmarks" / "report_cuda.py"
    spec = importlib.util.spec_from_file_location("report_cuda", path)
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    assert report.main([]) == 2
    assert "needs a GPU" in capsys.readouterr().err


# The direct launch (fastconv.cuda._runtime.LaunchPlan) packs parameters as numba-cuda's
# Kernel._prepare_args passes them, one 8-byte slot each; on a GPU test_cuda_device.py checks
# its results against numba's launch. Here: the parameters themselves, for each argument type
# the kernels take.
def test_launch_parameters_of_a_contiguous_tensor():
    t = torch.empty(2, 3, 1, 5)[:, :, :, :]
    out = []
    _runtime._tensor_parameters(t, out)
    assert out == [0, 0, 30, 4, t.data_ptr(), 2, 3, 1, 5, 60, 20, 20, 4]


def test_launch_parameters_of_scalars_and_tuples():
    pytest.importorskip("numba")
    import numpy as np
    from numba.cuda import types
    from numba.cuda.typing.typeof import Purpose, typeof

    from fastconv.cuda.geometry import DepthwiseTile
    tile = DepthwiseTile(*map(np.int32, range(8)))
    t = torch.empty(3, 4, dtype=torch.float64)
    values = (tile, 7, True, np.float32(0.5), 0.25, np.int32(-3), t)
    packers = [_runtime._packer(typeof(v, Purpose.argument)) for v in values]
    plan = _runtime.LaunchPlan(None, packers)
    assert plan.layout.size == 8 * (8 + 5 + 9), "one 8-byte slot per parameter"
    slots = np.frombuffer(plan.layout.pack(*plan.pack(values)), np.uint64)
    assert list(slots[:8]) == list(range(8))
    assert slots[8] == 7 and slots[9] == 1
    assert slots[10:11].view(np.float32)[0] == 0.5
    assert slots[11:12].view(np.float64)[0] == 0.25
    assert slots[12:13].view(np.int32)[0] == -3
    assert list(slots[13:]) == [0, 0, 12, 8, t.data_ptr(), 3, 4, 32, 8]
    # cuLaunchKernel's void**: the address of each slot of the reused buffer
    assert list(plan._addresses - plan._addresses[0]) == [8 * i for i in range(22)]
    assert plan._addresses[0] == plan._values.ctypes.data
    with pytest.raises(_runtime._NoPlan):
        _runtime._packer(types.Array(types.float32, 2, "A"))


def test_launch_signature_keys():
    c, t = torch.empty(2, 3), torch.empty(3, 2).t()
    assert _runtime._signature_key(c) != _runtime._signature_key(t)
    assert _runtime._signature_key(c) == _runtime._signature_key(torch.empty(5, 1))
    assert _runtime._signature_key((1, 2)) != _runtime._signature_key((1, True))
