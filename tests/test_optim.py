"""Tests for nfnets.optim: the official parameter groups, SGD + AGC order, schedule and EMA."""

import copy
import gc
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from nfnets.agc import AGC, adaptive_clip_grad_
from nfnets.optim import (
    EMA,
    optimizer_step,
    param_groups,
    peak_lr,
    sgd_agc,
    warmup_cosine,
    warmup_cosine_lr,
)

# --- a tiny model with the parameter names and roles of our NFNets ----------------------------


class WSConv(nn.Conv2d):
    """Stand-in for nfnets.layers.WSConv2d: weight (O, I, kh, kw), gain (O,), bias (O,)."""

    def __init__(self, cin, cout, k):
        super().__init__(cin, cout, k, padding=k // 2)
        self.gain = nn.Parameter(torch.ones(cout))

    def forward(self, x):
        return super().forward(x) * self.gain.view(-1, 1, 1)


class SE(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc0 = nn.Linear(c, c // 2)
        self.fc1 = nn.Linear(c // 2, c)

    def forward(self, x):
        s = self.fc1(torch.relu(self.fc0(x.mean((2, 3)))))
        return x * 2 * torch.sigmoid(s)[:, :, None, None]


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = WSConv(c, c, 3)
        self.se = SE(c)
        self.skip_gain = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return x + self.skip_gain * self.se(torch.tanh(self.conv(x)))


class TinyNFNet(nn.Module):
    def __init__(self, c=4, num_classes=3):
        super().__init__()
        self.stem = WSConv(3, c, 3)
        self.body = nn.Sequential(Block(c), Block(c))
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.fc(self.body(torch.tanh(self.stem(x))).mean((2, 3)))

    def get_classifier(self):
        return self.fc


def tiny_model(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    model = TinyNFNet().to(dtype)
    with torch.no_grad():  # non-zero skip gains so that every parameter gets a gradient
        for block in model.body:
            block.skip_gain.fill_(0.5)
    return model


def batch(seed, n=8, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 6, 6, generator=gen, dtype=dtype), torch.randint(
        0, 3, (n,), generator=gen
    )


def group_names(model, groups):
    names = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: sorted(names[id(p)] for p in g["params"]) for g in groups}


# --- param_groups ------------------------------------------------------------------------------


def test_param_groups_official_split():
    model = tiny_model()
    groups = param_groups(model)
    by_name = group_names(model, groups)
    block = ["conv.weight", "se.fc0.weight", "se.fc1.weight"]
    assert by_name["decay"] == sorted(
        ["stem.weight"] + [f"body.{i}.{n}" for i in (0, 1) for n in block]
    )
    no_decay = ["conv.bias", "conv.gain", "se.fc0.bias", "se.fc1.bias", "skip_gain"]
    assert by_name["no_decay"] == sorted(
        ["stem.bias", "stem.gain", "fc.bias"] + [f"body.{i}.{n}" for i in (0, 1) for n in no_decay]
    )
    assert by_name["decay_unclipped"] == ["fc.weight"]  # the classifier weight only
    assert [g["name"] for g in groups] == ["decay", "no_decay", "decay_unclipped"]
    settings = {g["name"]: (g["weight_decay"], g["clipping"]) for g in groups}
    assert settings == {
        "decay": (2e-5, 0.01),
        "no_decay": (0.0, 0.01),
        "decay_unclipped": (2e-5, None),
    }
    all_params = [p for g in groups for p in g["params"]]
    assert len(all_params) == len({id(p) for p in all_params}) == len(list(model.parameters()))
    # A compiled model is unwrapped: its classifier is still found.
    assert group_names(model, param_groups(torch.compile(model))) == by_name


@pytest.mark.parametrize(
    "exclude",
    [
        lambda m: ["stem"],
        lambda m: [m.stem],
        lambda m: [m.stem.weight, "stem.gain", m.stem.bias],
        lambda m: "stem",
    ],
)
def test_param_groups_exclude_from_clipping(exclude):
    model = tiny_model()
    groups = param_groups(
        model, weight_decay=1e-4, clipping=0.02, exclude_from_clipping=exclude(model)
    )
    by_name = group_names(model, groups)
    assert by_name["decay_unclipped"] == ["fc.weight", "stem.weight"]
    assert by_name["no_decay_unclipped"] == ["stem.bias", "stem.gain"]
    assert "stem.weight" not in by_name["decay"] and "fc.bias" in by_name["no_decay"]
    assert {g["name"]: g["weight_decay"] for g in groups}["no_decay_unclipped"] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_param_groups_any_module():
    # No get_classifier: nothing is exempt by default; norm-layer scales get no decay; frozen
    # parameters are left out and a shared parameter appears once.
    lin = nn.Linear(4, 4)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), lin, lin)
    model[0].bias.requires_grad_(False)
    by_name = group_names(model, param_groups(model))
    assert by_name == {
        "decay": ["0.weight", "3.weight"],
        "no_decay": ["1.bias", "1.weight", "3.bias"],
    }
    unclipped = group_names(model, param_groups(model, clipping=None))
    assert set(unclipped) == {"decay_unclipped", "no_decay_unclipped"}


def test_param_groups_bad_input():
    model = tiny_model()
    with pytest.raises(ValueError, match="'stemm' is neither a module nor a parameter name"):
        param_groups(model, exclude_from_clipping=["stemm"])
    with pytest.raises(ValueError, match="Linear given is not a module of the model"):
        param_groups(model, exclude_from_clipping=[nn.Linear(2, 2)])
    with pytest.raises(ValueError, match=r"tensor of shape \(3,\) is not a parameter"):
        param_groups(model, exclude_from_clipping=[torch.zeros(3)])
    with pytest.raises(ValueError, match="takes module names, modules or parameters, got int"):
        param_groups(model, exclude_from_clipping=[3])
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        param_groups(model, weight_decay=-1.0)
    with pytest.raises(ValueError, match="clipping must be a positive number or None"):
        param_groups(model, clipping=0.0)


# --- the optimiser update order (nfnets/optim.py: SGD_AGC) ---------------------------------


def reference_training(model, steps, peak, warmup, wd, clipping, momentum=0.9):
    """Hand-written official update: g = AGC(g); g += wd * p; buf = m * buf + g;
    p -= lr * (g + m * buf). AGC itself is checked against the official formula in
    test_agc.py; the classifier weight is not clipped and gains/biases get no decay."""
    no_decay = {n for n, _ in model.named_parameters() if "gain" in n or "bias" in n}
    bufs = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for step in range(steps):
        lr = warmup_cosine(step, peak, warmup, steps)
        model.zero_grad()
        x, y = batch(step)
        nn.functional.cross_entropy(model(x), y).backward()
        clipped = [p for n, p in model.named_parameters() if n != "fc.weight"]
        adaptive_clip_grad_(clipped, clipping)
        with torch.no_grad():
            for n, p in model.named_parameters():
                g = p.grad + (0.0 if n in no_decay else wd) * p
                bufs[n] = momentum * bufs[n] + g
                p -= lr * (g + momentum * bufs[n])


def test_sgd_agc_matches_official_update_order():
    steps, peak, warmup, wd, clipping = 6, 0.5, 2.5, 0.05, 0.01
    model, ref = tiny_model(), tiny_model()
    opt = sgd_agc(model, lr=peak, weight_decay=wd, clipping=clipping)
    sched = warmup_cosine_lr(opt, warmup, steps)
    clip_counts = []
    initial = copy.deepcopy(model.state_dict())
    for step in range(steps):
        opt.zero_grad()
        x, y = batch(step)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
        clip_counts.append(int(opt.last_stats.clipped))
        if step == 0:  # lr(0) = 0: the first update only fills the momentum buffers
            for n, p in model.state_dict().items():
                assert torch.equal(p, initial[n]), n
    reference_training(ref, steps, peak, warmup, wd, clipping)
    assert min(clip_counts) > 0
    for (n, a), b in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=n)


def test_sgd_agc_settings():
    opt = sgd_agc(tiny_model(), lr=1.6)
    assert isinstance(opt, AGC) and isinstance(opt.optimizer, torch.optim.SGD)
    for g in opt.param_groups:
        assert (g["momentum"], g["nesterov"], g["dampening"], g["lr"]) == (0.9, True, 0, 1.6)
    assert opt.eps == 1e-3


# --- learning rate -------------------------------------------------------------------------------


def test_peak_lr():
    assert peak_lr(4096) == pytest.approx(1.6, rel=1e-15)
    assert peak_lr(256) == pytest.approx(0.1, rel=1e-15)
    assert peak_lr(128, base=0.2) == pytest.approx(0.1, rel=1e-15)
    with pytest.raises(ValueError, match="batch_size must be positive"):
        peak_lr(0)


def test_warmup_cosine_official_f0_schedule():
    # nfnets/experiment_nfnets.py get_config, nfnets/optim.py WarmupCosineDecay:
    # peak 1.6, warm-up 5 epochs = 1563.9 steps, cosine to 0 at 112,602.
    peak, warmup, total = 1.6, 5 * 1281167 / 4096, 1281167 * 360 // 4096
    assert total == 112602 and round(warmup, 1) == 1563.9
    lr = lambda t: warmup_cosine(t, peak, warmup, total)  # noqa: E731
    assert lr(0) == 0.0
    assert lr(1) == peak / warmup
    assert lr(1563) == pytest.approx(peak * 1563 / warmup, rel=1e-15)
    cos_1564 = 0.5 * peak * (1 + math.cos(math.pi * (1564 - warmup) / (total - warmup)))
    assert lr(1564) == pytest.approx(cos_1564, rel=1e-15)
    assert lr((warmup + total) / 2) == pytest.approx(peak / 2, rel=1e-12)
    assert lr(total) == 0.0 and lr(total + 10) == 0.0
    values = [lr(t) for t in range(0, total + 1, 97)]
    peak_at = values.index(max(values))
    rising, falling = values[: peak_at + 1], values[peak_at:]
    assert all(a < b for a, b in zip(rising, rising[1:], strict=False))
    assert all(a >= b for a, b in zip(falling, falling[1:], strict=False))


def test_warmup_cosine_branches_and_edges():
    # t <= W takes the warm-up branch; fractional W; `end`; W = 0; bad arguments.
    assert warmup_cosine(10, 2.0, 10, 20) == 2.0
    assert [warmup_cosine(t, 1.0, 2.5, 10) for t in (0, 1, 2)] == [0.0, 0.4, 0.8]
    expected_3 = 0.5 * (1 + math.cos(math.pi * 0.5 / 7.5))
    assert warmup_cosine(3, 1.0, 2.5, 10) == pytest.approx(expected_3, rel=1e-15)
    assert warmup_cosine(10, 1.0, 2, 10, end=0.1) == pytest.approx(0.1, rel=1e-15)
    assert warmup_cosine(50, 1.0, 2, 10, end=0.1) == 0.1
    assert warmup_cosine(6, 1.0, 2, 10, end=0.2) == pytest.approx(0.6, rel=1e-15)
    assert warmup_cosine(0, 1.0, 0, 10) == 1.0
    with pytest.raises(ValueError, match="step must be >= 0"):
        warmup_cosine(-1, 1.0, 2, 10)
    for w, t in ((-1, 10), (10, 10), (5, 0)):
        with pytest.raises(ValueError, match="need 0 <= warmup_steps < total_steps"):
            warmup_cosine(0, 1.0, w, t)


def test_warmup_cosine_lr_per_iteration_and_resume():
    model = tiny_model()
    opt = sgd_agc(model, lr=0.8)
    sched = warmup_cosine_lr(opt, warmup_steps=3.5, total_steps=12, end_factor=0.05)
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()  # no gradients: a no-op step, so the scheduler sees the right order
        sched.step()
    expected = [warmup_cosine(t, 0.8, 3.5, 12, end=0.04) for t in range(6)]
    assert seen == pytest.approx(expected, rel=1e-14)
    assert seen[0] == 0.0
    # Resume as PyTorch expects: build optimizer and scheduler, then load both states.
    resumed_opt = sgd_agc(tiny_model(), lr=0.8)
    resumed = warmup_cosine_lr(resumed_opt, warmup_steps=3.5, total_steps=12, end_factor=0.05)
    resumed_opt.load_state_dict(opt.state_dict())
    resumed.load_state_dict(sched.state_dict())
    assert resumed_opt.param_groups[2]["lr"] == pytest.approx(
        warmup_cosine(6, 0.8, 3.5, 12, end=0.04), rel=1e-14
    )
    resumed_opt.step()
    resumed.step()
    assert resumed_opt.param_groups[2]["lr"] == pytest.approx(
        warmup_cosine(7, 0.8, 3.5, 12, end=0.04), rel=1e-14
    )
    with pytest.raises(ValueError, match="need 0 <= warmup_steps < total_steps"):
        warmup_cosine_lr(opt, warmup_steps=12, total_steps=12)


# --- EMA ---------------------------------------------------------------------------------------


def test_ema_tf1_warmup_matches_hand_formula():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)).double()
    ema = EMA(model, decay=0.99999)
    expected = [p.detach().clone() for p in model.parameters()]
    decays = []
    gen = torch.Generator().manual_seed(0)
    for t in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
            model[1].running_mean.add_(1.0)
        decays.append(ema.current_decay())
        ema.update(model)
        d = (1 + t) / (10 + t)  # tf1_ema: t = this update's step counter, from 0
        params = model.parameters()
        expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, params, strict=True)]
    assert decays == [(1 + t) / (10 + t) for t in range(5)] and decays[0] == 0.1
    for e, p in zip(ema.module.parameters(), expected, strict=True):
        torch.testing.assert_close(e, p, rtol=1e-14, atol=1e-15)
    assert torch.equal(ema.module[1].running_mean, model[1].running_mean)  # buffers copied
    assert int(ema.module[1].num_batches_tracked) == 0 == int(model[1].num_batches_tracked)
    assert ema.num_updates == 5


def test_ema_decay_cap_and_copy():
    model = tiny_model()
    ema = EMA(model, decay=0.5)
    ema.num_updates = 8
    assert ema.current_decay() == 0.5  # min(0.5, 9/18)
    ema.num_updates = 100
    assert ema.current_decay() == 0.5
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())
    with torch.no_grad():
        model.fc.weight.add_(1.0)
    assert not torch.equal(ema.module.fc.weight, model.fc.weight)  # an independent copy
    ema.module(batch(0)[0])  # usable for evaluation
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\]"):
        EMA(model, decay=1.5)


def test_ema_state_dict_round_trip_and_wrappers():
    model = tiny_model()
    ema = EMA(torch.compile(model))  # unwrapped: the copy is the bare model
    assert type(ema.module) is TinyNFNet
    for _ in range(3):
        with torch.no_grad():
            model.stem.weight.mul_(1.1)
        ema.update(torch.compile(model))
    other = EMA(tiny_model(seed=1))
    other.load_state_dict(copy.deepcopy(ema.state_dict()))
    assert other.num_updates == 3 and other.decay == 0.99999
    for e in (ema, other):
        e.update(model)
    for a, b in zip(ema.module.parameters(), other.module.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="missing keys"):
        other.load_state_dict({"module": {}})
    with pytest.raises(ValueError, match="differ from the one the EMA was created from"):
        ema.update(nn.Linear(2, 2))


# --- mixed precision ---------------------------------------------------------------------------


def test_grad_scaler_skipped_step_is_reported_and_ema_untouched():
    model = tiny_model(dtype=torch.float32)
    opt = sgd_agc(model, lr=0.1)
    ema = EMA(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    x, y = batch(0, dtype=torch.float32)

    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    model.body[0].conv.weight.grad[0, 0, 0, 0] = float("nan")
    before = copy.deepcopy(model.state_dict())
    if optimizer_step(opt, scaler):
        ema.update(model)
    assert ema.num_updates == 0 and opt.last_stats is None
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    opt.zero_grad()
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    assert optimizer_step(opt, scaler)
    ema.update(model)
    assert ema.num_updates == 1 and opt.last_stats.units > 0
    assert not torch.equal(model.stem.weight, before["stem.weight"])
    assert optimizer_step(opt)  # without a scaler


def _one_step(model, autocast=False):
    opt = sgd_agc(model, lr=0.5)
    x, y = batch(1, dtype=next(model.parameters()).dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = nn.functional.cross_entropy(model(x).float(), y)
    loss.backward()
    grad_dtypes = {p.grad.dtype for p in model.parameters()}
    opt.step()
    return opt.last_stats, grad_dtypes


@pytest.mark.parametrize("mode", ["bf16_params", "bf16_autocast"])
def test_bf16_training_step(mode):
    ref = tiny_model(dtype=torch.float32)
    model = copy.deepcopy(ref)
    ref_stats, _ = _one_step(ref)
    if mode == "bf16_params":
        stats, grad_dtypes = _one_step(model.to(torch.bfloat16))
        assert grad_dtypes == {torch.bfloat16}
    else:
        stats, grad_dtypes = _one_step(model, autocast=True)
        assert grad_dtypes == {torch.float32}
    assert stats.units == ref_stats.units
    assert abs(int(stats.clipped) - int(ref_stats.clipped)) <= 2
    for (n, a), b in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a.float(), b, rtol=0.05, atol=2e-3, msg=n)


# --- DistributedDataParallel -------------------------------------------------------------------


def _ddp_worker(rank, world_size, init_file, out_file, steps):
    torch.set_num_threads(1)  # one thread per process, as torchrun does on CPU
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        model = nn.parallel.DistributedDataParallel(tiny_model())
        opt = sgd_agc(model.module, lr=0.3)
        for step in range(steps):
            x, y = batch(step)
            xs, ys = x.chunk(world_size)[rank], y.chunk(world_size)[rank]
            opt.zero_grad()
            nn.functional.cross_entropy(model(xs), ys).backward()
            opt.step()
        if rank == 0:
            torch.save(model.module.state_dict(), out_file)
        dist.barrier()
        del model, opt
        gc.collect()  # free DDP's reducer while its process group still exists
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes import torch: 10-30 s on a busy 2-core machine
def test_ddp_two_processes_match_full_batch(tmp_path):
    # DDP averages the half-batch gradients before AGC sees them, so each rank clips the same
    # global-batch gradient as one process does on the full batch.
    steps = 3
    out_file = tmp_path / "rank0.pt"
    mp.spawn(
        _ddp_worker,
        args=(2, str(tmp_path / "init"), str(out_file), steps),
        nprocs=2,
        join=True,
    )
    model = tiny_model()
    opt = sgd_agc(model, lr=0.3)
    for step in range(steps):
        x, y = batch(step)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert int(opt.last_stats.clipped) > 0
    ddp_state = torch.load(out_file)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(ddp_state[name], value, rtol=1e-12, atol=1e-14, msg=name)
