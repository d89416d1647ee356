"""train-dit on CPU: the latent loader, flow conventions, EMA, checkpoints, exact resume, DDP,
refusals, and a learning test on latents whose per-class distributions are known."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from timm.utils import ModelEmaV3

from conftest import fake_latents_store, tiny_dit_args, torchrun
from flatdino.models.dit import DIT_PRESETS, DiTConfig, LightningDiT, dit_preset
from flatdino.models.flow import LatentNorm, euler_sample, flow_loss, sample_time
from flatdino.pipeline.errors import FlatDinoError
from flatdino.pipeline.latent_store import LatentStore
from flatdino.pipeline.loader import LatentBatches, LoaderConfig
from flatdino.trainers.train_dit import TrainDiTConfig, train_dit

CLASSES, T, D, V = 4, 8, 16, 2
SPREADS = np.array([0.2, 0.3, 0.4, 0.5], np.float32)


def class_gaussians(per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Latents (N, V, T, d): class c ~ N(mean_c, SPREADS[c]^2), every view an independent draw."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(CLASSES, T, D)).astype(np.float32)
    labels = np.repeat(np.arange(CLASSES), per_class)
    noise = rng.normal(size=(len(labels), V, T, D)).astype(np.float32)
    mu = means[labels][:, None] + SPREADS[labels][:, None, None, None] * noise
    return mu, labels, means


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """84 images, 4 of them invalid (so 80 train), two views."""
    mu, labels, _ = class_gaussians(21)
    valid = np.ones(len(labels), bool)
    valid[[3, 30, 50, 70]] = False
    path = tmp_path_factory.mktemp("lat") / "latents.zarr"
    return fake_latents_store(path, mu, labels, valid)


def small(store: Path, out: Path, **kw) -> TrainDiTConfig:
    base = TrainDiTConfig(
        latents=str(store),
        out=str(out),
        preset="tiny",
        steps=6,
        batch_size=16,
        lr=1e-3,
        log_every=1,
        ckpt_every=3,
        progress=False,
        device="cpu",
    )
    return dataclasses.replace(base, **kw)


def weights(run: Path, name: str = "model") -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"{name}.safetensors"))


def test_latent_loader_partitions_valid_rows_and_draws_views(store):
    import zarr

    group = zarr.open_group(str(store), mode="r")
    mu, valid = group["mu"][:], group["valid"][:]
    seen = []
    for rank in range(3):
        loader = LatentBatches(LatentStore(store), LoaderConfig(8, seed=1, rank=rank, world=3))
        assert loader.steps_per_epoch() == 80 // 3 // 8  # 26 rows per rank, the tail dropped
        rows = {}
        for x, y in loader.epoch(0):
            assert x.shape == (8, T, D) and x.dtype == torch.float32 and y.dtype == torch.int64
            for xi in x.numpy():  # each sample is one stored view of one valid row
                hit = np.argwhere((mu == xi).all(axis=(2, 3)))
                assert len(hit) == 1 and valid[hit[0, 0]]
                rows[int(hit[0, 0])] = int(hit[0, 1])
        assert len(rows) == 24  # no row twice within an epoch
        seen.append(rows)
    assert not set(seen[0]) & set(seen[1]) and not set(seen[1]) & set(seen[2])  # disjoint ranks
    assert {0, 1} == set(seen[0].values()) | set(seen[1].values())  # both views are drawn
    loader = LatentBatches(LatentStore(store), LoaderConfig(8, seed=1))
    full = [x for x, _ in loader.epoch(2)]
    tail = [x for x, _ in loader.epoch(2, start_step=3)]  # resume inside an epoch
    assert len(tail) == len(full) - 3 and all(
        torch.equal(a, b) for a, b in zip(full[3:], tail, strict=True)
    )
    assert not torch.equal(full[0], next(loader.epoch(3))[0])  # a new order each epoch


def test_views_1_trains_on_view_0_only_and_a_bad_count_is_refused(store, tmp_path):
    import zarr

    mu = zarr.open_group(str(store), mode="r")["mu"][:]
    loader = LatentBatches(LatentStore(store), LoaderConfig(8, seed=1), views=1)
    for x, _ in loader.epoch(0):
        for xi in x.numpy():  # every sample is view 0 of some row, never the flip
            assert (mu[:, 0] == xi).all(axis=(1, 2)).any() and not (mu[:, 1] == xi).all(
                axis=(1, 2)
            ).any()
    with pytest.raises(FlatDinoError, match="--views must be 1..2"):
        LatentBatches(LatentStore(store), LoaderConfig(8, seed=1), views=3)
    with pytest.raises(FlatDinoError, match="--views must be 1..2"):
        train_dit(small(store, tmp_path / "run", views=3))
    assert not (tmp_path / "run").exists()  # refused before the run folder is made
    train_dit(small(store, tmp_path / "run", views=1, steps=2))
    with pytest.raises(FlatDinoError, match="views = 1"):  # resuming with other views is refused
        train_dit(small(store, tmp_path / "run", steps=4, resume=True))


def test_interpolation_target_and_null_class():
    """x_t = (1 - t)·x0 + t·x1 with t shifted by κ, target x1 - x0, dropped labels -> null."""
    x1, y = torch.randn(64, T, D), torch.randint(0, 4, (64,))
    seen = {}

    def model(xt, t, yy):
        seen.update(xt=xt, t=t, y=yy)
        return torch.zeros_like(xt)

    torch.manual_seed(5)
    loss = flow_loss(model, x1, y, kappa=3.0, class_dropout=0.0, null_class=4)
    torch.manual_seed(5)
    t = sample_time(64, x1.device, 3.0)
    x0 = torch.randn_like(x1)
    torch.testing.assert_close(seen["t"], t)
    torch.testing.assert_close(seen["xt"], (1 - t)[:, None, None] * x0 + t[:, None, None] * x1)
    torch.testing.assert_close(loss, (x1 - x0).pow(2).mean())  # zero prediction: |target|^2
    assert torch.equal(seen["y"], y)
    flow_loss(model, x1, y, class_dropout=1.0, null_class=4)
    assert (seen["y"] == 4).all()
    torch.manual_seed(0)
    flow_loss(model, x1, torch.zeros(64, dtype=torch.long), class_dropout=0.5, null_class=4)
    assert 0.25 < (seen["y"] == 4).float().mean() < 0.75


def test_ema_update_math():
    model = torch.nn.Linear(3, 2)
    ema = ModelEmaV3(model, decay=0.9, dtype=torch.float32)
    before = ema.module.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.module.weight, 0.9 * before + 0.1 * model.weight)


@pytest.mark.parametrize("name", sorted(DIT_PRESETS))
def test_every_parameter_gets_a_gradient(name):
    """Each preset's width and heads (one block, to stay small): shape, no NaN, all gradients."""
    torch.manual_seed(0)
    model = LightningDiT(dit_preset(name, depth=1, tokens=T, latent_dim=D, num_classes=4))
    for p in model.parameters():  # leave adaLN-Zero so that every path carries a gradient at once
        torch.nn.init.normal_(p, std=0.02)
    x1, y = torch.randn(2, T, D), torch.tensor([1, 4])
    v = model(x1, torch.rand(2), y)
    assert v.shape == (2, T, D) and torch.isfinite(v).all()
    flow_loss(model, x1, y, null_class=4).backward()
    stale = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert stale == []


def test_run_folder_checkpoint_and_ema(store, tmp_path):
    run = tmp_path / "run"
    train_dit(small(store, run, ema_decay=0.0, normalize=True, warmup_steps=2))
    ck = run / "checkpoints"
    for name in (
        "model.safetensors",
        "ema.safetensors",
        "latent_stats.safetensors",
        "config.json",
        "flow.json",
        "trainer.pt",
    ):
        assert (ck / name).exists(), name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[0]["lr"] == pytest.approx(1e-6) and rows[-1]["lr"] == pytest.approx(1e-3)
    model, ema = weights(run), weights(run, "ema")
    assert all(torch.equal(model[k], ema[k]) and ema[k].dtype == torch.float32 for k in model)
    cfg = DiTConfig(**json.loads((ck / "config.json").read_text()))  # rebuilds from the file
    assert (cfg.tokens, cfg.latent_dim, cfg.num_classes) == (T, D, CLASSES)
    flow = json.loads((ck / "flow.json").read_text())
    assert (
        flow["kappa"] == 3.0 and flow["normalize"] and flow["class_names"] == ["0", "1", "2", "3"]
    )
    import zarr

    stats = load_file(str(ck / "latent_stats.safetensors"))
    np.testing.assert_array_equal(stats["mean"].numpy(), zarr.open_group(str(store))["mu_mean"][:])
    train_dit(small(store, tmp_path / "frozen", ema_decay=1.0, steps=2))
    torch.manual_seed(0)
    init = LightningDiT(cfg).state_dict()
    assert all(torch.equal(init[k], v) for k, v in weights(tmp_path / "frozen", "ema").items())


def test_resume_is_bit_identical(store, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    kw = dict(
        steps=12, ckpt_every=100, ema_decay=0.9, batch_size=16, micro_batch=8
    )  # 5 steps/epoch
    train_dit(small(store, straight, **kw))
    train_dit(small(store, split, stop_after=7, **kw))
    state = torch.load(split / "checkpoints" / "trainer.pt", weights_only=True)["state"]
    assert (state["step"], state["epoch"], state["micro_step"]) == (7, 1, 4)
    train_dit(small(store, split, resume=True, **kw))
    for name in ("model", "ema"):
        a, b = weights(straight, name), weights(split, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_refusals(store, tmp_path):
    with pytest.raises(FlatDinoError, match="--steps N or --epochs E"):
        train_dit(small(store, tmp_path / "a", steps=None))
    with pytest.raises(FlatDinoError, match="larger than the 80 valid images"):
        train_dit(small(store, tmp_path / "b", batch_size=128))
    with pytest.raises(FlatDinoError, match="missing.zarr' does not exist; pass the --out of"):
        train_dit(small(tmp_path / "missing.zarr", tmp_path / "c"))
    train_dit(small(store, tmp_path / "d", steps=1))
    with pytest.raises(FlatDinoError, match="--resume"):
        train_dit(small(store, tmp_path / "d", steps=2))
    mu, labels, _ = class_gaussians(5, seed=3)
    other = fake_latents_store(tmp_path / "other.zarr", mu, labels, fingerprint={"vae_sha256": "y"})
    with pytest.raises(FlatDinoError, match="latents_fingerprint.*same --latents"):
        train_dit(small(other, tmp_path / "d", steps=2, resume=True))


def test_two_process_ddp_on_cpu(store, tmp_path):
    run = tmp_path / "ddp"
    args = tiny_dit_args(store, run, 4)
    done = torchrun(2, *args)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # rank 0 only: no duplicated lines
    assert rows[0]["samples_per_s"] > 0
    assert all(torch.isfinite(t).all() for t in weights(run).values())
    rngs = torch.load(run / "checkpoints" / "trainer.pt", weights_only=True)["rng"]
    assert len(rngs) == 2 and not torch.equal(rngs[0]["torch"], rngs[1]["torch"])  # own noise


def _sample_stats(model: torch.nn.Module, norm: LatentNorm, per_class: int = 200):
    """Per-class (RMS error of the sample mean against the true mean, mean per-element spread)."""
    _, _, means = class_gaussians(1)
    y = torch.arange(CLASSES).repeat_interleave(per_class)
    x0 = torch.randn(len(y), T, D, generator=torch.Generator().manual_seed(1))
    x = norm.denormalize(euler_sample(model.eval(), x0, y, 50, 3.0, null_class=CLASSES)).numpy()
    errs = [np.sqrt(((x[y == c].mean(0) - means[c]) ** 2).mean()) for c in range(CLASSES)]
    return np.array(errs), np.array([x[y == c].std(0).mean() for c in range(CLASSES)])


@pytest.mark.slow
@pytest.mark.timeout(900)  # learning takes minutes on 2 cores; the default 300 s is for quick tests
def test_tiny_dit_learns_the_class_distributions(tmp_path, request):
    """3,000 steps (~1 min on 2 cores): sampled per-class means within 0.08 RMS of the true means
    (the untrained model, v = 0, is off by ~1) and spreads within 0.08 of the true ones (untrained: 0.5-0.8 off)."""
    mu, labels, _ = class_gaussians(256)
    store = fake_latents_store(tmp_path / "lat.zarr", mu, labels)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is fastest and immune to other load
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    run = tmp_path / "run"
    train_dit(
        small(
            store, run, steps=3000, batch_size=64, ema_decay=0.995, log_every=500, ckpt_every=10_000
        )
    )
    ck = run / "checkpoints"
    model = LightningDiT(DiTConfig(**json.loads((ck / "config.json").read_text())))
    norm = LatentNorm.identity(T, D)
    err0, spread0 = _sample_stats(model, norm)
    model.load_state_dict(load_file(str(ck / "ema.safetensors")))
    err, spread = _sample_stats(model, norm)
    print("mean err", err, "spread", spread, "untrained", err0, spread0)
    assert (err0 > 0.8).all() and (abs(spread0 - 1) < 0.05).all()
    assert (err < 0.08).all(), err
    assert (abs(spread - SPREADS) < 0.08).all(), spread


def test_resume_of_a_finished_run_does_nothing(store, tmp_path):
    run = tmp_path / "done"
    train_dit(small(store, run, steps=3))
    final = (run / "final.json").read_text()
    before = weights(run)
    assert train_dit(small(store, run, steps=3, resume=True)) == {"step": 3}
    assert (run / "final.json").read_text() == final
    assert all(torch.equal(before[k], v) for k, v in weights(run).items())
