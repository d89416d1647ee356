"""LightningDiT presets and behaviour, and the flow-matching loss and sampler."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_zero_init_and_every_parameter_learns
from flatdino.models.dit import (
    DIT_PRESETS,
    LightningDiT,
    count_dit_parameters,
    dit_preset,
    rope_1d,
)
from flatdino.models.flow import euler_sample, flow_loss, shift_time
from flatdino.models.official import OFFICIAL_PARAMETERS


def tiny() -> LightningDiT:
    torch.manual_seed(0)
    return LightningDiT(dit_preset("tiny", tokens=8, latent_dim=16))


def test_dit_xl_has_the_papers_size():
    cfg = dit_preset("dit-xl")
    assert (cfg.dim, cfg.depth, cfg.heads, cfg.mlp_hidden) == (1152, 28, 16, 3072)
    assert count_dit_parameters(cfg) == pytest.approx(676e6, rel=0.005)


@pytest.mark.parametrize("name", ["dit-s", "dit-b", "dit-l", "dit-xl"])
def test_presets_have_the_official_models_parameter_counts(name):
    """Counted from the official modules (tests/data/official/count_parameters.py); dit-l's
    SwiGLU hidden is round(8·1024/3) = 2731, as the official table has it."""
    assert count_dit_parameters(dit_preset(name)) == OFFICIAL_PARAMETERS[name]
    assert dit_preset("dit-l").mlp_hidden == 2731


@pytest.mark.parametrize("name", sorted(DIT_PRESETS))
def test_presets_on_the_meta_device(name):
    with torch.device("meta"):
        model = LightningDiT(dit_preset(name))
        v = model(torch.empty(2, 32, 128), torch.empty(2), torch.zeros(2, dtype=torch.long))
    assert v.shape == (2, 32, 128)


def test_zero_init_output_and_every_parameter_learns():
    assert_zero_init_and_every_parameter_learns(tiny())


def test_class_and_time_condition_the_output():
    model = tiny()
    for p in model.parameters():  # leave adaLN-Zero to see the conditioning paths
        torch.nn.init.normal_(p, std=0.1)
    x, t = torch.randn(2, 8, 16), torch.full((2,), 0.5)
    a = model(x, t, torch.tensor([1, 1]))
    assert not torch.allclose(a, model(x, t, torch.tensor([2, 2])))
    assert not torch.allclose(a, model(x, torch.full((2,), 0.6), torch.tensor([1, 1])))
    assert not torch.allclose(a, model(x, t, torch.full((2,), model.null_class)))


def test_rope_rotates_pairs_and_keeps_norms():
    sin, cos = rope_1d(5, 8, 10000.0)
    assert sin.shape == (5, 8) and torch.equal(sin[:, 0], sin[:, 1])  # interleaved pairs
    from timm.layers.pos_embed_sincos import apply_rot_embed

    q = torch.randn(5, 8)
    rotated = apply_rot_embed(q, sin, cos)
    torch.testing.assert_close(rotated.norm(dim=-1), q.norm(dim=-1))
    torch.testing.assert_close(rotated[0], q[0])  # position 0 is not rotated


def test_time_shift_values():
    t = torch.tensor([0.0, 0.5, 1.0])
    torch.testing.assert_close(shift_time(t, 3.0), torch.tensor([0.0, 0.25, 1.0]))
    torch.testing.assert_close(shift_time(t, 1.0), t)


def test_flow_loss_is_zero_for_the_true_velocity():
    x1 = torch.randn(6, 8, 16)

    def oracle(xt, t, y):  # knows x1, so v = (x1 - x_t) / (1 - t) = x1 - x0 exactly
        return (x1 - xt) / (1 - t).view(-1, 1, 1)

    loss = flow_loss(oracle, x1, torch.zeros(6, dtype=torch.long), kappa=3.0, class_dropout=0.0)
    assert loss.item() < 1e-10
    wrong = flow_loss(lambda xt, t, y: torch.zeros_like(xt), x1, torch.zeros(6, dtype=torch.long))
    assert wrong.item() > 0.5  # E|x1 - x0|^2 = 2 per element


def test_euler_sampler_reaches_the_data_of_a_straight_flow():
    x1 = torch.randn(3, 8, 16)

    def straight(x, t, y):  # the velocity field of x_t = (1 - t) x0 + t x1 towards a fixed x1
        return (x1.repeat(x.shape[0] // 3, 1, 1) - x) / (1 - t).view(-1, 1, 1).clamp_min(1e-6)

    out = euler_sample(straight, torch.randn(3, 8, 16), torch.zeros(3, dtype=torch.long), steps=50)
    torch.testing.assert_close(out, x1, rtol=1e-4, atol=1e-4)


def test_cfg_only_inside_the_interval_and_skipped_at_weight_one():
    calls = []

    def model(x, t, y):
        calls.append((round(t[0].item(), 4), x.shape[0]))
        return torch.where((y == 10).view(-1, 1, 1), torch.zeros_like(x), torch.ones_like(x))

    y = torch.zeros(2, dtype=torch.long)
    euler_sample(
        model, torch.zeros(2, 1, 1), y, steps=10, cfg=4.5, cfg_interval=(0.225, 1.0), null_class=10
    )
    assert all((n == 4) == (0.225 < t < 1.0) for t, n in calls)  # batched cond + uncond
    calls.clear()  # strictly inside: a step starting exactly at the interval's start is unguided
    euler_sample(
        model,
        torch.zeros(2, 1, 1),
        y,
        steps=4,
        kappa=1.0,
        cfg=4.5,
        cfg_interval=(0.25, 1.0),
        null_class=10,
    )
    assert calls == [(0.0, 2), (0.25, 2), (0.5, 4), (0.75, 4)]
    calls.clear()
    out = euler_sample(model, torch.zeros(2, 1, 1), y, steps=10, cfg=1.0, null_class=10)
    assert all(n == 2 for _, n in calls) and torch.allclose(out, torch.ones_like(out))
