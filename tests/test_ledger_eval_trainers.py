"""Lines of eval/, trainers/, models/ and sampling/ that no other test ran (the coverage ledger,
docs/coverage.md): refusals of bad input, each one line naming the option that fixes it, and the
rare outcomes (a store that does not answer a roll call, saved statistics without a record, a
process group made by the caller). In-process, tiny and fast: fake stores, no training."""

from __future__ import annotations

import logging
import sys
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist

from conftest import fake_feature_store
from flatdino.pipeline.errors import FlatDinoError, WeightsError
from flatdino.pipeline.feature_store import FeatureStore
from flatdino.trainers.runner import Dist, save_checkpoint


def no_valid_store(path: Path, channels: int = 64) -> str:
    """A complete feature store whose every image failed (valid all False)."""
    return str(fake_feature_store(path, channels, n=2, valid=False))


@pytest.fixture(scope="module")
def vae64(tmp_path_factory) -> str:
    """An untrained tiny VAE checkpoint for (256, 64) features."""
    from flatdino.models.vae import FlatDinoVAE, vae_preset

    cfg = vae_preset("tiny", in_dim=64, num_patches=256)
    path = tmp_path_factory.mktemp("vae") / "vae"
    save_checkpoint(path, FlatDinoVAE(cfg), cfg.to_dict(), None, Dist())
    return str(path)


# eval/fid_stats.py


def test_precision_recall_keeps_a_seeded_sorted_subset_of_a_larger_set():
    from flatdino.eval.fid_stats import Accumulator

    acc = Accumulator(total=10, keep=4)
    assert len(acc.keep) == 4 and np.all(np.diff(acc.keep) > 0) and acc.keep[-1] < 10
    assert np.array_equal(acc.keep, Accumulator(total=10, keep=4).keep)  # seeded
    assert not np.array_equal(acc.keep, np.arange(4))  # drawn from the whole set, not its head
    x = np.arange(20, dtype=np.float64).reshape(10, 2)
    acc.add(x[:3])
    acc.add(x[3:])
    result = acc.result("set", {})
    assert result.count == 10 and np.array_equal(result.vectors, x[acc.keep].astype(np.float32))


@pytest.mark.parametrize("rows", [0, 1])
def test_a_set_with_fewer_than_two_samples_has_no_frechet_distance(rows):
    from flatdino.eval.fid_stats import Accumulator

    acc = Accumulator(total=rows, keep=None)
    if rows:
        acc.add(np.ones((rows, 3)))
    message = rf"^'fake' holds {rows} readable sample\(s\); a Fréchet distance needs at least 2$"
    with pytest.raises(FlatDinoError, match=message):
        acc.result("fake", {})


def test_saved_statistics_without_a_record_are_read_with_a_warning(tmp_path, caplog):
    from flatdino.eval.fid_stats import read_saved_stats

    path = tmp_path / "ref.npz"
    np.savez(path, mu=np.zeros(3), sigma=np.eye(3))
    with caplog.at_level(logging.WARNING, "flatdino.eval.fid_stats"):
        stats = read_saved_stats(path)
    assert "saved statistics without a record of how they were computed" in caplog.text
    assert stats.count is None and set(stats.identity.values()) == {None}  # nothing compared


# eval/ablate.py


def test_ablation_of_a_store_without_a_valid_image_is_refused(vae64, tmp_path):
    from flatdino.eval.ablate import ablate

    store = no_valid_store(tmp_path / "failed.zarr")
    with pytest.raises(FlatDinoError, match="^no valid image to ablate$"):
        ablate(store, vae64)


def test_ablation_refuses_features_of_another_backbone(vae64, tmp_path):
    from flatdino.eval.ablate import ablate

    store = str(fake_feature_store(tmp_path / "c32.zarr", channels=32))
    message = r"expects \(256, 64\) features, the store holds \(256, 32\); use the VAE trained on"
    with pytest.raises(FlatDinoError, match=message):
        ablate(store, vae64)


# eval/feature_net.py and eval/fid.py


def test_inception_weights_that_do_not_exist_are_refused(tmp_path):
    from flatdino.eval.feature_net import inception_model

    missing = str(tmp_path / "none.pth")
    with pytest.raises(WeightsError, match=rf"^--inception-weights '{missing}' does not exist$"):
        inception_model(missing)


def test_an_unknown_feature_space_is_refused():
    from flatdino.eval.fid import FeatureNet, FidConfig

    with pytest.raises(FlatDinoError, match="^--space must be inception or dinov2; got 'pixels'$"):
        FeatureNet(FidConfig(real="r", space="pixels", device="cpu"))


@pytest.mark.parametrize(
    "option, message",
    [
        ({"batch_size": 0}, "--batch-size and --workers must be at least 1"),
        ({"workers": 0}, "--batch-size and --workers must be at least 1"),
        ({"pr_samples": 3}, "--pr-samples above k"),
        ({"max_failed_fraction": 1.5}, r"^--max-failed-fraction must be in \[0, 1\]$"),
        ({"max_failed_fraction": -0.1}, r"^--max-failed-fraction must be in \[0, 1\]$"),
    ],
)
def test_fid_refuses_bad_sizes_before_reading_a_set(option, message):
    from flatdino.eval.fid import FidConfig, fid

    with pytest.raises(FlatDinoError, match=message):
        fid(FidConfig(real="/nowhere", fake="/nowhere", device="cpu", **option))


# eval/knn.py


def test_knn_refuses_a_folder_that_is_not_a_store(tmp_path):
    from flatdino.eval.knn import pooled

    message = r"is neither a feature nor a latents store \(kind None\)$"
    with pytest.raises(FlatDinoError, match=message):
        pooled(str(tmp_path))


def test_knn_refuses_train_and_val_vectors_of_different_widths():
    from flatdino.eval.knn import knn_classify

    labels = np.zeros(3, np.int64)
    message = "^train vectors have 4 dims, val 6: pair stores of one kind$"
    with pytest.raises(FlatDinoError, match=message):
        knn_classify(np.ones((3, 4), np.float32), labels, np.ones((3, 6), np.float32), labels)


# eval/sweep.py


@pytest.mark.parametrize("text", ['{"key": "trunc', "[1, 2]"])  # cut short; not an object
def test_an_unreadable_sweep_record_is_refused_and_overwrite_replaces_it(tmp_path, text):
    from flatdino.eval.sweep import FILES, SweepConfig, _open_out

    (tmp_path / "sweep.json").write_text(text)
    (tmp_path / "sweep.csv").write_text("cfg,interval_start,fd_dinov2\n")
    run = SimpleNamespace(key="k", identity={"seed": 0})
    cfg = SweepConfig(dit="d", features="f", out=str(tmp_path))
    message = r"sweep\.json' is unreadable \(.*\); pass --overwrite$"
    with pytest.raises(FlatDinoError, match=message):
        _open_out(cfg, tmp_path, run)
    overwrite = SweepConfig(dit="d", features="f", out=str(tmp_path), overwrite=True)
    assert _open_out(overwrite, tmp_path, run) == {}  # what the refusal advised works
    assert not any((tmp_path / name).exists() for name in FILES)


# eval/redundancy.py


def test_redundancy_of_a_store_without_a_valid_image_is_refused(tmp_path):
    from flatdino.eval.redundancy import redundancy

    store = no_valid_store(tmp_path / "failed.zarr")
    with pytest.raises(FlatDinoError, match=r"^--features '.*failed\.zarr' holds no valid image$"):
        redundancy(store)


# trainers/waits.py


class DeadStore(dist.Store):
    """A rendezvous store whose server is gone: every request fails."""

    def _gone(self, *args):
        raise RuntimeError("Connection reset by peer")

    set = get = wait = check = set_timeout = _gone


def test_a_timeout_while_the_store_does_not_answer_either_is_one_line():
    from flatdino.trainers.waits import RankTimeoutError, bounded_waits, roll_call

    assert roll_call(DeadStore(), 0, 2, timedelta(seconds=0.1)) is None
    d = Dist(0, 2, store=DeadStore(), timeout=timedelta(seconds=0.1))
    with pytest.raises(RankTimeoutError) as caught, bounded_waits(d, "run r", "rerun"):
        raise RuntimeError("Timed out waiting 5000ms for recv operation to complete\nmore")
    message = str(caught.value)
    assert caught.value.missing == [] and "\n" not in message
    assert message.startswith("run r: a wait on the other ranks failed and the rendezvous store")
    assert "rank 0 saw RuntimeError: Timed out waiting 5000ms" in message
    assert message.endswith("; rerun")


# trainers/tracking.py


def test_wandb_runs_online_with_an_api_key_and_offline_without(tmp_path, monkeypatch):
    from flatdino.trainers.tracking import WandbTracker

    modes: list[str] = []
    fake = SimpleNamespace(init=lambda **kw: modes.append(kw["mode"]))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("NETRC", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    WandbTracker(tmp_path, {}, "p")
    monkeypatch.setenv("WANDB_API_KEY", "k")
    WandbTracker(tmp_path, {}, "p")
    assert modes == ["offline", "online"]


def test_ranks_other_than_0_save_no_picture(tmp_path):
    from flatdino.trainers.tracking import open_tracker

    picture = np.zeros((4, 4, 3), np.uint8)
    open_tracker("none", tmp_path / "r1", {}, 0, main=False).image("val/grid", 1, picture)
    assert not (tmp_path / "r1" / "grids").exists()
    (tmp_path / "r0").mkdir()
    open_tracker("none", tmp_path / "r0", {}, 0, main=True).image("val/grid", 1, picture)
    assert (tmp_path / "r0" / "grids" / "val-grid-0000001.png").exists()


# trainers/train_vae.py


def test_a_grid_decoder_of_another_backbone_is_refused(tmp_path):
    from flatdino.models.pixel_decoder import PixelDecoder, pixel_decoder_preset
    from flatdino.trainers.train_vae import ReconstructionGrid

    cfg = pixel_decoder_preset("tiny", in_dim=64)
    save_checkpoint(tmp_path / "dec", PixelDecoder(cfg), cfg.to_dict(), None, Dist())
    store = str(fake_feature_store(tmp_path / "c32.zarr", channels=32))
    message = r"expects \(256, 64\) features but --val-features holds \(256, 32\); use a decoder"
    message += " for this backbone$"
    with pytest.raises(FlatDinoError, match=message):
        ReconstructionGrid(store, 2, str(tmp_path / "dec"), torch.device("cpu"))


def test_a_rank_whose_step_read_no_row_blames_no_data(tmp_path):
    """Under several ranks an empty tail batch gives a rank no row to re-read: it re-raises the
    non-finite loss itself, while the ranks that read rows check them."""
    from flatdino.trainers.train_vae import _blame_the_data

    store = FeatureStore(fake_feature_store(tmp_path / "f.zarr", channels=8))
    assert _blame_the_data(store, np.array([], np.int64)) is None
    assert _blame_the_data(store, np.array([1, 0])) is None  # finite rows: not the data


# models/configs.py and models/flow.py


def test_a_dit_dh_config_of_another_kind_is_refused():
    from flatdino.models.configs import DiTDHConfig

    with pytest.raises(ValueError, match="^DiTDHConfig.kind must be 'dit_dh'; got 'dit'$"):
        DiTDHConfig(kind="dit")


def test_logit_normal_times_are_the_sigmoid_of_a_normal_draw_then_shifted():
    from flatdino.models.flow import sample_time, shift_time

    t = sample_time(6, torch.device("cpu"), 3.0, "logit-normal", torch.Generator().manual_seed(1))
    normal = torch.randn(6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(t, shift_time(torch.sigmoid(normal), 3.0))


# sampling/ranks.py


def test_sample_ranks_leave_their_group_but_not_the_callers(monkeypatch, tmp_path):
    """Under a process group the caller made (here gloo, one process standing in for rank 0 of
    2), `ranks` makes its own gloo group for `agree`, destroys it at the end and leaves the
    caller's."""
    from flatdino.sampling.ranks import ranks

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    destroyed = []
    destroy = dist.destroy_process_group
    monkeypatch.setattr(dist, "destroy_process_group", lambda g=None: destroyed.append(g))
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        with ranks("cpu", 30) as (d, group):
            assert d.world == 2 and not d.owns_group and group is not None
            assert dist.get_world_size(group) == 1  # a live group
        assert destroyed == [group] and dist.is_initialized()  # the caller's group is left
    finally:
        for g in destroyed:
            destroy(g)
        destroy()
