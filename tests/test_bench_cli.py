"""The benchmark CLI (fastconv.bench): options, outputs (table, JSON, CSV, plot, compare),
every pass and layout, errors, and the whole-model runner. Tiny layers and few samples: this
checks behaviour, not speed."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import torch

from fastconv import registry
from fastconv.bench import cli, runner
from fastconv.bench.runner import Config

FAST = ["--rounds", "1", "--min-time", "0.001", "--no-progress"]
SHAPES = ["--shape", "2,8,9,9,8,3,3", "--shape", "1,6,8,8,6,3,3,2,1,6"]


def _run(capsys, *args):
    assert cli.main(list(args)) == 0
    return capsys.readouterr().out


def test_default_strategies_are_every_registered_algorithm():
    names = runner.default_strategies()
    assert names[0] == "torch" and names[-2:] == ["auto", "autotune"]
    assert names[1:-2] == [a.name for a in registry.ALGORITHMS]
    assert "naive" in names
    assert set(runner.strategies()) >= set(names) | set(registry.FAMILIES)


@pytest.mark.parametrize("text, layer, batch", [
    ("2,8,9,9,8,3,3", dict(C=8, H=9, K=8, R=3, stride=1, padding=1, groups=1), 2),
    ("1,6,8,8,6,3,3,2,0,6", dict(C=6, H=8, K=6, R=3, stride=2, padding=0, groups=6), 1),
    ("4,3,32,32,16,7,7,2", dict(C=3, H=32, K=16, R=7, stride=2, padding=3, groups=1), 4),
])
def test_parse_shape(text, layer, batch):
    shape = runner.parse_shape(text)
    assert shape.batch == batch
    for k, v in layer.items():
        assert getattr(shape.layer, k) == v


@pytest.mark.parametrize("text, message", [
    ("1,2,3", "got 3"), ("a,b,c,d,e,f,g", "integers"), ("1,4,8,9,4,3,3", "square"),
    ("1,6,8,8,4,3,3,1,1,4", "divide"), ("0,4,8,8,4,3,3", "positive"),
    ("1,4,2,2,4,7,7,1,0", "larger"),
])
def test_parse_shape_errors(text, message):
    with pytest.raises(ValueError, match=message.split("|")[-1]):
        runner.parse_shape(text)


def test_table_json_csv_plot_and_compare(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    js, cs, png = tmp_path / "r.json", tmp_path / "r.csv", tmp_path / "r.png"
    out = _run(capsys, *SHAPES, *FAST, "--algos", "direct,im2col,depthwise,naive,winograd,auto,"
               "autotune", "--phases", "--json", str(js), "--csv", str(cs), "--plot", str(png))
    assert "peak" in out and "GFLOP/s" in out and "vs torch" in out
    assert "cannot run it" in out            # depthwise on the dense layer, Winograd on s2
    data = json.loads(js.read_text())
    assert data["format"] == "fastconv-bench" and data["meta"]["peak_gflops"] > 0
    rows = data["results"]
    assert {r["strategy"] for r in rows} == {"torch", "direct", "im2col", "depthwise", "naive",
                                             "winograd", "auto", "autotune"}
    for r in rows:
        assert r["ms"] > 0 and r["gflops"] > 0 and r["max_rel_err"] < 1e-4, r
        assert (r["speedup"] is not None) and r["runs"]
    assert any(r["phases"] for r in rows if r["runs"].startswith("winograd"))
    assert {s["strategy"] for s in data["skipped"]} >= {"depthwise", "winograd"}
    with open(cs) as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert png.stat().st_size > 10_000
    out = _run(capsys, *SHAPES, *FAST, "--algos", "direct", "--compare", str(js))
    assert "geometric mean" in out and out.count(" -> ") == 4   # torch and direct, 2 layers


@pytest.mark.parametrize("pass_", ["fwd", "bwd", "fwdbwd"])
@pytest.mark.parametrize("layout, dtype", [("nchw", "float32"), ("nhwc", "float64")])
def test_passes_layouts_dtypes(tmp_path, capsys, pass_, layout, dtype):
    js = tmp_path / "r.json"
    _run(capsys, *SHAPES, *FAST, "--algos", "direct,naive,auto", "--pass", pass_, "--layout",
         layout, "--dtype", dtype, "--json", str(js))
    rows = json.loads(js.read_text())["results"]
    assert len(rows) == 8
    bound = 1e-12 if dtype == "float64" else 1e-5
    for r in rows:
        assert r["pass_"] == pass_ and r["layout"] == layout and r["dtype"] == dtype
        assert r["max_rel_err"] < bound, r


def test_first_layer_computes_no_input_gradient():
    layer = runner.parse_shape("1,3,16,16,8,3,3,2").layer
    run = runner.run_layer(layer, ["torch", "direct"], Config(pass_="bwd", rounds=1,
                                                              min_time=0.001))
    # grad-weight only (no grad-input) is counted: one pass's FLOPs.
    assert all(r.flops == layer.flops(1) for r in run.results)


@pytest.mark.parametrize("args, message", [
    (["--algos", "direct,fast"], "unknown fast"),
    (["--shape", "1,2,3"], "got 3 values"),
    (["--batch", "0"], "positive"),
    (["--threads", "0"], "positive"),
    (["--compare", "/nonexistent.json"], "cannot read"),
    (["--weight-cache", "--pass", "bwd"], "--pass fwd"),
    (["--model", "resnet50", "--plot", "x.png"], "does not take --plot"),
    (["--model", "resnet50", "--pass", "bwd"], "does not take --pass"),
])
def test_bad_arguments_exit_with_a_message(capsys, args, message):
    with pytest.raises(SystemExit) as e:
        cli.main(args + FAST)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_compare_refuses_other_files(tmp_path, capsys):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"format": "something"}))
    with pytest.raises(SystemExit):
        cli.main(["--compare", str(path)] + FAST)
    assert "not a fastconv-bench" in capsys.readouterr().err


def test_help_explains_every_option():
    out = subprocess.run([sys.executable, "-m", "fastconv.bench", "--help"], check=True,
                         capture_output=True, text=True, timeout=120).stdout
    for option in ("--suite", "--shape", "--model", "--algos", "--pass", "--batch", "--threads",
                   "--dtype", "--layout", "--json", "--csv", "--plot", "--compare", "--phases",
                   "--rounds", "--isa"):
        assert option in out
    for name in runner.strategies():
        assert f"  {name} " in out


def test_whole_model_runner():
    from fastconv.bench.wholemodel import run_model
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8),
        torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(8, 1000))
    results = run_model("tiny", model, batch=2, rounds=1, min_time=0.001, resolution=16)
    assert [r.mode for r in results] == ["eval forward", "train step"]
    for r in results:
        assert r.torch_ms > 0 and r.fastconv_ms > 0 and r.speedup > 0
        assert r.max_abs_diff < 1e-4


def test_weight_cache_forward(tmp_path, capsys):
    js = tmp_path / "r.json"
    out = _run(capsys, *SHAPES, *FAST, "--algos", "direct,winograd_f2,auto,autotune",
               "--weight-cache", "--json", str(js))
    assert "weight cache" in out
    data = json.loads(js.read_text())
    assert data["meta"]["weight_cache"] is True
    assert all(r["max_rel_err"] < 1e-4 for r in data["results"])


def test_auto_is_the_heuristic_even_under_fastconv_autotune():
    from fastconv import autotune
    layer = runner.parse_shape("2,16,12,12,16,3,3").layer
    autotune.clear()     # winners of earlier tests' autotune runs
    autotune.enable()
    try:
        run = runner.run_layer(layer, ["torch", "auto"], Config(rounds=1, min_time=0.001))
        assert autotune.entries() == [] and autotune.is_enabled()
    finally:
        autotune.disable()
        autotune.clear()
    assert run.results[1].runs == fastconv_choice(layer)


def fastconv_choice(layer):
    import fastconv
    return fastconv.explain(layer.input_shape(1), layer.weight_shape(),
                            **layer.conv_args()).choice
