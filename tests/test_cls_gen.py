"""The CLS token on the generator side (the official `in_cls_dim`): parity of both generator kinds
with the official modules, their sampler and their loss; train-dit --cls, its resume, sampling and
the refusal of a store without the token; import-official of a checkpoint with the token.

tests/data/official/parity_cls.npz holds what the official code computed at toy size with seeded
random weights (make_parity_cls.py, run in the throwaway jax/flax environment): a LightningDiT and
two DiT-DHs (RoPE; registers without RoPE), each with a 6-wide CLS token.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import npz_arrays, official_weights
from flatdino.models.configs import generator_parameters
from flatdino.models.dit import LightningDiT
from flatdino.models.dit_dh import (
    DiTDH,
    build_generator,
    count_generator_parameters,
    generator_preset,
)
from flatdino.models.flow import flow_loss, flow_sample, velocity_loss
from flatdino.models.official import cls_dim_from_shapes, convert_dit, dit_config_from_official
from flatdino.models.official_dh import convert_dit_dh, dit_dh_config_from_official

DATA = Path(__file__).parent / "data" / "official" / "parity_cls.npz"
NAMES = ("dit", "dh", "dh_regs")


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    return npz_arrays(DATA)


def _official(ref: dict, name: str):
    """Our model with the official weights of `name`, its config read from the official one."""
    official = json.loads(str(ref[f"{name}/config"]))
    if name == "dit":
        cfg = dit_config_from_official(official)
        state, _ = convert_dit(official_weights(ref, name), cfg)
    else:
        cfg = dit_dh_config_from_official(official)
        state, _ = convert_dit_dh(official_weights(ref, name), cfg)
    model = build_generator(cfg).eval()
    model.load_state_dict(state, strict=True)
    return model


def _rel(a: torch.Tensor, b: np.ndarray) -> float:
    b_ = torch.from_numpy(np.asarray(b, np.float32))
    return ((a.float() - b_).norm() / b_.norm()).item()


def _get(ref: dict, name: str, *keys: str) -> list[torch.Tensor]:
    return [torch.from_numpy(np.asarray(ref[f"{name}/{k}"])) for k in keys]


@pytest.mark.parametrize("name", NAMES)
def test_both_velocities_match_the_official_model(ref, name):
    model = _official(ref, name)
    assert model.cfg.cls_dim == 6 and isinstance(model, LightningDiT if name == "dit" else DiTDH)
    x, cls, t, y = _get(ref, name, "x", "cls", "t", "y")
    with torch.no_grad():
        v, v_cls = model((x, cls), t, y.long())
    for ours, key in ((v, "v"), (v_cls, "v_cls")):
        assert ref[f"{name}/{key}"].std() > 0.1  # a reference that moves
        assert _rel(ours, ref[f"{name}/{key}"]) < 1e-5, key
    n = sum(p.numel() for p in model.parameters())
    assert n == int(ref[f"{name}/params"]) == generator_parameters(model.cfg)
    assert (
        cls_dim_from_shapes(official_weights(ref, name)) == 6
    )  # what import-official reads without config
    with pytest.raises(ValueError, match="the pair"):
        model(x, t, y.long())  # a CLS model is never run without its token


@pytest.mark.parametrize("name", NAMES)
def test_euler_steps_with_interval_cfg_match_the_official_sampler(ref, name):
    model = _official(ref, name)
    x0, cls0, x, cls = _get(ref, name, "traj/x0", "traj/cls0", "traj/x", "traj/cls")
    steps, shift, w, lo, hi = ref["meta/traj"].tolist()
    out = flow_sample(
        model,
        (x0, cls0),
        torch.tensor([2, 5]),
        int(steps),
        shift,
        w,
        (lo, hi),
        null_class=model.null_class,
    )
    assert _rel(out[0], x.numpy()) < 1e-5 and _rel(out[1], cls.numpy()) < 1e-5
    unguided = flow_sample(model, (x0, cls0), torch.tensor([2, 5]), int(steps), shift, 1.0)
    assert _rel(unguided[1], cls.numpy()) > 1e-3  # the CLS token is guided too


@pytest.mark.parametrize("name", NAMES)
def test_the_training_loss_matches_the_official_one(ref, name):
    model = _official(ref, name)
    x1, cls1, x0, cls0, t, y = _get(
        ref, name, *(f"loss/{k}" for k in ["x1", "cls1", "x0", "cls0", "t", "y"])
    )
    with torch.no_grad():
        value = velocity_loss(model, (x0, cls0), (x1, cls1), t, y.long())
    expected = float(ref[f"{name}/loss/value"])
    assert abs(value.item() - expected) / expected < 1e-5
    with torch.no_grad():  # the mean of the tokens' errors alone is not the official value
        xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * x1
        ct = (1 - t[:, None]) * cls0 + t[:, None] * cls1
        tokens_only = ((model((xt, ct), t, y.long())[0] - (x1 - x0)) ** 2).mean()
    assert abs(tokens_only.item() - expected) / expected > 1e-3


@pytest.mark.parametrize("preset", ["tiny", "dit-dh-tiny"])
def test_every_parameter_learns_and_the_plain_path_is_unchanged(preset):
    """A CLS model's loss reaches every parameter; the same preset without the token has the
    same tensors as before (the CLS layers are the only new ones)."""
    cfg = generator_preset(preset, tokens=4, latent_dim=8, cls_dim=5)
    torch.manual_seed(0)
    model = build_generator(cfg)
    for p in model.parameters():  # away from adaLN-Zero so every path carries a gradient
        torch.nn.init.normal_(p, std=0.1)
    x1 = (torch.randn(3, 4, 8), torch.randn(3, 5))
    flow_loss(model, x1, torch.tensor([0, 1, 2]), null_class=model.null_class).backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    torch.manual_seed(0)
    plain = build_generator(generator_preset(preset, tokens=4, latent_dim=8))
    names = {n for n in model.state_dict()} - set(plain.state_dict())
    assert names == {"cls_embed.weight", "cls_embed.bias", "cls_out.weight", "cls_out.bias"}


@pytest.mark.parametrize("name", ["dit", "dh"])
def test_heun_and_bf16_autocast_carry_the_cls_token(ref, name):
    """The CLS token goes through Heun's second evaluation and through bf16 autocast with the
    state kept in float32, as the latents do."""
    model = _official(ref, name)
    x0, cls0 = _get(ref, name, "traj/x0", "traj/cls0")
    y, run = torch.tensor([2, 5]), dict(cfg=4.5, cfg_interval=(0.225, 1.0), null_class=10)
    euler = flow_sample(model, (x0, cls0), y, 4, **run)
    heun = flow_sample(model, (x0, cls0), y, 4, sampler="heun", **run)
    bf16 = flow_sample(model, (x0, cls0), y, 4, autocast=torch.bfloat16, **run)
    for out in (heun, bf16):
        pairs = zip(out, euler, strict=True)
        assert all(p.dtype == torch.float32 and p.shape == e.shape for p, e in pairs)
    assert _rel(heun[1], euler[1].numpy()) > 1e-4 and _rel(bf16[1], euler[1].numpy()) < 0.05


@pytest.mark.parametrize("preset", ["dit-xl", "dit-dh-xl"])
def test_the_xl_presets_build_with_a_768_wide_cls_token(preset):
    """On the meta device: the CLS layers add C·D + D + W·C + C parameters (W: the width the
    velocity is read from, the head's 2048 for DiT-DH), as the analytic count says."""
    base, cls = generator_preset(preset), generator_preset(preset, cls_dim=768)
    width = 2048 if preset == "dit-dh-xl" else 1152
    extra = 768 * 1152 + 1152 + width * 768 + 768
    assert count_generator_parameters(cls) - count_generator_parameters(base) == extra
    assert generator_parameters(cls) == count_generator_parameters(cls)
