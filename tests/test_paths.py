"""Every internal code path of every algorithm, on small problems.

The kernels switch paths at measured thresholds (csrc/common/tuning.h): im2col's native NCHW
forward against its NHWC GEMM, image groups under the layout budget, column-matrix chunks,
direct grad-weight's pixel chunks. Real layers cross them only at sizes too slow for tests
(and the sanitizer run), so these tests shrink the thresholds with fastconv.backend.tuning and
run the cases with dilation, groups, strides and both layouts through each setting, checking
(through the per-buffer workspace high-water marks) that the path was really taken. They also
check each algorithm's workspace estimate against what the calls asked for.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastconv
from fastconv import ops, registry
from fastconv.backend import Pass, tuning, workspace_high_water
from cases import CASE_IDS, CASES
from conftest import assert_close, supported, tolerances

PATH_CASES = [CASES[CASE_IDS.index(n)] for n in (
    "dilated_asym_padded", "groups_strided", "depthwise_multiplier", "same_even_dilated",
    "pointwise", "pointwise_strided", "pointwise_strided_groups", "stem_like",
    "channel_tails", "groups_channel_blocks", "large_map_dilated_strided",
    "channels_last_strided_groups", "noncontiguous")]

HUGE = 1 << 40
NATIVE_THRESHOLDS = ("im2col_native_min_pixels_pointwise", "im2col_native_min_pixels_spatial",
                     "im2col_native_min_pixels_strided_1x1",
                     "im2col_native_min_batch_pixels_pointwise_forward")
SETTINGS = {
    # im2col NCHW forward (and pointwise grad-input): one GEMM per image with implicit im2col,
    # or, pointwise, one GEMM over every image (the images as B's column segments); 1x1 NCHW
    # grad-weight with the threads inside one GEMM (dW split).
    # Strided spatial NCHW grad-input through (c, r, s) columns and col2im, one GEMM over the
    # images.
    "im2col_native": dict({t: 1 for t in NATIVE_THRESHOLDS}, pointwise_grad_weight_dw_per_pixel=1,
                          im2col_col2im_grad_input_min_pixels=1),
    # im2col NCHW forward through the NHWC GEMM, whatever the map size; 1x1 NCHW grad-weight
    # with the pixels split over threads.
    "im2col_nhwc": dict({t: HUGE for t in NATIVE_THRESHOLDS},
                        pointwise_grad_weight_dw_per_pixel=HUGE,
                        im2col_col2im_grad_input_min_pixels=HUGE),
    # Direct's forward units run block by block, each thread packing the weight blocks it
    # reaches (what weight-bound layers, 9 MiB of 3x3 weights, do at their real size); its
    # grad-weight splits the units over the threads, not the pixels (large dW).
    "direct_block_by_block": dict(direct_blocks_fastest_max_weight_bytes=1,
                                  direct_grad_weight_pixel_split_max_bytes=1),
    # One image per layout group, a few pixels per column chunk and per grad-weight chunk:
    # every loop over groups and chunks runs several times, with ragged last pieces.
    # Direct's units run the tiles of one channel block back to back (the default runs a
    # tile's blocks back to back wherever the weights fit in L2, as on these small cases).
    # Depthwise channels_last outputs (and strided grad-inputs) of any size are streamed
    # past the caches.
    "tiny_budgets": dict({t: HUGE for t in NATIVE_THRESHOLDS}, layout_budget_bytes=1,
                         im2col_column_budget_bytes=1000, direct_grad_weight_chunk_pixels=5,
                         direct_blocks_fastest_max_weight_bytes=1, depthwise_stream_min_bytes=1,
                         depthwise_grad_input_stream_min_bytes=1,
                         im2col_col2im_grad_input_min_pixels=HUGE),
    # Strided NCHW grad-input through col2im, one image per GEMM (columns over the budget).
    "im2col_col2im_per_image": dict(im2col_col2im_grad_input_min_pixels=1,
                                    im2col_column_budget_bytes=1),
    # GEMMs of one A block with whole B blocks packed by all threads before a barrier (the
    # default packs B a micro-panel at a time per thread there).
    "gemm_shared_b_blocks": dict(gemm_own_panels_max_rows=1,
                                 **{t: 1 for t in NATIVE_THRESHOLDS}),
    # Spatial grad-weight through channel-major columns (dW written in OIHW order in place),
    # several image groups summed.
    "im2col_channel_major": dict(im2col_channel_major_grad_weight_max_pixels_per_filter=HUGE,
                                 layout_budget_bytes=1),
}


def _run_both_passes(case, dtype, algo):
    """(y, grads, expected y, expected grads, workspace used by the forward alone)."""
    x, w, b = case.make(dtype, requires_grad=True)
    fastconv.release_workspaces()
    y = fastconv.conv2d(x, w, b, **case.kwargs(), algo=algo)
    used = workspace_high_water()
    gy = torch.randn(y.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    params = [x, w] + ([b] if b is not None else [])
    grads = torch.autograd.grad(y, params, gy)
    expected_y = F.conv2d(x.double(), w.double(), None if b is None else b.double(),
                          **case.kwargs())
    expected = torch.autograd.grad(expected_y, params, gy.double())
    return y, grads, expected_y, expected, used


@pytest.mark.parametrize("setting", SETTINGS, ids=list(SETTINGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", PATH_CASES, ids=lambda c: c.name)
def test_every_path_matches_torch(case, dtype, setting, algo, isa):
    if not supported(algo, case, dtype):
        return
    with tuning(**SETTINGS[setting]):
        y, grads, expected_y, expected, used = _run_both_passes(case, dtype, algo)
    assert_close(y, expected_y, **tolerances(dtype, case.reduction(), algo=algo), what=f"{setting} forward")
    pixels = max(1, y.shape[0] * y.shape[2] * y.shape[3])
    reductions = [case.weight[0] // case.groups * case.weight[2] * case.weight[3], pixels, pixels]
    for name, got, ref, red, mag in zip(("grad_input", "grad_weight", "grad_bias"), grads,
                                        expected, reductions, [1.0, pixels ** .5, pixels ** .5]):
        assert_close(got, ref, **tolerances(dtype, red, mag, algo=algo), what=f"{setting} {name}")
    # The forward took the path the setting names.
    nchw = not (case.channels_last or case.weight_channels_last)
    if algo == "im2col" and nchw and setting == "im2col_native":
        # W packed whole, or (pointwise) inside the GEMM; never an NHWC output
        assert used["gemm_whole_operand"] + used["gemm_panels_a"] > 0
        assert used["output_nhwc"] == 0
    if algo == "im2col" and nchw and setting == "im2col_nhwc":
        assert used["output_nhwc"] > 0


def test_tiny_budgets_really_split_the_work():
    case = CASES[CASE_IDS.index("large_map_dilated_strided")]
    x, w, b = case.make(torch.float32)
    x = torch.cat([x, x])  # two images
    with tuning(**SETTINGS["tiny_budgets"]):
        fastconv.release_workspaces()
        fastconv.conv2d(x, w, b, **case.kwargs(), algo="im2col")
        used = workspace_high_water()
    image = x[0].numel() * 4
    assert 0 < used["activation_nhwc"] <= image          # one image per group
    assert 0 < used["columns"] <= 1000                   # a few pixels per column chunk


@pytest.mark.parametrize("setting", ["im2col_native", "im2col_col2im_per_image"])
@pytest.mark.parametrize("stride,padding,dilation,groups", [
    ((2, 1), (1, 1), (1, 1), 1), ((2, 2), (1, 1), (1, 1), 1), ((3, 2), (0, 2), (1, 1), 1),
    ((2, 3), (2, 1), (2, 1), 2), ((1, 2), (3, 0), (1, 3), 1)])
def test_col2im_grad_input_takes_its_path(stride, padding, dilation, groups, setting, isa):
    """Strided NCHW grad-input through (c, r, s) columns and col2im: every stride phase,
    padding wider than a tap's reach, ragged maps; several images per GEMM or one each.
    No NHWC copy is made, and the columns hold one GEMM's images."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 11, 10, dtype=torch.float64, generator=g)
    w = torch.randn(6, 4 // groups, 3, 3, dtype=torch.float64, generator=g)
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    gy = torch.randn(F.conv2d(x, w, **kw).shape, dtype=torch.float64, generator=g)
    conv = (list(stride), [padding[0], padding[0], padding[1], padding[1]], list(dilation),
            groups, "im2col")
    with tuning(**SETTINGS[setting]):
        fastconv.release_workspaces()
        got = ops.conv2d_grad_input(gy, w, list(x.shape), *conv)
        used = workspace_high_water()
    expected = torch.nn.grad.conv2d_input(x.shape, w, gy, **kw)
    assert_close(got, expected, **tolerances(torch.float64, 54, 54 ** .5), what="col2im grad_input")
    column = (4 // groups) * 9 * gy.shape[2] * gy.shape[3] * 8  # one image's columns, bytes
    assert used["activation_nhwc"] == 0 and used["output_nhwc"] == 0
    assert used["columns"] == column * (3 if setting == "im2col_native" else 1)


@pytest.mark.parametrize("C,R,S,stride,padding,dilation", [
    (3, 7, 7, (2, 2), (3, 3, 3, 3), (1, 1)),    # the stem: 7 taps over two phases
    (2, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1)),    # one phase
    (2, 3, 5, (1, 3), (0, 2, 4, 1), (2, 2)),    # three phases, padding wider than the reach
    (2, 2, 4, (2, 2), (1, 0, 0, 3), (1, 3)),    # dilation 3 over stride 2: phases 0, 1, 0, 1
    (3, 1, 3, (3, 4), (0, 0, 5, 5), (1, 1)),    # columns beyond the input on both sides
    (96, 3, 3, (2, 2), (1, 1, 1, 1), (1, 1)),   # two K blocks that split a tap row's phases
    (1, 3, 3, (1, 2), (0, 0, 0, 0), (1, 4)),    # taps past the map: whole rows of zeros
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_implicit_im2col_packing(C, R, S, stride, padding, dilation, dtype, isa):
    """The native NCHW forward's implicit im2col (pack_implicit_cols): each stride phase of an
    input row gathered once with its padding, every tap copied from it, panels that span
    output rows and end partial, K blocks that start and end inside a row of taps."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, C, 13, 23, dtype=dtype, generator=g)
    w = torch.randn(5, C, R, S, dtype=dtype, generator=g)
    pt, pb, pl, pr = padding
    xp = F.pad(x, (pl, pr, pt, pb))
    expected = F.conv2d(xp.double(), w.double(), stride=stride, dilation=dilation)
    with tuning(**SETTINGS["im2col_native"]):
        fastconv.release_workspaces()
        got = ops.conv2d_forward(x, w, None, list(stride), list(padding), list(dilation), 1,
                                 "im2col")
        used = workspace_high_water()
    assert used["output_nhwc"] == 0 and used["activation_nhwc"] == 0  # native, implicit
    assert_close(got, expected.to(dtype), **tolerances(dtype, C * R * S, (C * R * S) ** .5),
                 what=f"implicit im2col C={C} {R}x{S} stride {stride} padding {padding} "
                      f"dilation {dilation}")


def test_tuning_restores_and_rejects_unknown_fields():
    with tuning() as before:
        pass
    with tuning(layout_budget_bytes=123) as inside:
        assert inside["layout_budget_bytes"] == 123
    with tuning() as after:
        assert after == before
    with pytest.raises(ValueError, match="unknown tuning"):
        with tuning(nonsense=1):
            pass


ESTIMATE_CASES = [CASES[CASE_IDS.index(n)] for n in (
    "basic", "strided_asym", "dilated_asym_padded", "groups_strided", "pointwise",
    "pointwise_strided", "stem_like",
    "channel_tails", "many_channels", "large_map_dilated_strided", "large_map_groups",
    "depthwise_multiplier", "depthwise_multiplier3_k5_dilated", "depthwise_channel_blocks")]


@pytest.mark.parametrize("setting", ["default", "direct_block_by_block", "im2col_native",
                                     "im2col_col2im_per_image", "gemm_shared_b_blocks"])
@pytest.mark.parametrize("case", ESTIMATE_CASES, ids=lambda c: c.name)
def test_workspace_estimate_bounds_what_a_call_takes(case, algo, setting):
    if not supported(algo, case, torch.float32):
        return
    with tuning(**SETTINGS.get(setting, {})):
        _check_workspace_estimate(case, algo)


def _check_workspace_estimate(case, algo):
    a = registry.get(algo)
    problem = case.problem()
    x, w, b = case.make(torch.float32)
    y = fastconv.conv2d(x, w, b, **case.kwargs(), algo=algo)
    gy = torch.randn_like(y)
    stride, pad, dilation = case.explicit()
    conv = (list(stride), list(pad), list(dilation), case.groups, algo)
    calls = {
        Pass.FORWARD: lambda: fastconv.ops.conv2d(x, w, b, *conv),
        Pass.GRAD_INPUT: lambda: fastconv.ops.conv2d_grad_input(gy, w, list(x.shape), *conv),
        Pass.GRAD_WEIGHT: lambda: fastconv.ops.conv2d_grad_weight(gy, x, list(w.shape), *conv),
    }
    for pass_, call in calls.items():
        fastconv.release_workspaces()
        call()
        used = sum(workspace_high_water().values())
        estimate = a.workspace_bytes(problem, pass_, torch.float32)
        assert used <= estimate, f"{pass_.name}: used {used} bytes, estimated {estimate}"
        assert estimate <= 2 * used + 4096, f"{pass_.name}: estimate {estimate} vs used {used}"


@pytest.mark.parametrize("threads", [1, 2])
def test_workspace_estimate_bounds_gemms_that_change_path(threads):
    """A call's GEMMs may take another path than the shape the estimate is made for: here
    the col2im grad-input's last image group (one image, 400 columns) splits rows where the
    full groups (18 images) run one A block with a micro-panel per thread."""
    from cases import Case
    case = Case("col2im_last_group", (19, 16, 40, 40), (64, 16, 3, 3), stride=2, padding=1)
    x, w, _ = case.make(torch.float32)
    gy = torch.randn(F.conv2d(x, w, **case.kwargs()).shape)
    stride, pad, dilation = case.explicit()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tuning(im2col_col2im_grad_input_min_pixels=1):
            fastconv.release_workspaces()
            ops.conv2d_grad_input(gy, w, list(x.shape), list(stride), list(pad), list(dilation),
                                  1, "im2col")
            used = sum(workspace_high_water().values())
            estimate = registry.get("im2col").workspace_bytes(case.problem(), Pass.GRAD_INPUT,
                                                              torch.float32)
    finally:
        torch.set_num_threads(before)
    assert used <= estimate, f"used {used} bytes, estimated {estimate}"


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("split", ["pixels", "dw"])
@pytest.mark.parametrize("stride", [1, 2])
def test_pointwise_backward_native_nchw(groups, batch, threads, split, stride, isa):
    # im2col's NCHW 1x1 grad-weight: one GEMM whose K runs over several images' pixels,
    # with the threads splitting the pixels (whole images or parts of one: batch 1, and 3
    # images over 2 threads; partial sums added) or dW (inside the GEMM); a strided one reads
    # its input subsampled. Grad-input runs one GEMM per image.
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        per_pixel = HUGE if split == "pixels" else 1
        with tuning(pointwise_grad_weight_dw_per_pixel=per_pixel):
            _check_pointwise_backward(groups, batch, stride, split)
    finally:
        torch.set_num_threads(previous)


def _check_pointwise_backward(groups, batch, stride, split):
    # 156 output pixels per image at stride 1: two threads' worth (64+ pixels each) even at
    # batch 1, and fewer pixels than dW has elements (768+) for the dW split; at stride 2,
    # 6 x 7 (ragged: 11 x 13 input).
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 32, 12 - stride + 1, 13, generator=g, dtype=torch.float64)
    w = torch.randn(48, 32 // groups, 1, 1, generator=g, dtype=torch.float64)
    OH, OW = (x.shape[2] - 1) // stride + 1, (x.shape[3] - 1) // stride + 1
    gy = torch.randn(batch, 48, OH, OW, generator=g, dtype=torch.float64)
    conv = ([stride, stride], [0, 0, 0, 0], [1, 1], groups, "im2col")
    with torch.no_grad():
        fastconv.release_workspaces()
        gw = ops.conv2d_grad_weight(gy, x, list(w.shape), *conv)
        used = workspace_high_water()
        problem = fastconv.explain(x.shape, w.shape, stride=stride, groups=groups,
                                   dtype=x.dtype).problem
        estimate = registry.get("im2col").workspace_bytes(problem, Pass.GRAD_WEIGHT, x.dtype)
        assert 0 < sum(used.values()) <= estimate, (used, estimate)
        if split == "dw":  # the GEMM's own panels, no partial sums
            assert used["accumulators"] == 0 and used["gemm_panels_b"] > 0, used
        elif (batch * OH * OW >= 2 * 64 and torch.get_num_threads() > 1
              and batch * OH * OW * w.numel() * 2 >= 1 << 18):   # simd.h: kSerialWork
            assert used["accumulators"] > 0, used         # the other threads' partial sums
        if stride > 1:   # the subsampled images
            assert used["activation_nhwc"] == batch * 32 * OH * OW * 8, used
        gx = ops.conv2d_grad_input(gy, w, list(x.shape), *conv)
    assert_close(gw, torch.nn.grad.conv2d_weight(x, w.shape, gy, stride=stride, groups=groups),
                 atol=1e-10, rtol=1e-10, what="grad weight")
    assert_close(gx, torch.nn.grad.conv2d_input(x.shape, w, gy, stride=stride, groups=groups),
                 atol=1e-10, rtol=1e-10, what="grad input")


def test_strided_pointwise_grad_weight_in_image_groups():
    # Under a small layout budget the subsampled input is made one image at a time and dW
    # summed over the groups.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, 13, 12, generator=g, dtype=torch.float64)
    w = torch.randn(10, 8, 1, 1, generator=g, dtype=torch.float64)
    gy = torch.randn(3, 10, 7, 4, generator=g, dtype=torch.float64)
    conv = ([2, 3], [0, 0, 0, 0], [1, 1], 1, "im2col")
    for per_pixel in (1, HUGE):
        with tuning(layout_budget_bytes=1, pointwise_grad_weight_dw_per_pixel=per_pixel), \
                torch.no_grad():
            fastconv.release_workspaces()
            gw = ops.conv2d_grad_weight(gy, x, list(w.shape), *conv)
            assert workspace_high_water()["activation_nhwc"] == 8 * 7 * 4 * 8  # one image
        assert_close(gw, torch.nn.grad.conv2d_weight(x, w.shape, gy, stride=(2, 3)),
                     atol=1e-11, rtol=1e-11, what=f"grad weight per_pixel={per_pixel}")


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True])
def test_direct_backward_memory_does_not_grow_with_the_batch(stride, channels_last):
    """Direct grad-input and grad-weight convert their operands a group of images at a time
    under the layout budget: their scratch memory is the same for 8 images and for 32."""
    used = {}
    for batch in (8, 32):
        x = torch.randn(batch, 16, 12, 12)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        w = torch.randn(24, 16, 3, 3)
        conv = ([stride] * 2, [1] * 4, [1, 1], 1, "direct")
        gy = torch.randn(batch, 24, 12 // stride, 12 // stride)
        for name, call in (("grad_input", lambda: ops.conv2d_grad_input(gy, w, list(x.shape), *conv)),
                           ("grad_weight", lambda: ops.conv2d_grad_weight(gy, x, list(w.shape), *conv))):
            with tuning(layout_budget_bytes=20_000):   # 1-3 images per group here
                fastconv.release_workspaces()
                got = call()
                used[name, batch] = sum(workspace_high_water().values())
            ref = (torch.nn.grad.conv2d_input(x.shape, w, gy, stride=stride, padding=1)
                   if name == "grad_input" else
                   torch.nn.grad.conv2d_weight(x, w.shape, gy, stride=stride, padding=1))
            assert_close(got, ref, atol=1e-3, rtol=1e-4, what=f"{name} batch {batch}")
    for name in ("grad_input", "grad_weight"):
        assert used[name, 32] == used[name, 8], (name, used)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("stride,padding,dilation,groups", [
    ((1, 1), (1, 1), (1, 1), 1), ((2, 2), (1, 1), (1, 1), 1), ((3, 2), (0, 2), (1, 1), 1),
    ((2, 3), (2, 1), (2, 1), 2), ((1, 2), (3, 0), (1, 3), 1)])
def test_channel_major_grad_weight_takes_its_path(stride, padding, dilation, groups,
                                                  channels_last, isa):
    """im2col grad-weight through channel-major columns, where dW outweighs the columns
    (3x3/2 512 @14 at batch 1): dW is written in place, with no tap-major copy, and x is read
    in its own layout, with no NHWC copy; every stride phase, padding wider than a tap's
    reach, ragged maps, groups, one and several image groups."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 4, 11, 10, dtype=torch.float64, generator=g)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(40, 4 // groups, 3, 3, dtype=torch.float64, generator=g)
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    gy = torch.randn(F.conv2d(x, w, **kw).shape, dtype=torch.float64, generator=g)
    conv = (list(stride), [padding[0], padding[0], padding[1], padding[1]], list(dilation),
            groups, "im2col")
    expected = torch.nn.grad.conv2d_weight(x, w.shape, gy, **kw)
    for budget in (HUGE, 1):  # the whole batch at once, or one image per group
        with tuning(im2col_channel_major_grad_weight_max_pixels_per_filter=HUGE,
                    layout_budget_bytes=budget):
            fastconv.release_workspaces()
            got = ops.conv2d_grad_weight(gy, x, list(w.shape), *conv)
            used = workspace_high_water()
        assert_close(got, expected, **tolerances(torch.float64, 99, 99 ** .5),
                     what=f"channel-major grad_weight, layout budget {budget}")
        assert used["weights_tap_major"] == 0 and used["activation_nhwc"] == 0
