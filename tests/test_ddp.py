"""fastconv layers under DistributedDataParallel: two local processes (gloo, CPU) training a
small converted CNN on their own halves of each batch get the gradients and weights of one
process training the plain torch model on the whole batch.

BatchNorm normalises with each process's own batch statistics under DDP (torch's
SyncBatchNorm runs on GPUs only), so the reference runs each half of the batch through the
model separately; the loss is the mean over the whole batch, as DDP's averaged gradient is.
Float64, so that the tolerances are tight."""
from __future__ import annotations

import multiprocessing
import os
import socket
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import fastconv
from conftest import assert_close, conv_calls

pytestmark = pytest.mark.skipif(not dist.is_available(),
                                reason="torch.distributed is not available")

WORLD, SHARD, STEPS, LR = 2, 4, 3, 0.1
JOIN_TIMEOUT_S = 90  # a worker stuck in a collective is killed, never waited on for ever


def _model() -> nn.Module:
    """The same initial weights in every process: seeded."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.ReLU(),   # grouped, with bias
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU(),  # depthwise
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    ).double()


def _data():
    """Every step's whole batch (inputs, labels); rank r trains on rows r*SHARD:(r+1)*SHARD."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, WORLD * SHARD, 3, 12, 12, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (STEPS, WORLD * SHARD), generator=g)
    return x, y


def _shard(rank: int) -> slice:
    return slice(rank * SHARD, (rank + 1) * SHARD)


def _worker(rank: int, port: int, out_dir: str) -> None:
    """One DDP process: trains, then saves its first-step gradients and final weights (or its
    traceback) to out_dir/rank<rank>.pt."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    torch.set_num_threads(1)  # two processes on a shared machine
    try:
        dist.init_process_group("gloo", rank=rank, world_size=WORLD,
                                timeout=timedelta(seconds=60))
        try:
            # Convert first, then wrap: DDP registers the (shared) parameters it sees.
            model = fastconv.convert(_model())
            ddp = nn.parallel.DistributedDataParallel(model)
            opt = torch.optim.SGD(ddp.parameters(), lr=LR)
            x, y = _data()
            for step in range(STEPS):
                opt.zero_grad()
                F.cross_entropy(ddp(x[step, _shard(rank)]), y[step, _shard(rank)]).backward()
                if step == 0:
                    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
                opt.step()
            result = dict(grads=grads, weights={n: p.detach().clone()
                                                for n, p in model.named_parameters()},
                          fastconv_layers=sum(isinstance(m, fastconv.nn.Conv2d)
                                              for m in model.modules()))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported by the parent
        result = dict(error=traceback.format_exc())
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_workers(out_dir: Path) -> list:
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(rank, port, str(out_dir)), daemon=True)
             for rank in range(WORLD)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(JOIN_TIMEOUT_S)
        hung = [rank for rank, p in enumerate(procs) if p.is_alive()]
        assert not hung, f"ranks {hung} still running after {JOIN_TIMEOUT_S} s"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    results = []
    for rank, p in enumerate(procs):
        path = out_dir / f"rank{rank}.pt"
        assert path.exists(), f"rank {rank} exited with code {p.exitcode} and no result"
        result = torch.load(path)
        assert "error" not in result, f"rank {rank} failed:\n{result['error']}"
        results.append(result)
    return results


def _reference():
    """Plain torch, one process, the whole batch: first-step gradients and final weights."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    x, y = _data()
    for step in range(STEPS):
        opt.zero_grad()
        out = torch.cat([model(x[step, _shard(r)]) for r in range(WORLD)])  # BN per shard
        F.cross_entropy(out, y[step]).backward()
        if step == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
    return grads, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_fastconv_kernels_run_every_layer_in_float64():
    # Otherwise "auto" would fall back to torch's convolution and the DDP test check nothing.
    calls = conv_calls(_model(), _data()[0][0, _shard(0)])
    assert len(calls) == 4
    for input_shape, weight_shape, kwargs, dtype in calls:
        assert fastconv.explain(input_shape, weight_shape, dtype=dtype, **kwargs).choice


def test_ddp_training_matches_single_process_torch(tmp_path):
    results = _run_workers(tmp_path)
    grads, weights = _reference()
    tol = dict(atol=1e-10, rtol=1e-8)
    for rank, result in enumerate(results):
        assert result["fastconv_layers"] == 4
        assert result["grads"].keys() == grads.keys()
        for name, expected in grads.items():
            assert_close(result["grads"][name], expected, **tol,
                         what=f"rank {rank} step-1 gradient of {name}")
        for name, expected in weights.items():
            assert_close(result["weights"][name], expected, **tol,
                         what=f"rank {rank} weight {name} after {STEPS} steps")
    # DDP keeps the replicas identical: the same averaged gradient and the same update.
    for name in weights:
        assert torch.equal(results[0]["weights"][name], results[1]["weights"][name]), name
