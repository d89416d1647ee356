"""Every collective gets tensors on the rank's device (NCCL refuses CPU tensors).

CPU tests cannot run NCCL, so the functions run on the `meta` device with the collectives replaced
by a check: a tensor on any other device (a CPU accumulator, say) fails the test, and a host sync
on the way (`.item()` on a device value) fails it too, since meta tensors hold no values.
"""

from __future__ import annotations

import pytest
import torch

from flatdino.models.vae import FlatDinoVAE, vae_preset
from flatdino.trainers.runner import Dist, all_reduce_mean
from flatdino.trainers.train_vae import evaluate

COLLECTIVES = (
    "all_reduce",
    "broadcast",
    "all_gather",
    "all_gather_into_tensor",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
)
META = Dist(rank=1, world=2, device=torch.device("meta"))


class Reached(Exception):
    """The collective was called with tensors on the rank's device."""


@pytest.fixture
def checked_collectives(monkeypatch):
    def check(name):
        def collective(tensor, *args, **kwargs):
            for t in tensor if isinstance(tensor, list | tuple) else [tensor]:
                assert t.device == META.device, f"{name} got a tensor on {t.device}"
            raise Reached(name)

        return collective

    for name in COLLECTIVES:
        monkeypatch.setattr(torch.distributed, name, check(name))


def test_vae_validation_reduces_on_the_rank_device(checked_collectives, digits_val_store):
    model = FlatDinoVAE(vae_preset("tiny", in_dim=64, num_patches=256)).to(META.device)
    with pytest.raises(Reached, match="all_reduce"):
        evaluate(model, str(digits_val_store), META, batch=16)


def test_loss_averaging_reduces_on_the_rank_device(checked_collectives):
    with pytest.raises(Reached, match="all_reduce"):
        all_reduce_mean(torch.ones((), device=META.device), META)


def test_the_check_catches_a_cpu_tensor(checked_collectives):
    with pytest.raises(AssertionError, match="on cpu"):
        torch.distributed.all_reduce(torch.zeros(3))
