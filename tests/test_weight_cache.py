"""The inference weight cache (fastconv.weight_cache): prepacked weights give the same bits
as packing per call, every way a weight can change is noticed, training never uses the
cache, and its memory is bounded and released."""
from __future__ import annotations

import copy
import gc
import io
import pickle

import pytest
import torch
import torch.nn.functional as F

import fastconv
from fastconv import backend, dispatch, weight_cache
from fastconv.backend import NCHW
from cases import CASES, CASE_IDS
from conftest import FORWARD, assert_close, run_in_threads, supported, tolerances

PACKING = [a for a in fastconv.registry.ALGORITHMS if "cpu" in a.kernels]


@pytest.fixture(autouse=True)
def fresh_cache():
    """Each test starts with an empty cache at the default budget."""
    fastconv.release_workspaces()
    limit = fastconv.cache_info()["limit_bytes"]
    yield
    fastconv.set_cache_limit(limit)
    fastconv.release_workspaces()


def made() -> int:
    """Packings made so far (cache misses)."""
    return fastconv.cache_info()["misses"]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("algo", [a.name for a in PACKING])
def test_prepacked_forward_is_bitwise_the_per_call_forward(algo, case, isa):
    if not supported(algo, case, torch.float32, FORWARD):
        return
    x, w, b = case.make(torch.float32)
    packed = fastconv.prepack(w)
    with torch.no_grad():
        expected = fastconv.conv2d(x, w, b, **case.kwargs(), algo=algo)
        first = fastconv.conv2d(x, packed, b, **case.kwargs(), algo=algo)
        again = fastconv.conv2d(x, packed, b, **case.kwargs(), algo=algo)
    assert torch.equal(first, expected) and torch.equal(again, expected)
    assert first.is_contiguous(memory_format=torch.channels_last) == \
        expected.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("algo", [a.name for a in PACKING])
@pytest.mark.parametrize("native", [False, True], ids=["nhwc_gemm", "native_nchw"])
def test_prepacked_float64_both_im2col_layouts(algo, native):
    # im2col packs its weights as GEMM operand B (NHWC path) or A (native NCHW path): both
    # variants, and float64, for every algorithm.
    case = CASES[CASE_IDS.index("channel_tails")]
    if not supported(algo, case, torch.float64, FORWARD):
        return
    x, w, b = case.make(torch.float64)
    threshold = 1 if native else 1 << 30
    with backend.tuning(im2col_native_min_pixels_spatial=threshold):
        packed = fastconv.prepack(w)
        with torch.no_grad():
            expected = fastconv.conv2d(x, w, b, **case.kwargs(), algo=algo)
            got = fastconv.conv2d(x, packed, b, **case.kwargs(), algo=algo)
    assert torch.equal(got, expected)


def test_packing_is_made_once_and_sized_as_documented():
    x, w = torch.randn(1, 64, 14, 14), torch.randn(64, 64, 3, 3)
    weight_bytes = w.numel() * 4
    expected_ratio = {"direct": 1, "im2col": 1, "winograd_f2": 16 / 9, "winograd_f4": 36 / 9,
                      "winograd_f6": 64 / 9}
    for name, ratio in expected_ratio.items():
        fastconv.release_workspaces()
        packed = fastconv.prepack(w)
        before = fastconv.cache_info()
        with torch.no_grad():
            for _ in range(3):
                fastconv.conv2d(x, packed, padding=1, algo=name)
        info = fastconv.cache_info()
        assert info["entries"] == 1, name
        assert (info["misses"] - before["misses"], info["hits"] - before["hits"]) == (1, 2), name
        # Within the rounding of the packed panels (direct: 16 channels; GEMM: its tile); the
        # entry also keeps the weight's storage alive, and counts it.
        packed_bytes = info["bytes"] - weight_bytes
        assert ratio * weight_bytes <= packed_bytes <= 1.25 * ratio * weight_bytes, name


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return fastconv.convert(torch.nn.Sequential(
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 16, 1))).to(dtype).eval()


def _expected(model, x):
    """The model's output computed by torch from the current weights (no fastconv)."""
    y = x
    for m in model:
        y = (F.conv2d(y, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)
             if isinstance(m, torch.nn.Conv2d) else m(y))
    return y


def _check(model, x, what):
    with torch.no_grad():
        got, expected = model(x), _expected(model, x)
    magnitude = expected.abs().max().item()
    assert_close(got, expected, **tolerances(x.dtype, 32 * 9, magnitude, "winograd_f4"),
                 what=what)


# Every way a weight can change, as (name, change(model)). Each must be noticed.
def _in_place(model):
    with torch.no_grad():
        model[0].weight.mul_(-2)


def _optimizer_step(model):
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model(torch.randn(2, 16, 9, 9)).sum().backward()
    opt.step()
    model.eval()


def _new_parameter(model):
    model[0].weight = torch.nn.Parameter(torch.randn_like(model[0].weight))


def _set_data(model):
    model[0].weight.data = torch.randn_like(model[0].weight)


def _set_data_twice(model):
    # The second tensor may reuse the first's freed address: the packing keeps the storage it
    # was made from alive, so the address cannot come back while the packing is in use.
    model[0].weight.data = torch.randn_like(model[0].weight)
    model[0].weight.data = torch.randn_like(model[0].weight)


def _load_state_dict(model):
    state = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    model.load_state_dict(state)


def _dtype(model):
    model.double()


def _nn_init(model):
    torch.nn.init.kaiming_normal_(model[0].weight)


def _copy_from_other(model):
    with torch.no_grad():
        model[0].weight.copy_(torch.randn_like(model[0].weight))


CHANGES = [_in_place, _optimizer_step, _new_parameter, _set_data, _set_data_twice,
           _load_state_dict, _dtype, _nn_init, _copy_from_other]


@pytest.mark.parametrize("change", CHANGES, ids=[c.__name__.strip("_") for c in CHANGES])
@pytest.mark.parametrize("algo", ["direct", "im2col", "winograd_f4", "auto"])
def test_every_weight_change_is_noticed(change, algo):
    model = _model()
    for m in model:
        if isinstance(m, fastconv.nn.Conv2d) and not (algo.startswith("winograd") and m.kernel_size == (1, 1)):
            m.algo = algo
    x = torch.randn(1, 16, 14, 14)
    _check(model, x, "before")
    _check(model, x, "cached")
    before = made()
    change(model)
    x = x.to(model[0].weight.dtype)
    _check(model, x, f"after {change.__name__}")
    assert made() > before, "the changed weight must be packed again"


def test_isa_change_is_noticed(isa):
    model, x = _model(), torch.randn(1, 16, 10, 10)
    for m in (model[0], model[2]):
        m.algo = "direct"  # auto may choose otherwise with and without a cache
    with fastconv.use_isa("scalar"):
        _check(model, x, "scalar")
    _check(model, x, isa)
    with torch.no_grad():
        with_cache = model(x)
        model[0].release_weight_cache()
        model[2].release_weight_cache()
        fastconv.set_cache_limit(0)
        without = model(x)
    assert torch.equal(with_cache, without)


def test_tuning_change_is_noticed():
    w, x = torch.randn(32, 16, 3, 3), torch.randn(1, 16, 20, 20)
    packed = fastconv.prepack(w)
    with torch.no_grad():
        fastconv.conv2d(x, packed, padding=1, algo="im2col")
        with backend.tuning(im2col_native_min_pixels_spatial=1):  # the other packed layout
            got = fastconv.conv2d(x, packed, padding=1, algo="im2col")
            expected = fastconv.conv2d(x, w, padding=1, algo="im2col")
    assert torch.equal(got, expected)


def test_writes_through_data_need_release():
    # The one change torch does not track (documented): after release it is picked up.
    model, x = _model(), torch.randn(1, 16, 8, 8)
    _check(model, x, "before")
    model[0].weight.data.mul_(3)
    model[0].release_weight_cache()
    _check(model, x, "after release")


def test_training_never_uses_the_cache():
    model, x = _model(), torch.randn(2, 16, 9, 9, requires_grad=True)
    model.train()
    reference = copy.deepcopy(model)
    before = made()
    for _ in range(2):
        model(x).sum().backward()
    assert fastconv.cache_info()["entries"] == 0 and made() == before
    y = _expected(reference, x)
    y.sum().backward()
    assert_close(model[0].weight.grad / 2, reference[0].weight.grad, atol=1e-4, rtol=1e-4,
                 what="weight grad")
    # A prepacked weight in a call that needs a gradient differentiates the weight itself.
    w = torch.randn(8, 16, 3, 3, requires_grad=True)
    packed = fastconv.prepack(w)
    fastconv.conv2d(x, packed, padding=1).sum().backward()
    assert w.grad is not None and made() == before


def test_frozen_weights_use_the_cache_with_input_gradients_elsewhere():
    # Inference of a frozen layer inside no_grad uses the cache; with grad enabled and a
    # frozen weight the module still packs per call (its input needs a gradient).
    model = _model()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(1, 16, 8, 8)
    before = made()
    _check(model, x, "frozen")
    assert made() == before + 2
    xg = x.clone().requires_grad_(True)
    model(xg).sum().backward()
    assert xg.grad is not None


def test_memory_is_bounded_and_released():
    ws = [torch.randn(64, 64, 3, 3) for _ in range(8)]
    weight_bytes = ws[0].numel() * 4
    entry_bytes = 2 * weight_bytes  # direct's packing (64 channels: no padding) + the weight
    packed = [fastconv.prepack(w) for w in ws]
    x = torch.randn(1, 64, 7, 7)
    # A weight is cached only if its largest packing (8x) fits: then 4 entries fit here.
    fastconv.set_cache_limit(8 * weight_bytes + 1000)
    with torch.no_grad():
        for p in packed:
            fastconv.conv2d(x, p, padding=1, algo="direct")
    info = fastconv.cache_info()
    assert info["entries"] == 4 and info["bytes"] == 4 * entry_bytes <= info["limit_bytes"]
    assert info["evictions"] == 4
    # Least recently used goes first: the last four are kept.
    with torch.no_grad():
        hits = info["hits"]
        fastconv.conv2d(x, packed[7], padding=1, algo="direct")
        assert fastconv.cache_info()["hits"] == hits + 1
    # Below that, the weight is not cached at all, and auto chooses as without a cache.
    fastconv.set_cache_limit(8 * weight_bytes - 1)
    assert fastconv.cache_info()["entries"] == 3 and not packed[0].usable()
    fastconv.release_workspaces()
    with torch.no_grad():
        got = fastconv.conv2d(x, packed[0], padding=1, algo="direct")
    assert_close(got, F.conv2d(x, ws[0], padding=1), **tolerances(torch.float32, 576, 24))
    assert fastconv.cache_info()["entries"] == 0
    fastconv.set_cache_limit(1 << 30)
    with torch.no_grad():
        fastconv.conv2d(x, packed[0], padding=1, algo="direct")
    assert fastconv.cache_info()["bytes"] == entry_bytes
    fastconv.release_workspaces()
    assert fastconv.cache_info()["bytes"] == fastconv.cache_info()["entries"] == 0
    with pytest.raises(ValueError, match="non-negative"):
        fastconv.set_cache_limit(-1)


def test_a_changed_weight_drops_its_old_packings():
    w, x = torch.randn(16, 8, 3, 3), torch.randn(1, 8, 6, 6)
    packed = fastconv.prepack(w)
    with torch.no_grad():
        for _ in range(3):
            fastconv.conv2d(x, packed, padding=1, algo="direct")
            w.mul_(2)
    assert fastconv.cache_info()["entries"] == 1


def test_weights_writable_behind_their_version_counter_are_not_cached():
    # vector_to_parameters makes each weight a view into one flat vector: writes to the
    # vector never move the weight's version counter, so the weight must not be cached.
    model, x = _model(), torch.randn(1, 16, 8, 8)
    flat = torch.nn.utils.parameters_to_vector(model.parameters())
    for step in range(3):
        with torch.no_grad():
            flat.copy_(torch.randn_like(flat) * 0.1)
        torch.nn.utils.vector_to_parameters(flat, model.parameters())
        _check(model, x, f"vector_to_parameters, step {step}")
    assert fastconv.cache_info()["entries"] == 0
    shared = _model().share_memory()
    _check(shared, x, "shared memory")
    assert fastconv.cache_info()["entries"] == 0


def test_functional_call_does_not_churn_the_cache():
    model, x = _model(), torch.randn(1, 16, 8, 8)
    params = {k: v.detach().clone() * 2 for k, v in model.named_parameters()}
    with torch.no_grad():
        got = torch.func.functional_call(model, params, (x,))
    twice = copy.deepcopy(model)
    with torch.no_grad():
        for p in twice.parameters():
            p.mul_(2)
        expected = _expected(twice, x)
    assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert fastconv.cache_info()["entries"] == 0


def test_module_release_and_garbage_collection_free_the_packings():
    model, x = _model(), torch.randn(1, 16, 8, 8)
    _check(model, x, "fill")
    assert fastconv.cache_info()["entries"] == 2
    model[0].release_weight_cache()
    assert fastconv.cache_info()["entries"] == 1
    del model
    gc.collect()
    assert fastconv.cache_info()["entries"] == 0


def test_copies_and_pickles_do_not_share_packings():
    model, x = _model(), torch.randn(1, 16, 8, 8)
    _check(model, x, "fill")
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone[0].weight.mul_(2)
    _check(clone, x, "deepcopy")
    _check(model, x, "original")
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    _check(loaded, x, "torch.load")
    packed = pickle.loads(pickle.dumps(fastconv.prepack(torch.randn(4, 2, 3, 3))))
    assert isinstance(packed, fastconv.PackedWeight) and packed.weight.shape == (4, 2, 3, 3)


def test_concurrent_calls_share_one_module():
    model = _model()
    xs = [torch.randn(1, 16, 12, 12) for _ in range(4)]
    with torch.no_grad():
        expected = [_expected(model, x) for x in xs]

    def run(i):
        with torch.no_grad():
            for _ in range(5):
                assert_close(model(xs[i]), expected[i], atol=1e-4, rtol=1e-4)

    run_in_threads(run, 4)


def test_untrackable_weights_are_not_cached():
    with torch.inference_mode():
        w = torch.randn(8, 4, 3, 3)
        x = torch.randn(1, 4, 6, 6)
        got = fastconv.conv2d(x, fastconv.prepack(w), padding=1)
    assert fastconv.cache_info()["entries"] == 0
    assert_close(got, F.conv2d(x, w, padding=1), **tolerances(torch.float32, 36))
    assert not fastconv.prepack(torch.randn(8, 4, 3, 3, device="meta")).usable()


def test_parametrized_weights_are_not_cached():
    model = _model()
    torch.nn.utils.parametrize.register_parametrization(model[0], "weight",
                                                        _Scale())
    x = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        got = model(x)
        expected = _expected(model, x)
    assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert fastconv.cache_info()["entries"] == 1  # only the second, plain layer


class _Scale(torch.nn.Module):
    def forward(self, w):
        return 2 * w


def test_mismatched_packing_is_refused():
    w, x = torch.randn(8, 4, 3, 3), torch.randn(1, 4, 6, 6)
    problem = fastconv.explain(x.shape, w.shape, padding=1).problem
    kernels = fastconv.registry.get("direct").kernels["cpu"]
    # 200 filters: more channel blocks than 8 filters need, whatever the block width
    other = fastconv.explain(x.shape, (200, 4, 3, 3), padding=1).problem
    packing = kernels.weight_packing(other, torch.float32, NCHW, NCHW)
    out = torch.empty(packing.elements)
    kernels.pack_weights(other, NCHW, NCHW, torch.randn(200, 4, 3, 3), out)
    entry = weight_cache.Packing(out, packing, (), out)
    with pytest.raises(ValueError, match="prepacked weights do not match"):
        kernels.forward(problem, x, NCHW, w, None, torch.empty(1, 8, 6, 6), NCHW, entry)


def test_auto_knows_prepacked_filters():
    # Batch 1, 3x3 512 @7: Winograd does not pay when filters are transformed per call, F2
    # does when they come from the cache.
    problem = fastconv.explain((1, 512, 7, 7), (512, 512, 3, 3), padding=1).problem
    assert dispatch.choose(problem).name == "direct"
    assert dispatch.choose(problem, prepacked=True).name == "winograd_f2"
    big = fastconv.explain((1, 256, 14, 14), (256, 256, 3, 3), padding=1).problem
    assert dispatch.choose(big, prepacked=True).name == "winograd_f4"
    assert "winograd" in str(fastconv.explain((1, 512, 7, 7), (512, 512, 3, 3), padding=1,
                                              prepacked=True))
