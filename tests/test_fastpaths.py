"""Fast paths give the exact model's outputs and gradients (never timed here).

Closed-form WS backward, SAME padding without a pad where symmetric, ``fuse()`` and
``optimize_for_inference``, stochastic depth on the kept samples only, channels-last, bf16
autocast and ``torch.compile``; plus the benchmark scripts' command lines.
"""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import nfnets
from nfnets.layers import (
    Conv2dSame,
    WSConv2d,
    conv2d_same,
    same_padding,
)

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(widths=(32, 64, 96, 96), depths=(1, 2, 2, 1), group_width=16,
            stochdepth_rate=0.0, drop_rate=0.0)
MICRO = dict(widths=(16, 32), depths=(1, 1), group_width=8, stochdepth_rate=0.0,
             drop_rate=0.0)  # for torch.compile, whose compile time grows with the graph


def plain_standardized_weight(conv: WSConv2d) -> torch.Tensor:
    """The official WS formula written with plain autograd ops (the reference gradient)."""
    w = conv.weight
    var, mean = torch.var_mean(w, dim=(1, 2, 3), unbiased=False, keepdim=True)
    scale = torch.rsqrt(torch.clamp(var * conv.fan_in, min=conv.eps))
    return (w - mean) * scale * (conv.gain * conv.input_scale).view(-1, 1, 1, 1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def tiny(seed: int = 0, config: dict = TINY) -> nfnets.models.NFModel:
    torch.manual_seed(seed)
    model = nfnets.create_model("nfnet_f0", num_classes=5, **config)
    with torch.no_grad():  # non-trivial gains and skip gains so every path matters
        for name, p in model.named_parameters():
            if name.endswith("gain"):
                p.uniform_(0.5, 1.5)
    return model


# ----------------------------------------------------------------------------- WS backward


@pytest.mark.parametrize("shape,groups,input_scale", [
    ((6, 4, 3, 3), 1, 1.0), ((8, 2, 3, 3), 2, 1.7), ((5, 7, 1, 1), 1, 0.3)])
def test_ws_closed_form_gradients_equal_autograd(shape, groups, input_scale):
    torch.manual_seed(0)
    conv = WSConv2d(shape[1] * groups, shape[0], shape[2], groups=groups,
                    input_scale=input_scale).double()
    with torch.no_grad():
        conv.gain.uniform_(0.5, 1.5)
        conv.weight[0] = 0.3 + 1e-5 * torch.randn(shape[1:])  # N·var < eps: the floor is active
    upstream = torch.randn(shape, dtype=torch.float64)
    expected = torch.autograd.grad((plain_standardized_weight(conv) * upstream).sum(),
                                   (conv.weight, conv.gain))
    out = conv.standardized_weight()
    torch.testing.assert_close(out, plain_standardized_weight(conv), rtol=1e-12, atol=1e-12)
    actual = torch.autograd.grad((out * upstream).sum(), (conv.weight, conv.gain))
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def test_ws_gradcheck_and_partial_requires_grad():
    torch.manual_seed(0)
    conv = WSConv2d(3, 4, 3, input_scale=1.3).double()
    torch.autograd.gradcheck(lambda w, g: _apply(conv, w, g), (conv.weight, conv.gain))
    conv.gain.requires_grad_(False)
    conv.standardized_weight().pow(2).sum().backward()
    assert conv.gain.grad is None and conv.weight.grad.abs().sum() > 0


def _apply(conv: WSConv2d, weight: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    from nfnets.layers import _StandardizeWeight

    return _StandardizeWeight.apply(weight, gain, conv.input_scale, conv.eps)[0]


def test_ws_second_derivative_is_refused_not_wrong():
    conv = WSConv2d(2, 3, 3)
    (g,) = torch.autograd.grad(conv.standardized_weight().pow(3).sum(), conv.weight,
                               create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|differentiate"):
        g.sum().backward()


def test_model_outputs_and_gradients_equal_plain_autograd_ws(monkeypatch):
    model = tiny().double().train()
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    model(x).pow(2).sum().backward()
    monkeypatch.setattr(WSConv2d, "standardized_weight", plain_standardized_weight)
    reference(x).pow(2).sum().backward()
    expected = grads(reference)
    actual = grads(model)
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-9, atol=1e-12,
                                   msg=name)


# ----------------------------------------------------------------------------- SAME padding


@pytest.mark.parametrize("size", [8, 9])
@pytest.mark.parametrize("kernel,stride", [(3, 1), (3, 2), (1, 1), (1, 2)])
def test_same_conv_without_pad_copy_matches_explicit_pad(size, kernel, stride):
    torch.manual_seed(0)
    x = torch.randn(2, 4, size, size, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 2, kernel, kernel, dtype=torch.float64, requires_grad=True)
    top, bottom = same_padding(size, kernel, stride)
    expected = F.conv2d(F.pad(x, (top, bottom, top, bottom)), w, None, stride, 0, 1, 2)
    actual = conv2d_same(x, w, None, (stride, stride), 2)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    upstream = torch.randn_like(expected)
    for a, e in zip(torch.autograd.grad(actual, (x, w), upstream),
                    torch.autograd.grad(expected, (x, w), upstream), strict=True):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- inference


@pytest.mark.parametrize("size", [31, 32])
def test_fuse_within_1e4_of_the_exact_model(size):
    model = tiny().eval()
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        exact = model(x)
        fused = copy.deepcopy(model).fuse()
        fused_out = fused(x)
    assert rel_err(fused_out, exact) < 1e-4
    assert not any(isinstance(m, WSConv2d) for m in fused.modules())
    assert sum(isinstance(m, Conv2dSame) for m in fused.modules()) == sum(
        isinstance(m, WSConv2d) for m in model.modules())


def test_optimize_for_inference_without_compile_is_a_fused_copy():
    model = tiny().train()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    fast = nfnets.optimize_for_inference(model, x, compile=False)
    assert model.training and all(p.requires_grad for p in model.parameters())  # untouched
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not fast.training and not any(isinstance(m, WSConv2d) for m in fast.modules())
    out = fast(x)
    assert not out.requires_grad  # no autograd graph is recorded
    with torch.no_grad():
        assert rel_err(out, model.eval()(x)) < 1e-4


def test_optimize_for_inference_refuses_what_it_cannot_fuse_or_reach():
    with pytest.raises(TypeError, match="nfnets model"):
        nfnets.optimize_for_inference(torch.nn.Linear(2, 2), torch.randn(1, 2))
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="example_input"):
            nfnets.optimize_for_inference(tiny(), torch.randn(1, 3, 8, 8, device="cuda"))


@pytest.mark.slow
def test_optimize_for_inference_compiles_with_the_same_outputs():
    model = tiny(config=MICRO).eval()
    x = torch.randn(2, 3, 17, 17)
    fast = nfnets.optimize_for_inference(model, x)
    with torch.no_grad():
        exact = model(x)
        other = torch.randn(3, 3, 17, 17)  # another batch size still works
        assert rel_err(fast(other), model(other)) < 1e-4
    assert rel_err(fast(x), exact) < 1e-4
    assert not any(isinstance(m, WSConv2d) for m in fast.module.modules())
    if torch.backends.mkldnn.is_available():
        # Frozen for real: the weights became graph constants that Inductor pre-packed for
        # oneDNN, so no convolution takes its weight as an input any more. (Passing
        # options={"freezing": True} to torch.compile alone froze nothing.)
        with torch.profiler.profile() as prof:
            fast(other)
        ops = {event.key for event in prof.key_averages()}
        assert "mkldnn::_convolution_pointwise" in ops
        assert "aten::convolution" not in ops


# ----------------------------------------------------------------------------- training


def run_step(model: torch.nn.Module, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    torch.manual_seed(seed)  # the same stochastic-depth draws on both paths
    out = model(x)
    out.pow(2).sum().backward()
    return out.detach(), grads(model)


def test_stochastic_depth_on_kept_samples_only_is_exact(monkeypatch):
    import nfnets.models.common as common

    model = tiny(config=dict(TINY, stochdepth_rate=0.6)).train()
    with torch.no_grad():
        for block in model.blocks:
            block.skip_gain.fill_(0.5)
    x = torch.randn(6, 3, 32, 32)
    taken = []
    real = common._kept_samples

    def counting(mask, x):
        kept = real(mask, x)
        taken.append(kept is not None and 0 < kept.numel() < x.shape[0])
        return kept

    monkeypatch.setattr(common, "_kept_samples", counting)
    out, g = run_step(model, x, seed=3)
    assert any(taken)  # some blocks ran their branch on a subset of the batch
    monkeypatch.setattr(common, "_kept_samples", lambda mask, x: None)  # whole batch × mask
    out_full, g_full = run_step(model, x, seed=3)
    assert rel_err(out, out_full) < 1e-5
    assert g.keys() == g_full.keys()
    for name in g_full:
        assert rel_err(g[name], g_full[name]) < 1e-5, name


def test_stochastic_depth_dropping_every_sample_still_gives_every_gradient():
    model = tiny(config=dict(TINY, stochdepth_rate=0.999)).train()
    run_step(model, torch.randn(2, 3, 32, 32), seed=0)  # DDP needs a grad for every param
    assert all(p.grad is not None for p in model.parameters())


def test_stochastic_depth_subset_under_bf16_autocast():
    model = tiny(config=dict(TINY, stochdepth_rate=0.6)).train()
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(6, 3, 32, 32))
    out.float().pow(2).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_channels_last_same_outputs_and_gradients():
    model = tiny().train()
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    out_cl = cl(x.contiguous(memory_format=torch.channels_last))
    assert rel_err(out_cl, out) < 1e-4
    out.pow(2).sum().backward()
    out_cl.pow(2).sum().backward()
    expected, actual = grads(model), grads(cl)
    for name in expected:
        assert rel_err(actual[name], expected[name]) < 1e-4, name


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_runs_and_stays_close_to_fp32(device):
    model = tiny().to(device)
    x = torch.randn(4, 3, 32, 32, device=device)
    model.eval()
    with torch.no_grad():
        exact = model(x)
        with torch.autocast(device, dtype=torch.bfloat16):
            low = model(x)
    assert low.dtype == torch.bfloat16
    # bf16 keeps 8 mantissa bits (relative rounding 2^-9 per op); a few % after ~20 layers
    assert rel_err(low.float(), exact) < 5e-2

    model.train()
    with torch.autocast(device, dtype=torch.bfloat16):
        logits = model(x)
    F.cross_entropy(logits.float(), torch.arange(4, device=device) % 5).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name


# ----------------------------------------------------------------------------- compile


@pytest.mark.slow
def test_torch_compile_training_same_outputs_and_gradients():
    model = tiny(config=MICRO).train()
    # dynamic=False: the model's forward was compiled before in this process (other tests) at
    # other sizes, after which Dynamo would trace symbolic shapes, whose index arithmetic on
    # these 2x2-4x4 maps takes Inductor minutes to simplify.
    compiled = torch.compile(copy.deepcopy(model), dynamic=False)
    x = torch.randn(2, 3, 16, 16)
    eager_out, compiled_out = model(x), compiled(x)
    assert rel_err(compiled_out, eager_out) < 1e-4
    eager_out.pow(2).sum().backward()
    compiled_out.pow(2).sum().backward()
    expected = grads(model)
    actual = {n.removeprefix("_orig_mod."): g for n, g in grads(compiled).items()}
    assert actual.keys() == expected.keys()
    for name in expected:
        assert rel_err(actual[name], expected[name]) < 1e-4, name


@pytest.mark.slow
def test_torch_compile_inference_of_the_fused_model():
    model = tiny(config=MICRO).eval()
    compiled = torch.compile(copy.deepcopy(model).fuse(), dynamic=False)
    x = torch.randn(2, 3, 17, 17)  # odd: symmetric SAME paddings only
    with torch.no_grad():
        assert rel_err(compiled(x), model(x)) < 1e-4


# ----------------------------------------------------------------------------- benchmarks


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          check=False)


def test_gpu_benchmark_parses_args_and_needs_cuda():
    done = run_script("benchmarks/gpu.py", "--help")
    assert done.returncode == 0 and "--train-cases" in done.stdout
    if not torch.cuda.is_available():
        done = run_script("benchmarks/gpu.py", "--sections", "train")
        assert done.returncode != 0 and "needs a CUDA GPU" in done.stderr


@pytest.mark.slow
def test_cpu_benchmark_writes_json_and_doc_block(tmp_path):
    doc = tmp_path / "performance.md"
    doc.write_text("# Performance\n\nprose\n\n<!-- bench:cpu:begin -->\nold\n"
                   "<!-- bench:cpu:end -->\n\nmore prose\n")
    out = tmp_path / "cpu.json"
    done = run_script("benchmarks/bench_models.py", "--sections", "train,memory",
                      "--train-cases", "ours:fp32,timm:fp32", "--train-batch", "1",
                      "--train-size", "32", "--warmup", "0", "--reps", "1",
                      "--matmul-size", "64", "--out", str(out), "--doc", str(doc))
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    train = report["results"]["train"]
    assert set(train) == {"ours:fp32", "timm:fp32", "matmul:fp32"}
    assert train["ours:fp32"]["images_per_s"] > 0 and "median_agc_s" in train["ours:fp32"]
    for side in ("ours", "timm"):  # every step allocates at least the weight gradients
        assert report["results"]["memory"][side]["step_bytes"] > 4 * 60e6
    text = doc.read_text()
    assert "old" not in text and "prose" in text and "more prose" in text
    assert "| ours:fp32 |" in text and text.count("<!-- bench:cpu:begin -->") == 1


@pytest.mark.parametrize("script,flag", [("benchmarks/bench_models.py", "--eval-cases"),
                                         ("benchmarks/bench_train_vs_commit.py", "--baseline"),
                                         ("benchmarks/bench_agc.py", "--agc-repeats")])
def test_benchmark_scripts_parse_their_arguments(script, flag):
    pytest.importorskip("timm")
    done = run_script(script, "--help")
    assert done.returncode == 0 and flag in done.stdout, done.stderr[-2000:]


# ----------------------------------------------------------------------------- elementwise


def test_same_padding_keeps_gradients_with_autograd():
    from nfnets.layers import pad_same

    y = torch.randn(1, 2, 4, 4, requires_grad=True)  # with autograd it is F.pad itself
    padded = pad_same(y, (3, 3), (2, 2))
    assert padded.shape[-2:] == (5, 5)
    padded.sum().backward()
    torch.testing.assert_close(y.grad, torch.ones_like(y))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("size", [(6, 8), (7, 8), (1, 1)])
def test_average_pool_divides_by_the_valid_pixels_with_gradients(dtype, size):
    from reference import avg_pool  # Haiku's SAME average pool, padded and counted literally

    from nfnets.layers import avg_pool_same

    x = torch.randn(2, 3, *size, dtype=dtype, requires_grad=True)
    expected = avg_pool(x)
    out = avg_pool_same(x)
    assert out.is_contiguous() and out.dtype == dtype
    torch.testing.assert_close(out, expected, rtol=1e-6 if dtype != torch.bfloat16 else 1e-2,
                               atol=1e-7)
    g = torch.randn_like(expected)
    (grad,) = torch.autograd.grad(out, x, g)
    (expected_grad,) = torch.autograd.grad(expected, x, g)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-6 if dtype != torch.bfloat16
                               else 1e-2, atol=1e-7)
