"""The registry, the 'auto' heuristic and explain()."""
from __future__ import annotations

import pytest
import torch

import fastconv
import fastconv.cuda
from fastconv.backend import CppKernels
from fastconv import dispatch, registry
from fastconv.backend import Pass, _C
from fastconv.shapes import ALL_LAYERS, NETWORKS


def _problem(layer, batch=1):
    return layer.problem(batch)


def _choice(layer, batch=1):
    return dispatch.choose(_problem(layer, batch)).name


@pytest.mark.parametrize("layer, batch, forward, grad_input, grad_weight", [
    ("conv1 7x7/2 3>64 @224", 8, "im2col", "im2col", "direct"),       # stem
    ("3x3/2 128 @56", 8, "direct", "im2col", "im2col"),               # strided, col2im
    ("3x3/2 512 @14", 1, "direct", "direct", "im2col"),               # 49 output pixels
    ("3x3/2 512 @14", 8, "direct", "direct", "im2col"),
    ("3x3/2 256 @28", 1, "direct", "im2col", "im2col"),               # 196 output pixels
    ("3x3/2 128 @56", 1, "direct", "im2col", "im2col"),               # 784 output pixels
    ("3x3 256 @14", 1, "direct", "direct", "winograd_f2"),
    ("1x1/2 downsample 256>512 @56", 1, "im2col", "im2col", "im2col"),
    ("3x3 512 @7", 1, "direct", "direct", "im2col"),                  # 49 pixels: dW >> pixels
    ("3x3 512 @7", 4, "direct", "direct", "winograd_f2"),             # 196 pixels
    ("3x3 256 @14", 8, "winograd_f4", "winograd_f4", "winograd_f2"),  # 1568 pixels
    ("3x3 64 @56", 8, "winograd_f6", "winograd_f6", "winograd_f4"),   # no F6 for dW
])
def test_auto_per_pass(layer, batch, forward, grad_input, grad_weight):
    problem = _problem({l.name: l for l in NETWORKS["resnet50"]}[layer], batch)
    picks = [dispatch.choose(problem, pass_=p).name for p in Pass]
    assert picks == [forward, grad_input, grad_weight]
    e = fastconv.explain(problem.input_shape, problem.weight_shape, problem.stride,
                         problem.padding[::2], groups=problem.groups)
    assert (e.choice, e.grad_input_choice, e.grad_weight_choice) == tuple(picks)
    assert f"grad-weight {grad_weight}" in str(e)


@pytest.mark.parametrize("layer, batch", [("3x3/2 128 @56", 8), ("3x3/2 256 @28", 8)])
def test_auto_grad_input_follows_the_layout(layer, batch):
    """Strided grad-input: im2col's col2im runs NCHW natively; channels_last tensors would go
    through its NHWC path, slower than direct's."""
    problem = _problem({l.name: l for l in NETWORKS["resnet50"]}[layer], batch)
    assert dispatch.choose(problem, pass_=Pass.GRAD_INPUT).name == "im2col"
    assert dispatch.choose(problem, pass_=Pass.GRAD_INPUT, channels_last=True).name == "direct"
    e = fastconv.explain(problem.input_shape, problem.weight_shape, problem.stride,
                         problem.padding[::2], channels_last=True)
    assert e.grad_input_choice == "direct"


def test_auto_picks_gemm_for_1x1_and_stems_winograd_for_3x3_and_direct_otherwise():
    by_name = {l.name: l for l in NETWORKS["resnet50"]}
    assert _choice(by_name["1x1 256>64 @56"]) == "im2col"
    assert _choice(by_name["1x1 1024>256 @14"]) == "im2col"
    assert _choice(by_name["1x1/2 downsample 256>512 @56"]) == "im2col"
    assert _choice(by_name["1x1 2048>512 @7"]) == "im2col"
    assert _choice(by_name["conv1 7x7/2 3>64 @224"]) == "im2col"  # a stem: 3 input channels
    assert _choice(by_name["3x3/2 128 @56"]) == "direct"
    # Winograd where the batch has enough pixels; F6 only on large maps with <= 128 channels,
    # F2 on few pixels.
    assert _choice(by_name["3x3 64 @56"]) == "winograd_f6"
    assert _choice(by_name["3x3 128 @28"], batch=8) == "winograd_f4"
    assert _choice(by_name["3x3 256 @14"], batch=8) == "winograd_f4"
    assert _choice(by_name["3x3 128 @28"]) == "winograd_f4"  # 784 pixels: enough
    assert _choice(by_name["3x3 256 @14"]) == "direct"       # 196 pixels: too few
    assert _choice(by_name["3x3 512 @7"], batch=8) == "winograd_f2"  # 392 pixels
    assert _choice(by_name["3x3 512 @7"], batch=4) == "direct"
    vgg = {l.name: l for l in NETWORKS["vgg16"]}
    assert _choice(vgg["3x3 64>64 @224"]) == "winograd_f6"
    assert _choice(vgg["3x3 512>512 @28"]) == "winograd_f4"
    assert _choice(vgg["3x3 512>512 @14"]) == "direct"
    assert _choice(vgg["3x3 256>256 @56"]) == "winograd_f4"
    assert _choice(vgg["3x3 3>64 @224"]) == "im2col"          # 3 input channels: a stem


def test_winograd_family_picks_a_tile_or_says_why_not():
    x, w = torch.randn(1, 4, 9, 9), torch.randn(4, 4, 3, 3)
    assert fastconv.conv2d(x, w, algo="winograd").shape == (1, 4, 7, 7)
    for kw, word in [(dict(stride=2), "stride 2x2"), (dict(dilation=2), "dilation 2x2")]:
        with pytest.raises(ValueError, match=word):
            fastconv.conv2d(x, w, **kw, algo="winograd")
    with pytest.raises(ValueError, match="a 5x5 kernel"):
        fastconv.conv2d(x, torch.randn(4, 4, 5, 5), algo="winograd")
    with pytest.raises(ValueError, match="algo='winograd'"):
        fastconv.conv2d(x, w, stride=2, algo="winograd")


def test_auto_routes_depthwise_and_grouped_layers():
    depthwise = [l for l in ALL_LAYERS if l.groups > 1 and l.C == l.groups]
    grouped = [l for l in ALL_LAYERS if l.groups > 1 and l.C != l.groups]
    assert depthwise and all(_choice(l) == "depthwise" for l in depthwise)
    few = [l for l in grouped if l.C // l.groups <= 16]
    assert few and all(_choice(l) == "grouped" for l in few)
    assert all(_choice(l) == "direct" for l in grouped if l not in few)


@pytest.mark.parametrize("layer, grad_weight", [
    ("3x3 128 g32 @56", "grouped"),       # 4 channels per group
    ("3x3/2 256 g32 @56", "grouped"),     # 8, strided
    ("3x3 512 g32 @14", "grouped"),       # 16
    ("3x3/2 512 g32 @28", "grouped"),     # 16, strided
    ("3x3 1024 g32 @7", "direct"),        # 32: direct for every pass
])
def test_auto_per_pass_on_grouped_layers(layer, grad_weight):
    problem = _problem({l.name: l for l in NETWORKS["resnext50_32x4d"]}[layer], 8)
    picks = [dispatch.choose(problem, pass_=p).name for p in Pass]
    few = problem.Cg <= 16
    assert picks == ["grouped" if few else "direct"] * 2 + [grad_weight]
    assert "few channels per group" in fastconv.explain(
        problem.input_shape, problem.weight_shape, problem.stride, problem.padding[::2],
        groups=problem.groups).why or not few


def test_auto_finds_nothing_for_dtypes_without_kernels():
    problem = _problem(NETWORKS["resnet50"][1])
    assert dispatch.choose(problem, "cpu", torch.float16) is None
    assert dispatch.choose(problem, "cuda", torch.float16) is None
    assert dispatch.choose(problem, "mps", torch.float32) is None


@pytest.mark.parametrize("shape,weight,kw", [
    ((2, 16, 20, 20), (32, 16, 1, 1), {}),                  # -> im2col
    ((2, 16, 6, 6), (8, 2, 1, 1), dict(groups=8)),           # -> direct (grouped)
    ((2, 8, 12, 12), (16, 8, 3, 3), dict(padding=1)),       # -> direct
    ((4, 16, 20, 20), (16, 16, 3, 3), dict(padding=1)),     # -> winograd_f4
])
def test_auto_gives_exactly_the_chosen_algorithms_result(shape, weight, kw):
    x, w = torch.randn(shape), torch.randn(weight)
    chosen = fastconv.explain(shape, weight, **kw).choice
    assert torch.equal(fastconv.conv2d(x, w, **kw), fastconv.conv2d(x, w, **kw, algo=chosen))
    xr = x.clone().requires_grad_(True)
    y = fastconv.conv2d(xr, w, **kw)                        # the op path resolves 'auto' too
    assert torch.equal(y.detach(), fastconv.conv2d(x, w, **kw, algo=chosen))


def test_registry_and_kernel_table_agree():
    names = [a.name for a in registry.ALGORITHMS]
    assert len(set(names)) == len(names)
    # Every C++ table entry is declared; the one CPU strategy outside the table is naive
    # (Cython).
    cpu = [a for a in registry.ALGORITHMS if "cpu" in a.kernels]
    assert sorted(_C.algorithm_names()) == sorted(a.name for a in cpu
                                                  if isinstance(a.kernels["cpu"], CppKernels))
    assert [a.name for a in cpu if not isinstance(a.kernels["cpu"], CppKernels)] == ["naive"]
    assert [a.name for a in registry.ALGORITHMS if not a.in_auto] == ["naive"]
    families = list(registry.FAMILIES)
    assert families == ["winograd"]
    assert [m.value for m in fastconv.Algo] == ["auto"] + families + names


@pytest.mark.parametrize("algo", [a.name for a in registry.ALGORITHMS])
def test_every_entry_declares_its_domain(algo):
    a = registry.get(algo)
    problem = _problem(NETWORKS["resnet50"][1])
    assert a.summary and a.devices and a.dtypes
    for pass_ in Pass:
        if a.unsupported(problem, "cpu", torch.float32, pass_) is None:
            assert a.workspace_bytes(problem, pass_, torch.float32) >= 0
    reason = a.unsupported(problem, "cpu", torch.float16)
    assert reason and "float16" in reason
    on_cuda = a.unsupported(problem, "cuda", torch.float32)
    if "cuda" not in a.devices:
        assert "cuda" in on_cuda
    elif fastconv.cuda.unavailable() is None or "no CUDA device" in fastconv.cuda.unavailable():
        # numba-cuda installed: the same domain on both devices
        assert on_cuda == a.unsupported(problem, "cpu", torch.float32)


def test_explain_names_choice_flops_and_workspace():
    e = fastconv.explain((8, 64, 56, 56), (64, 64, 3, 3), padding=1)
    assert e.choice == "winograd_f6"
    assert e.problem.flops == 2 * 8 * 64 * 64 * 9 * 56 * 56
    text = str(e)
    assert "auto picks winograd_f6" in text and "GFLOP" in text and "MiB" in text
    assert fastconv.explain((8, 64, 56, 56), (64, 64, 3, 3), stride=2, padding=1).choice == "direct"
    for a in registry.ALGORITHMS:
        assert a.name in text
    assert fastconv.explain((1, 3, 8, 8), (4, 3, 3, 3), dtype=torch.float16).choice is None


def test_missing_kernel_is_an_error_not_a_crash():
    # A kernel-table entry without a kernel (a null pointer) must be reported, never called:
    # the table lookup refuses an index past the table too.
    with pytest.raises(ValueError, match="unknown algorithm index"):
        _C.forward(99, 0, _problem(NETWORKS["resnet50"][1]).kernel_geometry, 0, 0, 0, 0, 0, 0,
                   0, 0, 0, 0, 0, 1)


def test_explain_takes_the_tensors_themselves():
    # What users have at hand: the call's own tensors. Shape, dtype, device and layout come
    # from them (a tensor printed into an error message was the answer before).
    x, w = torch.randn(2, 64, 14, 14, dtype=torch.float64), torch.randn(64, 64, 3, 3)
    from_tensors = fastconv.explain(x, w, stride=2, padding=1)
    from_shapes = fastconv.explain(x.shape, w.shape, stride=2, padding=1, dtype=torch.float64)
    assert from_tensors.choice == from_shapes.choice
    assert from_tensors.problem == from_shapes.problem
    assert str(from_tensors) == str(from_shapes)
    cl = x.to(memory_format=torch.channels_last)
    assert (fastconv.explain(cl, w, stride=2, padding=1).choice ==
            fastconv.explain(x.shape, w.shape, stride=2, padding=1, dtype=torch.float64,
                             channels_last=True).choice)
    assert fastconv.explain(x, fastconv.prepack(w), padding=1).problem.weight_shape == (64, 64, 3, 3)
    assert fastconv.explain(x.half(), w.half(), padding=1).choice is None
