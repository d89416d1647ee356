"""`flatdino eval ablate`: a VAE whose token i feeds only region i lights up region i."""

from __future__ import annotations

import json

import numpy as np
import torch
from typer.testing import CliRunner

from flatdino.cli.main import app
from flatdino.eval.ablate import token_ablation
from flatdino.trainers.train_vae import TrainVAEConfig, train_vae


class QuadrantVAE:
    """Token i is the mean of quadrant i's features and decodes into quadrant i only."""

    def __init__(self):
        ys, xs = np.divmod(np.arange(256), 16)
        self.region = torch.from_numpy((ys // 8) * 2 + xs // 8)  # (P,) quadrant of each patch

    def encode(self, x):
        mu = torch.stack([x[:, self.region == i].mean(1) for i in range(4)], 1)  # (B, 4, C)
        return mu, torch.zeros_like(mu)

    def decode(self, z):
        return z[:, self.region]  # (B, P, C): every patch copies its quadrant's token


def test_token_i_lights_up_region_i():
    batches = [torch.randn(8, 256, 6) + 2.0 for _ in range(3)]
    heat = token_ablation(QuadrantVAE(), batches)  # (4, 256)
    region = QuadrantVAE().region.numpy()
    for i in range(4):
        assert np.all(heat[i][region == i] > 0.5) and np.all(heat[i][region != i] == 0)


def test_command_writes_the_grid(digits_val_store, tmp_path):
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
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "ablate",
            "--features",
            str(digits_val_store),
            "--vae",
            str(vae),
            "--out",
            str(tmp_path / "abl"),
            "--images",
            "20",
        ],
    )
    assert result.exit_code == 0, result.output
    heat = np.load(tmp_path / "abl" / "ablation.npy")
    assert heat.shape == (8, 256) and np.all(heat >= 0) and heat.sum() > 0
    assert json.loads((tmp_path / "abl" / "ablation.json").read_text())["shape"] == [8, 256]
    assert (tmp_path / "abl" / "ablation.png").stat().st_size > 10_000
