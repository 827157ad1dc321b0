"""Quantization formulas against the independent numpy reference (tests/reference.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as ref
from slimq.config.plan import ActQuantSpec, WeightQuantSpec
from slimq.quant import functional as Fq
from slimq.quant.quantizers import ActQuantizer, ShiftBitSearch, WeightQuantizer

BITS = [4, 8, 16]


def _clips(draw_max, draw_min):
    return torch.tensor([draw_max], requires_grad=True), torch.tensor([draw_min], requires_grad=True)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("fp16", [False, True])
def test_ulq_forward_matches_numpy(bits, fp16):
    rng = np.random.default_rng(bits)
    x = (rng.standard_normal(20000) * 3).astype(np.float32)
    for cmax, cmin in [(2.5, -1.25), (6.0, 0.0), (0.7, -4.0), (3.0, 0.5), (-1.0, -2.0)]:
        y = Fq.ulq_fake_quant(torch.from_numpy(x), torch.tensor([cmax]), torch.tensor([cmin]), bits,
                              fp16_scale=fp16)
        np.testing.assert_array_equal(y.numpy(), ref.ulq_forward(x, cmax, cmin, bits, fp16))
        s, o = Fq.ulq_scale_offset(torch.tensor(cmax), torch.tensor(cmin), bits, fp16)
        assert (float(s), int(o)) == ref.ulq_params(cmax, cmin, bits, fp16)


@settings(max_examples=60, deadline=None)
@given(cmax=st.floats(0.05, 50), ratio=st.floats(0.0, 2.0), bits=st.sampled_from(BITS),
       seed=st.integers(0, 2 ** 16))
def test_ulq_forward_property(cmax, ratio, bits, seed):
    x = (np.random.default_rng(seed).standard_normal(512) * cmax).astype(np.float32)
    cmin = -cmax * ratio
    y = Fq.ulq_fake_quant(torch.from_numpy(x), torch.tensor([cmax]), torch.tensor([cmin]), bits)
    np.testing.assert_array_equal(y.numpy(), ref.ulq_forward(x, cmax, cmin, bits))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("fixed_min", [False, True])
@pytest.mark.parametrize("layout", ["flat", "channels_last"])
def test_ulq_backward_matches_numpy(bits, fixed_min, layout):
    """The eager CPU path (the backward re-grids the saved input), ties at the range ends included,
    on a flat and on a channels_last 4-D input."""
    rng = np.random.default_rng(7)
    x = (rng.standard_normal(5000) * 2).astype(np.float32)
    g = rng.standard_normal(5000).astype(np.float32)
    cmax, cmin = 1.7, (0.0 if fixed_min else -0.9)
    s, o = Fq.ulq_scale_offset(torch.tensor(cmax), torch.tensor(cmin), bits)
    qmin, qmax = Fq.qrange(bits)
    x[:4] = (np.array([qmax - o + 0.5, qmax - o + 1.5, qmin - o - 0.5, qmin - o - 1.5]) * float(s)).astype(np.float32)
    xt = torch.from_numpy(x)
    gt = torch.from_numpy(g)
    if layout == "channels_last":  # same logical values, another memory order
        xt = xt.reshape(2, 10, 10, 25).contiguous(memory_format=torch.channels_last)
        gt = gt.reshape(2, 10, 10, 25).contiguous(memory_format=torch.channels_last)
    xt.requires_grad_()
    cm, cn = _clips(cmax, cmin)
    Fq.ulq_fake_quant(xt, cm, cn, bits, fixed_min=fixed_min).backward(gt)
    gx, gmax, gmin = ref.ulq_backward(x, g, cmax, cmin, bits, fixed_min)
    np.testing.assert_array_equal(xt.grad.reshape(-1).numpy(), gx)
    assert cm.grad.item() == pytest.approx(gmax, rel=1e-4, abs=1e-3)
    assert cn.grad.item() == pytest.approx(gmin, rel=1e-4, abs=1e-3)


@pytest.mark.parametrize("shape", [(5000,), (50, 100), (4, 10, 5, 25)])
@pytest.mark.parametrize("bits", BITS)
def test_ulq_code_path_matches_numpy(bits, shape):
    """The path CUDA and torch.compile take: one saved ``code`` tensor instead of ``x`` (its sums
    reduce per dim-1 slice first on 3+ dims)."""
    rng = np.random.default_rng(5)
    x = (rng.standard_normal(5000) * 2).astype(np.float32)
    g = rng.standard_normal(5000).astype(np.float32)
    cmax, cmin = 1.7, -0.9
    s, o = Fq.ulq_scale_offset(torch.tensor(cmax), torch.tensor(cmin), bits)
    qmin, qmax = Fq.qrange(bits)
    x[:4] = (np.array([qmax - o + 0.5, qmax - o + 1.5, qmin - o - 0.5, qmin - o - 1.5]) * float(s)).astype(np.float32)
    y, code = Fq._ulq_code(torch.from_numpy(x).reshape(shape), s, qmin - o, qmax - o)
    np.testing.assert_array_equal(y.reshape(-1).numpy(), ref.ulq_forward(x, cmax, cmin, bits))
    gx_ref, gmax, gmin = ref.ulq_backward(x, g, cmax, cmin, bits)
    n = 2 ** bits - 1
    for need_gx in (True, False):
        gx, err, upper, lower = Fq._ulq_sums_from_code(torch.from_numpy(g).reshape(shape), code, need_gx)
        if need_gx:
            np.testing.assert_array_equal(gx.reshape(-1).numpy(), gx_ref)
        assert float(err / n + upper) == pytest.approx(gmax, rel=1e-4, abs=1e-3)
        assert float(lower - err / n) == pytest.approx(gmin, rel=1e-4, abs=1e-3)


@pytest.mark.parametrize("bits", [4, 8])
def test_ulq_clip_gradients_match_finite_differences(bits):
    """The clip gradients are the exact derivative of the straight-through surrogate."""
    rng = np.random.default_rng(11)
    x = (rng.standard_normal(4000) * 2).astype(np.float32)
    g = rng.standard_normal(4000).astype(np.float32)
    cmax, cmin = 2.2, -1.3
    cm, cn = _clips(cmax, cmin)
    Fq.ulq_fake_quant(torch.from_numpy(x), cm, cn, bits).backward(torch.from_numpy(g))
    s, o = ref.ulq_params(cmax, cmin, bits)
    r = np.round(x / s)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    frozen = {"c": (r - x / s).astype(np.float64), "inside": (r + o >= qmin) & (r + o <= qmax),
              "upper": r + o > qmax}
    x64, g64 = x.astype(np.float64), g.astype(np.float64)
    h = 1e-5
    fd_max = (ref.ulq_ste_surrogate(x64, g64, cmax + h, cmin, bits, frozen)
              - ref.ulq_ste_surrogate(x64, g64, cmax - h, cmin, bits, frozen)) / (2 * h)
    fd_min = (ref.ulq_ste_surrogate(x64, g64, cmax, cmin + h, bits, frozen)
              - ref.ulq_ste_surrogate(x64, g64, cmax, cmin - h, bits, frozen)) / (2 * h)
    assert cm.grad.item() == pytest.approx(fd_max, rel=1e-3, abs=1e-2)
    assert cn.grad.item() == pytest.approx(fd_min, rel=1e-3, abs=1e-2)
    assert abs(fd_max) > 1 and abs(fd_min) > 1  # the check is not trivially zero


@pytest.mark.parametrize("bad", ["input", "gradient"])
def test_ulq_nan_in_training_poisons_the_clip_gradients(bad):
    """The backward does not raise (that would need a host sync): NaN in the input or in the
    gradient shows as non-finite clip gradients, which the quantizer's check reads."""
    x, g = torch.randn(100), torch.randn(100)
    (x if bad == "input" else g)[3] = float("nan")
    x.requires_grad_()
    cm, cn = _clips(1.0, -1.0)
    Fq.ulq_fake_quant(x, cm, cn, 8).backward(g)
    assert not torch.isfinite(cm.grad).all() and not torch.isfinite(cn.grad).all()
    q = ActQuantizer(ActQuantSpec(bits=8, fixed_min=True, clip_max=1.0, clip_min=0.0), layer_name="features.3").train()
    q(torch.randn(50)).sum().backward()
    assert not bool(q.saw_nonfinite())
    xq = torch.randn(50)
    xq[0] = float("inf") if bad == "input" else 0.0
    q.clip_max.grad = None
    q(xq).backward(torch.full((50,), float("nan")) if bad == "gradient" else torch.ones(50))
    assert bool(q.saw_nonfinite())


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("channel_wise", [True, False])
def test_arq_matches_numpy_including_the_128_case(bits, channel_wise):
    rng = np.random.default_rng(3)
    w = rng.standard_normal((6, 5, 3, 3)).astype(np.float32)
    w[0, 0, 0, 0] = -9.0  # channel 0: the largest magnitude is negative -> -2^(b-1) exactly
    w[1, 0, 0, 0] = 8.0  # channel 1: positive -> 2^(b-1) - 1
    w[2] = 0.0  # all-zero channel: scale 1
    s_ref, q_ref, dq_ref = ref.arq(w, bits, channel_wise)
    w2d = torch.from_numpy(w).reshape(6, -1)
    scale = Fq.arq_scale(w2d, bits, channel_wise)
    np.testing.assert_array_equal(scale.numpy(), s_ref)
    dq = Fq.fake_quant_weight(w2d, scale, bits).reshape(w.shape)
    np.testing.assert_allclose(dq.numpy(), dq_ref, rtol=0, atol=1e-7)
    if channel_wise:
        assert q_ref[0].min() == -(2 ** (bits - 1)) and q_ref[1].max() == 2 ** (bits - 1) - 1
        assert scale[2] == 1.0
    else:
        assert q_ref.min() == -(2 ** (bits - 1))


def test_arq_gradient_is_straight_through():
    w = torch.randn(4, 10, requires_grad=True)
    g = torch.randn(4, 10)
    Fq.fake_quant_weight(w, Fq.arq_scale(w, 8, True), 8).backward(g)
    assert torch.equal(w.grad, g)


def test_arq_sign_keeps_folded_integers_in_range():
    """With a negative BatchNorm gamma the folded integers are -q; quantizing with the sign keeps
    them inside [-128, 127] (the 128 case moves to the other end)."""
    w = torch.tensor([[9.0, -9.5, 1.0]])
    sign = torch.tensor([-1.0])
    plain = torch.round(w / Fq.arq_scale(w, 8, True))
    assert plain.min() == -128  # the 128 case: folding with gamma < 0 would need +128
    scale = Fq.arq_scale(w, 8, True, sign)
    folded = torch.round(w * sign.reshape(-1, 1) / scale)
    assert folded.max() == 127 and folded.min() >= -128
    dq = Fq.fake_quant_weight(w, scale, 8, sign)
    torch.testing.assert_close(dq, folded * scale * sign.reshape(-1, 1))


def test_ulq_weight_learned_scale_gradient():
    w = torch.randn(3, 50)
    scale = torch.tensor([0.01, 0.02, 0.05], requires_grad=True)
    g = torch.randn(3, 50)
    wt = w.clone().requires_grad_()
    Fq.ulq_weight_fake_quant(wt, scale, 8).backward(g)
    t = w / scale.detach().reshape(-1, 1)
    r = torch.round(t)
    inside = (r >= -128) & (r <= 127)
    expected = (torch.where(inside, r - t, r.clamp(-128, 127)) * g).sum(dim=1)
    torch.testing.assert_close(scale.grad, expected)
    torch.testing.assert_close(wt.grad, torch.where(inside, g, 0.0))


@pytest.mark.parametrize("fixed_min", [False, True])
def test_ifmr_initialisation_matches_numpy(fixed_min):
    x = torch.randn(8, 16, 10, 10) * 2
    if fixed_min:
        x = x.relu()
    spec = ActQuantSpec(bits=8, fixed_min=fixed_min)
    q = ActQuantizer(spec, batch_num=1, layer_name="l")
    q(x)
    cmax, cmin = ref.ifmr(x.reshape(-1).numpy(), 8, fixed_min)
    assert q.clip_max.item() == pytest.approx(cmax, rel=1e-6)
    assert q.clip_min.item() == pytest.approx(cmin, rel=1e-6, abs=1e-9)
    assert q.initialized.item() == 1


def test_ifmr_accumulates_over_batch_num_batches():
    q = ActQuantizer(ActQuantSpec(fixed_min=False), batch_num=3, layer_name="l")
    batches = [torch.randn(1000) * s for s in (1.0, 4.0, 2.0)]
    for i, b in enumerate(batches):
        q(b)
        assert q.initialized.item() == (1 if i == 2 else 0)
    cmax, cmin = ref.ifmr(torch.cat(batches).numpy(), 8, False)
    assert q.clip_max.item() == pytest.approx(cmax, rel=1e-6)
    before = q.clip_max.item()
    q(torch.randn(1000) * 100)  # initialised: no further updates
    assert q.clip_max.item() == before


def test_configured_clips_skip_initialisation():
    q = ActQuantizer(ActQuantSpec(clip_max=6.0, clip_min=-6.0, fixed_min=False), layer_name="l")
    q(torch.randn(100) * 50)
    assert (q.clip_max.item(), q.clip_min.item()) == (6.0, -6.0)


def test_search_n_matches_numpy_per_channel_and_per_tensor():
    rng = np.random.default_rng(5)
    acc = np.stack([np.round(rng.standard_normal((4, 7, 7)) * 10 ** k) for k in range(1, 7)], axis=1)
    per_channel = ShiftBitSearch(6)
    per_channel.observe(torch.from_numpy(acc).float(), channel_dim=1)
    assert per_channel.best() == tuple(ref.search_n(acc, channel_axis=1))
    per_tensor = ShiftBitSearch(1)
    per_tensor.observe(torch.from_numpy(acc).float(), channel_dim=1)
    assert per_tensor.best() == tuple(ref.search_n(acc))
    # larger accumulators need larger shifts
    best = per_channel.best()
    assert list(best) == sorted(best) and best[0] < best[-1]


def test_weight_quantizer_ulq_initialises_from_arq():
    w = torch.randn(5, 20)
    wq = WeightQuantizer(WeightQuantSpec(algo="ulq", channel_wise=True), out_channels=5)
    out = wq(w)
    torch.testing.assert_close(wq.scale.detach(), Fq.arq_scale(w, 8, True))
    torch.testing.assert_close(out, Fq.fake_quant_weight(w, Fq.arq_scale(w, 8, True), 8))
