"""The VAE model, its presets, the loss, the weight-decay mask and the LR schedule."""

from __future__ import annotations

import math

import pytest
import torch

from flatdino.models.official import OFFICIAL_PARAMETERS
from flatdino.models.vae import (
    VAE_PRESETS,
    FlatDinoVAE,
    build_on_meta,
    count_parameters,
    kl_weight,
    vae_loss,
    vae_preset,
)
from flatdino.trainers.optim import WSDSchedule, param_groups, wsd_from_epochs


def tiny(**kw) -> FlatDinoVAE:
    torch.manual_seed(0)
    return FlatDinoVAE(vae_preset("tiny", in_dim=32, **kw))


def test_tiny_shapes_no_nan_and_every_parameter_gets_a_gradient():
    model = tiny()
    x = torch.randn(3, 256, 32)
    x_hat, mu, logvar = model(x)
    assert x_hat.shape == x.shape and mu.shape == logvar.shape == (3, 8, 16)
    assert torch.isfinite(x_hat).all()
    vae_loss(x, x_hat, mu, logvar, beta=1e-3)["loss"].backward()
    missing = [
        n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0
    ]
    assert missing == []


def test_encode_decode_forward_are_separate_and_eval_uses_mu():
    model = tiny().eval()
    x = torch.randn(2, 256, 32)
    mu, logvar = model.encode(x)
    torch.testing.assert_close(model(x)[0], model.decode(mu))
    model.train()
    torch.manual_seed(1)
    sampled = model(x)[0]
    assert not torch.allclose(sampled, model.decode(mu))  # training samples z ~ q(z|x)
    torch.testing.assert_close(logvar, torch.full_like(logvar, -5.0))  # the toy init: small noise


@pytest.mark.parametrize("name", sorted(VAE_PRESETS))
def test_real_presets_on_the_meta_device(name):
    cfg = vae_preset(name)
    counts = count_parameters(cfg)
    assert counts["total"] == counts["encoder"] + counts["decoder"] > 0
    model = build_on_meta(cfg)
    x = torch.empty(2, cfg.num_patches, cfg.in_dim, device="meta")
    x_hat, mu, _ = model(x, sample=False)
    assert x_hat.shape == (2, cfg.num_patches, cfg.in_dim)
    assert mu.shape == (2, cfg.tokens, cfg.latent_dim)


def test_paper_preset_sizes():
    cfg = vae_preset("flatdino-32x128")
    assert (cfg.enc_dim, cfg.enc_depth, cfg.enc_heads) == (768, 12, 12)
    assert (cfg.dec_dim, cfg.dec_depth, cfg.dec_heads) == (1024, 24, 16)
    assert (cfg.tokens, cfg.latent_dim) == (32, 128)
    counts = count_parameters(cfg)
    # SwiGLU hidden 4D: 16·D² per block (4 attention + 12 MLP), the rest is embeddings and heads
    assert counts["encoder"] == pytest.approx(12 * 16 * 768**2, rel=0.02)
    assert counts["decoder"] == pytest.approx(24 * 16 * 1024**2, rel=0.02)


@pytest.mark.parametrize("name", ["flatdino-32x128", "flatdino-32x64"])
def test_presets_have_the_official_models_parameter_counts(name):
    """Counted from the official modules themselves (tests/data/official/count_parameters.py).
    The paper's encoder takes its 768 channels at width 768: no input projection, as there."""
    assert count_parameters(vae_preset(name))["total"] == OFFICIAL_PARAMETERS[name]
    assert isinstance(build_on_meta(vae_preset(name)).encoder.input_proj, torch.nn.Identity)


@pytest.mark.parametrize(
    "dims, beta", [(512, 1e-6), (4096, 1.25e-7), (32 * 128, 1.25e-7), (32 * 64, 2.5e-7)]
)
def test_beta_table(dims, beta):
    t = 32 if dims % 32 == 0 else 1
    assert kl_weight(t, dims // t) == pytest.approx(beta)


def test_loss_parts():
    x = torch.zeros(2, 4, 3)
    mu, logvar = torch.zeros(2, 1, 2), torch.zeros(2, 1, 2)
    out = vae_loss(x, x + 2.0, mu, logvar, beta=0.5)
    assert out["recon"].item() == 4.0 and out["kl"].item() == 0.0
    huber = vae_loss(x, x + 2.0, mu, logvar, beta=0.5, recon="huber")
    assert huber["recon"].item() == 1.5  # delta 1: |e| - 0.5
    kl = vae_loss(x, x, mu + 1.0, logvar, beta=0.5)
    assert kl["kl"].item() == 1.0 and kl["loss"].item() == 0.5  # 0.5·(1+1-1-0)·2 dims
    half = vae_loss(x, x + 2.0, mu, logvar, beta=0.5, reduce_over=4)  # 2 samples of a batch of 4
    assert half["recon"].item() == 2.0


def test_weight_decay_mask_is_2d_weights_only():
    model = tiny()
    decay, no_decay = param_groups(model, 0.02)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.02 and no_decay["weight_decay"] == 0.0
    assert all(n.endswith("weight") and "norm" not in n for n in decayed)
    for n in (
        "encoder.latent_tokens",
        "decoder.queries",
        "decoder.pos_embed",
        "encoder.norm.bias",
        "decoder.norm.weight",
        "encoder.blocks.0.attn.q_norm.weight",
    ):
        assert n not in decayed
    assert "encoder.blocks.0.attn.qkv.weight" in decayed and "decoder.output_proj.weight" in decayed


def test_wsd_schedule_at_phase_boundaries():
    s = WSDSchedule(peak=1e-4, warmup=10, stable=20, decay=10)
    assert s(0) == 1e-6 and s(5) == pytest.approx((1e-6 + 1e-4) / 2)
    assert s(10) == s(29) == 1e-4
    assert s(30) == pytest.approx(1e-4) and s(35) == pytest.approx((1e-4 + 1e-8) / 2)
    assert s(40) == pytest.approx(1e-8) and s(1000) == pytest.approx(1e-8)
    assert all(s(i + 1) <= s(i) for i in range(10, 40))


@pytest.mark.parametrize("epochs, phases", [(50, (5, 40, 5)), (150, (5, 123, 22))])
def test_paper_phase_split(epochs, phases):
    s = wsd_from_epochs(epochs, steps_per_epoch=7, peak=1e-4)
    assert (s.warmup, s.stable, s.decay) == tuple(7 * p for p in phases)
    assert math.isclose(s(s.decay_start), 1e-4)
