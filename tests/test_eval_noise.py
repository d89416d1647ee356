"""`flatdino eval noise`: noise on latents vs on features, with an identity VAE as the control."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from flatdino.cli.main import app
from flatdino.eval.noise import noise_curves
from flatdino.trainers.train_vae import TrainVAEConfig, train_vae


class IdentityVAE:
    """Latents are the features themselves: both kinds of noise must hurt the same."""

    def encode(self, x):
        return x, torch.zeros_like(x)

    def decode(self, z):
        return z


def test_identity_vae_gives_equal_curves_growing_as_sigma_squared():
    x = torch.randn(16, 256, 32)
    c = noise_curves(IdentityVAE(), x, [0.0, 0.5, 1.0])
    assert c["latent_rel_err"][0] == 0 and c["feature_rel_err"][0] == 0
    for a, b, s in zip(c["latent_rel_err"], c["feature_rel_err"], c["sigma"], strict=True):
        assert a == pytest.approx(b, rel=0.02) and b == pytest.approx(s**2, rel=0.02)  # E|x|^2 = 1


def test_command_with_a_pixel_decoder(digits_val_store, tmp_path):
    vae = tmp_path / "vae"
    train_vae(
        TrainVAEConfig(
            features=str(digits_val_store),
            out=str(vae),
            preset="tiny",
            steps=2,
            batch_size=16,
            num_workers=0,
            progress=False,
        )
    )
    from flatdino.models.pixel_decoder import PixelDecoder, pixel_decoder_preset
    from flatdino.trainers.runner import Dist, save_checkpoint

    cfg = pixel_decoder_preset("tiny", in_dim=64)
    save_checkpoint(tmp_path / "dec", PixelDecoder(cfg), cfg.to_dict(), None, Dist())
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "noise",
            "--features",
            str(digits_val_store),
            "--vae",
            str(vae),
            "--decoder",
            str(tmp_path / "dec"),
            "--out",
            str(tmp_path / "n"),
            "--images",
            "8",
            "--steps",
            "3",
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "n" / "noise.json").read_text())
    assert data["sigma"] == [0.0, 0.5, 1.0] and data["feature_rel_err"][0] == 0
    assert data["feature_rel_err"][2] > data["feature_rel_err"][1] > 0
    assert len(data["latent_psnr"]) == 3 and (tmp_path / "n" / "noise.png").exists()
