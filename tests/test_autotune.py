"""Autotune (fastconv.autotune): winners per key and pass, the cache file (round trip, and
corrupt, foreign, old or stale files ignored with a warning), explain, and no timing inside
torch.compile's tracing."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastconv
from fastconv import autotune, ops
from fastconv.backend import Pass
from fastconv.registry import BY_NAME
from conftest import assert_close, tolerances

# 3x3 stride 1, 16 channels: every algorithm but depthwise (and naive) can run it.
SHAPE_X, SHAPE_W = (2, 16, 12, 12), (16, 16, 3, 3)


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    """Each test starts with autotune off and nothing tuned, and times candidates briefly."""
    monkeypatch.setattr(autotune, "TIME_PER_CANDIDATE", 0.002)
    autotune.disable()
    autotune.clear()
    yield
    autotune.disable()
    autotune.clear()


def _tensors(requires_grad=False, channels_last=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE_X, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(SHAPE_W, generator=g) / 12
    return x.requires_grad_(requires_grad), w.requires_grad_(requires_grad)


def _kernels_of_auto(pass_=Pass.FORWARD, layout="nchw"):
    problem = fastconv.explain(SHAPE_X, SHAPE_W, padding=1).problem
    plan = ops._plan(pass_, SHAPE_X, SHAPE_W, (1, 1), problem.padding, (1, 1), 1, "auto",
                     "cpu", torch.float32, False, layout, True)
    return plan.kernels


def test_off_by_default_and_heuristic_untouched():
    assert not autotune.is_enabled()
    x, w = _tensors()
    fastconv.conv2d(x, w, padding=1)
    assert autotune.entries() == []


def test_tunes_each_pass_once_and_runs_the_winner():
    x, w = _tensors(requires_grad=True)
    with fastconv.autotuning():
        y = fastconv.conv2d(x, w, padding=1)
        gx, gw = torch.autograd.grad(y.sum(), (x, w))
        fastconv.conv2d(x, w, padding=1)   # known now: no second entry
        entries = autotune.entries()
        assert sorted(e.key.pass_ for e in entries) == ["forward", "grad_input", "grad_weight"]
        for e in entries:
            pass_ = Pass[e.key.pass_.upper()]
            heuristic = fastconv.dispatch.choose(e.key.problem, pass_=pass_).name
            fastest = min(e.times_ms.values())
            # The fastest, or auto's own choice when it is within KEEP_HEURISTIC_WITHIN.
            assert (e.times_ms[e.algo] == fastest or (
                e.algo == heuristic
                and e.times_ms[e.algo] <= fastest * (1 + autotune.KEEP_HEURISTIC_WITHIN)))
            assert "naive" not in e.times_ms and "depthwise" not in e.times_ms
            assert {"direct", "im2col", "winograd_f2"} <= set(e.times_ms)
            assert e.key.threads == torch.get_num_threads()
            assert e.key.isa == fastconv.get_isa()
            assert _kernels_of_auto(pass_) is BY_NAME[e.algo].kernels["cpu"]
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    yd = F.conv2d(xd, wd, padding=1)
    ex, ew = torch.autograd.grad(yd.sum(), (xd, wd))
    tol = tolerances(torch.float32, 144, algo="winograd_f6")
    assert_close(y, yd, **tol, what="forward")
    assert_close(gx, ex, **tol, what="grad_input")
    assert_close(gw, ew, atol=1e-4, rtol=1e-4, what="grad_weight")


def test_layout_and_dtype_are_separate_keys():
    with fastconv.autotuning():
        for channels_last in (False, True):
            x, w = _tensors(channels_last=channels_last)
            fastconv.conv2d(x, w, padding=1)
        x, w = _tensors()
        fastconv.conv2d(x.double(), w.double(), padding=1)
    keys = {(e.key.layout, e.key.dtype) for e in autotune.entries()}
    assert keys == {("nchw", "float32"), ("nhwc", "float32"), ("nchw", "float64")}


def test_context_manager_restores_and_plans_follow():
    heuristic = BY_NAME[fastconv.explain(SHAPE_X, SHAPE_W, padding=1).choice].kernels["cpu"]
    autotune.enable()
    with fastconv.autotuning():
        pass
    assert autotune.is_enabled()
    autotune.disable()
    assert not autotune.is_enabled()
    assert _kernels_of_auto() is heuristic


def _entry_file(tmp_path, algo="direct", **changes):
    """A cache file with one forward entry for the test problem naming ``algo``."""
    problem = fastconv.explain(SHAPE_X, SHAPE_W, padding=1).problem
    key = autotune.make_key(problem, Pass.FORWARD, torch.float32, "nchw")
    data = dict(format=autotune.FORMAT_NAME, version=autotune.FORMAT_VERSION,
                fastconv=fastconv.__version__, build=autotune.build_id(),
                entries=[autotune._entry_json(autotune.Entry(key, algo, {algo: 1.0}))])
    data.update(changes)
    path = tmp_path / "tune.json"
    path.write_text(json.dumps(data))
    return path


def _write_entry_file_and_enable(tmp_path, **kw):
    path = _entry_file(tmp_path, **kw)
    autotune.enable(path)
    return path


def test_cache_file_round_trip_steers_auto(tmp_path):
    path = _write_entry_file_and_enable(tmp_path, algo="im2col")
    assert _kernels_of_auto() is BY_NAME["im2col"].kernels["cpu"]   # not the heuristic's
    e = fastconv.explain(SHAPE_X, SHAPE_W, padding=1)
    assert e.choice == "im2col" and "autotune measured" in e.why
    autotune.disable()
    assert fastconv.explain(SHAPE_X, SHAPE_W, padding=1).choice != "im2col"
    assert _kernels_of_auto() is not BY_NAME["im2col"].kernels["cpu"]
    # New keys are appended to the file, the loaded one kept.
    autotune.clear()
    with fastconv.autotuning(path):
        x, w = _tensors()
        fastconv.conv2d(x[:1], w, padding=1)
    saved = json.loads(path.read_text())
    assert len(saved["entries"]) == 2
    assert {e["problem"]["N"] for e in saved["entries"]} == {1, 2}


@pytest.mark.parametrize("damage", ["not_json", "not_ours", "old_version", "other_build",
                                    "bad_entry", "unknown_algo", "naive_algo"])
def test_bad_cache_file_is_ignored_with_a_warning(tmp_path, damage):
    if damage == "not_json":
        path = tmp_path / "tune.json"
        path.write_text("{ half a file")
    elif damage == "not_ours":
        path = tmp_path / "tune.json"
        path.write_text(json.dumps({"entries": []}))
    elif damage == "old_version":
        path = _entry_file(tmp_path, version=0)
    elif damage == "other_build":
        path = _entry_file(tmp_path, build="0123456789abcdef")
    elif damage == "bad_entry":
        path = _entry_file(tmp_path, entries=[{"algo": "direct"}])
    else:
        path = _entry_file(tmp_path, algo="nonexistent" if damage == "unknown_algo" else "naive")
    with pytest.warns(fastconv.AutotuneWarning, match="ignoring cache file"):
        autotune.enable(path)
    assert autotune.entries() == []
    x, w = _tensors()
    fastconv.conv2d(x, w, padding=1)               # tunes, and rewrites the file
    assert json.loads(path.read_text())["version"] == autotune.FORMAT_VERSION


def test_explain_before_and_after_tuning():
    with fastconv.autotuning():
        assert "has not timed" in fastconv.explain(SHAPE_X, SHAPE_W, padding=1).why
        x, w = _tensors()
        fastconv.conv2d(x, w, padding=1)
        e = fastconv.explain(SHAPE_X, SHAPE_W, padding=1)
        assert "autotune measured" in e.why and e.choice == autotune.entries()[0].algo
        assert "measured" in str(e)


def test_no_timing_while_tracing():
    """Fake kernels (torch.compile's tracing) never time: only the compiled code's real call
    does, once."""
    x, w = _tensors()
    from torch._subclasses.fake_tensor import FakeTensorMode
    with fastconv.autotuning():
        with FakeTensorMode() as mode:
            fx, fw = mode.from_tensor(x), mode.from_tensor(w)
            torch.ops.fastconv.conv2d(fx, fw, None, [1, 1], [1, 1, 1, 1], [1, 1], 1, "auto")
        assert autotune.entries() == []
        compiled = torch.compile(lambda a, b: fastconv.conv2d(a, b, padding=1), fullgraph=True)
        y = compiled(x, w)
        assert len(autotune.entries()) == 1
    assert_close(y, F.conv2d(x.double(), w.double(), padding=1), atol=1e-4, rtol=1e-4)


def test_degenerate_problems_are_not_tuned():
    with fastconv.autotuning():
        y = fastconv.conv2d(torch.randn(0, 16, 8, 8), torch.randn(16, 16, 3, 3), padding=1)
    assert y.shape == (0, 16, 8, 8)
    assert autotune.entries() == []


def test_environment_variable_enables(tmp_path):
    import subprocess
    import sys
    path = tmp_path / "env.json"
    code = ("import torch, fastconv; assert fastconv.autotune.is_enabled(); "
            "fastconv.conv2d(torch.randn(1, 16, 8, 8), torch.randn(16, 16, 3, 3), padding=1)")
    env = dict(__import__("os").environ, FASTCONV_AUTOTUNE="1", FASTCONV_AUTOTUNE_FILE=str(path))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
    assert len(json.loads(path.read_text())["entries"]) == 1


def test_tuning_leaves_the_random_stream_alone():
    x, w = _tensors()
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    with fastconv.autotuning():
        fastconv.conv2d(x, w, padding=1)
    assert len(autotune.entries()) == 1
    assert torch.equal(torch.rand(3), expected)


def test_unwritable_cache_file_is_a_warning(tmp_path):
    x, w = _tensors()
    path = tmp_path / "missing_folder" / "tune.json"
    with pytest.warns(fastconv.AutotuneWarning, match="cannot write"):
        with fastconv.autotuning(path):
            y = fastconv.conv2d(x, w, padding=1)
    assert y.shape == (2, 16, 12, 12) and len(autotune.entries()) == 1


def test_mixed_layouts_are_their_own_key():
    x, w = _tensors()
    with fastconv.autotuning():
        fastconv.conv2d(x, w.contiguous(memory_format=torch.channels_last), padding=1)
    assert [e.key.layout for e in autotune.entries()] == ["nchw>nhwc"]


def test_dynamic_shapes_compile_under_autotune():
    x, w = _tensors()
    compiled = torch.compile(lambda a, b: fastconv.conv2d(a, b, padding=1), dynamic=True)
    with fastconv.autotuning():
        for n in (1, 2, 3):
            y = compiled(x[:1].expand(n, -1, -1, -1).contiguous(), w)
            assert_close(y, F.conv2d(x[:1].expand(n, -1, -1, -1).double(), w.double(),
                                     padding=1), atol=1e-4, rtol=1e-4)
