"""FSDP2 (``fully_shard``) support: exact AGC on sharded gradients, ``nfnets train --fsdp``.

Multi-process parts run 2 gloo ranks on the CPU (FSDP2 runs there), one thread each.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from nfnets.agc import AGC, adaptive_clip_grad_

# Every AGC layout, with dim-0 sizes that do not divide by 2 ranks (ragged and empty shards).
SHAPES = [
    (6, 3, 3, 3),  # conv: rows whole on each rank
    (3, 4, 3, 3),  # conv with 3 output channels over 2 ranks: 2 + 1
    (1, 2, 3, 3),  # one output channel: rank 1 holds an empty shard
    (7, 9),  # Linear
    (3, 4),  # Linear, uneven
    (5, 1),  # Linear with in_features=1: ONE unit (squeeze rule), split across ranks
    (4, 1, 1, 1),  # conv with one weight per output channel: one unit, split
    (1, 8),  # Linear with out_features=1: one unit, whole on rank 0
    (11,),  # gain / bias vector: one unit, split 6 + 5
    (3,),  # vector, uneven
    (1,),  # one element: rank 1 empty
    (),  # scalar (skip_gain): FSDP2 leaves these unsharded
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, world: int, *args) -> None:
    port = _free_port()
    mp.spawn(_worker, args=(world, port, fn, args), nprocs=world, join=True)


def _worker(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def _layouts(seed: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(weight, grad) pairs whose unit gradient/weight ratios straddle λ = 0.01."""
    gen = torch.Generator().manual_seed(seed)
    pairs = []
    for shape in SHAPES:
        w = torch.randn(shape, generator=gen, dtype=torch.float64)
        scale = 10 ** (-4 + 3 * torch.rand(shape[:1], generator=gen, dtype=torch.float64))
        g = torch.randn(shape, generator=gen, dtype=torch.float64)
        g = g * scale.reshape(scale.shape + (1,) * (len(shape) - 1))
        pairs.append((w.to(dtype), g.to(dtype)))
    return pairs


def _sharded(pairs, mesh):
    from torch.distributed.tensor import Shard, distribute_tensor

    params = []
    for w, g in pairs:
        if w.ndim == 0:  # as fully_shard does with ignored (scalar) parameters
            p = nn.Parameter(w.clone())
            p.grad = g.clone()
        else:
            p = nn.Parameter(distribute_tensor(w.clone(), mesh, [Shard(0)]))
            p.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
        params.append(p)
    return params


def _check_agc_sharded(rank: int, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    calls = []
    all_reduce = dist.all_reduce

    def counting_all_reduce(*args, **kwargs):
        calls.append(1)
        return all_reduce(*args, **kwargs)

    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        pairs = _layouts(seed=3, dtype=dtype)
        full = [nn.Parameter(w.clone()) for w, _ in pairs]
        for p, (_, g) in zip(full, pairs, strict=True):
            p.grad = g.clone()
        expected = adaptive_clip_grad_(full, 0.01)

        sharded = _sharded(pairs, mesh)
        dist.all_reduce = counting_all_reduce
        try:
            stats = adaptive_clip_grad_(sharded, 0.01)
        finally:
            dist.all_reduce = all_reduce
        assert len(calls) == 1, f"{len(calls)} all-reduces for one AGC call"
        calls.clear()
        assert int(stats.clipped) == int(expected.clipped) and stats.units == expected.units
        assert 0 < int(expected.clipped) < expected.units  # some units clip, others do not
        for p, q, shape in zip(sharded, full, SHAPES, strict=True):
            got = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            torch.testing.assert_close(got, q.grad, rtol=tol, atol=tol, msg=str(shape))

    # The AGC optimizer wrapper with two clipping factors: still one collective per step.
    pairs = _layouts(seed=4, dtype=torch.float32)
    full = [nn.Parameter(w.clone()) for w, _ in pairs]
    for p, (_, g) in zip(full, pairs, strict=True):
        p.grad = g.clone()
    half = len(full) // 2
    groups = lambda ps: [{"params": ps[:half], "clipping": 0.01},  # noqa: E731
                         {"params": ps[half:], "clipping": 0.003}]
    ref = AGC(torch.optim.SGD(groups(full), lr=0.0), clipping=0.01)
    expected = ref.clip_grad_()
    sharded = _sharded(pairs, mesh)
    opt = AGC(torch.optim.SGD(groups(sharded), lr=0.0), clipping=0.01)
    dist.all_reduce = counting_all_reduce
    try:
        stats = opt.clip_grad_()
    finally:
        dist.all_reduce = all_reduce
    assert len(calls) == 1
    assert int(stats.clipped) == int(expected.clipped)
    for p, q in zip(sharded, full, strict=True):
        got = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        torch.testing.assert_close(got, q.grad, rtol=1e-6, atol=1e-7)




def _check_device_mix(rank: int, world: int) -> None:
    from nfnets.distributed import check_same_device_type
    from nfnets.errors import UsageError

    check_same_device_type(torch.device("cpu"))  # all agree: no error
    # A node without the GPUs the others have: every rank refuses, none hangs.
    with pytest.raises(UsageError, match="different kinds of device"):
        check_same_device_type(torch.device("cpu" if rank == 0 else "meta"))


def _check_discarded_accumulation(rank: int, world: int) -> None:
    # A step abandoned mid-accumulation must not leak its unreduced gradients into the next.
    from nfnets.distributed import discard_unreduced_grads, gradient_sync, shard_model

    torch.manual_seed(0)
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 3))
        models.append(shard_model(model))
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(rank))
    abandoned, clean = models
    with gradient_sync(abandoned, False):
        (abandoned(x * 7).square().sum()).backward()
    discard_unreduced_grads(abandoned)
    for model in (abandoned, clean):
        with gradient_sync(model, True):
            model(x).sum().backward()
    for p, q in zip(abandoned.parameters(), clean.parameters(), strict=True):
        torch.testing.assert_close(p.grad.full_tensor(), q.grad.full_tensor())


def _check_rank_pair(rank: int, world: int) -> None:
    _check_agc_sharded(rank, world)
    _check_device_mix(rank, world)
    _check_discarded_accumulation(rank, world)


@pytest.mark.slow
def test_agc_on_sharded_gradients_equals_agc_on_full_ones():
    # One pair of processes for both checks: starting ranks is most of the cost.
    _spawn(_check_rank_pair, 2)


def test_fsdp_on_one_process_says_what_to_do(capsys):
    from nfnets.cli import main as run

    assert run(["train", "--fsdp", "--out", "unused", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--fsdp shards the model over processes" in err and "--nproc N" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("flags, expected", [
    (["--compile"], "--fsdp with --compile is not supported"),
    (["--precision", "fp16", "--device", "cuda"], "use --precision bf16"),
    (["--device", "cuda:1"], "each process takes the GPU of its LOCAL_RANK"),
])
def test_fsdp_refuses_what_it_cannot_do(monkeypatch, capsys, flags, expected):
    from nfnets.cli import main as run

    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun; refused before any rank waits
    assert run(["train", "--fsdp", "--out", "unused", "--no-progress", *flags]) == 2
    assert expected in capsys.readouterr().err
