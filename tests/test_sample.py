"""The sampler: Euler and CFG on analytic fields, the κ time grid, seeds, the npz layout, refusals,
and one end-to-end run of all five commands on the digits that ends in PNGs."""

from __future__ import annotations

import dataclasses
import errno
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from flatdino.cli.main import app, main
from flatdino.models.flow import euler_sample, shift_time
from flatdino.pipeline.errors import FlatDinoError
from flatdino.sampling.outdir import NpyWriter
from flatdino.sampling.sample import SampleConfig, class_labels, sample

runner = CliRunner(env={"COLUMNS": "250", "NO_COLOR": "1"})


def test_euler_is_exact_on_a_constant_field_and_walks_the_kappa_grid():
    seen = []

    def const(x, t, y):
        seen.append(t[0].item())
        return torch.full_like(x, 0.7)

    x0 = torch.randn(2, 4, 3)
    out = euler_sample(const, x0, torch.zeros(2, dtype=torch.long), steps=10, kappa=3.0, cfg=1.0)
    torch.testing.assert_close(out, x0 + 0.7)  # the shifted steps still sum to 1
    grid = shift_time(torch.linspace(0, 1, 11), 3.0)
    np.testing.assert_allclose(seen, grid[:-1].numpy(), rtol=1e-6)
    assert seen[5] == pytest.approx(0.25)  # t = 0.5 on the uniform grid is 0.25 with κ = 3


def test_guidance_only_inside_the_interval():
    def model(x, t, y):  # conditional velocity 1, unconditional 0
        return (y != 10).float().view(-1, 1, 1).expand_as(x).clone()

    y, steps, w, lo = torch.zeros(1, dtype=torch.long), 20, 4.5, 0.5
    out = euler_sample(model, torch.zeros(1, 1, 1), y, steps, 3.0, w, (lo, 1.0), null_class=10)
    grid = shift_time(torch.linspace(0, 1, steps + 1), 3.0)
    dt, t = grid.diff(), grid[:-1]
    expected = (dt * torch.where(t > lo, torch.tensor(w), torch.tensor(1.0))).sum()  # strictly
    torch.testing.assert_close(out.flatten()[0], expected)  # outside: the conditional velocity


def test_class_labels():
    cfg = SampleConfig(dit="", out="", classes="3,1", per_class=2)
    assert class_labels(cfg, 10).tolist() == [3, 3, 1, 1]
    assert class_labels(dataclasses.replace(cfg, classes=None, n=5), 3).tolist() == [0, 1, 2, 0, 1]
    assert class_labels(dataclasses.replace(cfg, classes="all", per_class=1), 3).tolist() == [
        0,
        1,
        2,
    ]
    with pytest.raises(FlatDinoError, match="classes 0..9"):
        class_labels(dataclasses.replace(cfg, classes="12"), 10)


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Path:
    """All five commands' inputs, built through the CLI on the digits with tiny presets."""
    from conftest import build_chain

    return build_chain(tmp_path_factory.mktemp("chain"), invoke)


def test_all_five_commands_end_in_pngs(chain, tmp_path):
    out = tmp_path / "samples"
    result = invoke(
        "sample",
        "--dit",
        chain / "dit",
        "--out",
        out,
        "--classes",
        "2,7",
        "--per-class",
        "3",
        "--decoder",
        chain / "decoder",
        "--steps",
        "4",
        "--device",
        "cpu",
        "--no-progress",
    )
    assert "6 samples" in result.output
    npz = np.load(out / "samples.npz")
    assert npz["arr_0"].shape == (6, 256, 256, 3) and npz["arr_0"].dtype == np.uint8
    assert npz["labels"].tolist() == [2, 2, 2, 7, 7, 7]
    assert len(list((out / "images").glob("*.png"))) == 6
    assert np.array_equal(np.asarray(Image.open(out / "images" / "00003_c7.png")), npz["arr_0"][3])
    grid = Image.open(out / "grid.png")
    assert grid.size == (64 + 3 * 256, 2 * 256)  # a label margin, rows = classes
    info = runner.invoke(app, ["info", str(chain / "decoder")])
    assert info.exit_code == 0 and "kind: decoder" in info.output
    invoke(
        "sample",
        "--dit",
        chain / "dit",
        "--out",
        out,
        "--n",
        "2",
        "--steps",
        "2",
        "--device",
        "cpu",
        "--no-progress",
    )  # the same --out again, without a decoder
    assert sorted(p.name for p in out.iterdir()) == ["features.npy", "latents.npy", "sample.json"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("keep me")
    refused = runner.invoke(
        app,
        [
            "sample",
            "--dit",
            str(chain / "dit"),
            "--out",
            str(tmp_path / "mine"),
            "--n",
            "1",
            "--steps",
            "1",
            "--device",
            "cpu",
        ],
    )
    assert refused.exit_code == 1 and "not a sample run" in refused.output
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "keep me"


def test_seeds_reproduce_at_any_batch_size_and_no_decoder_writes_features(chain, tmp_path):
    base = SampleConfig(
        dit=str(chain / "dit"),
        out=str(tmp_path / "a"),
        n=5,
        steps=3,
        batch_size=5,
        device="cpu",
        progress=False,
        cfg=2.0,
    )
    summary = sample(base)
    assert not summary["images"] and summary["written"] == ["latents.npy", "features.npy"]
    sample(dataclasses.replace(base, out=str(tmp_path / "b"), batch_size=2))
    sample(dataclasses.replace(base, out=str(tmp_path / "c"), seed=1))
    a, b, c = (np.load(tmp_path / k / "latents.npy") for k in "abc")
    assert a.shape == (5, 8, 16) and np.allclose(a, b, atol=1e-6) and not np.allclose(a, c)
    feats = np.load(tmp_path / "a" / "features.npy")
    assert feats.shape == (5, 256, 64) and feats.dtype == np.float16
    result = runner.invoke(
        app,
        [
            "sample",
            "--dit",
            str(chain / "dit"),
            "--out",
            str(tmp_path / "d"),
            "--n",
            "2",
            "--steps",
            "2",
            "--device",
            "cpu",
            "--no-progress",
        ],
    )
    assert result.exit_code == 0 and "pass --decoder" in result.output


def test_sample_refuses_a_wrong_vae_and_a_missing_dit(chain, tmp_path):
    other = tmp_path / "vae2"
    invoke(
        "train-vae",
        "--features",
        chain / "features.zarr",
        "--out",
        other,
        "--preset",
        "tiny",
        "--steps",
        "1",
        "--batch-size",
        "32",
        "--num-workers",
        "0",
        "--seed",
        "5",
        "--no-progress",
    )
    cfg = SampleConfig(
        dit=str(chain / "dit"),
        out=str(tmp_path / "s"),
        n=1,
        steps=1,
        vae=str(other),
        device="cpu",
        progress=False,
    )
    with pytest.raises(FlatDinoError, match="not the one the DiT's latents were encoded with"):
        sample(cfg)
    with pytest.raises(FlatDinoError, match="--dit .* holds no checkpoint"):
        sample(dataclasses.replace(cfg, dit=str(tmp_path), vae=None))


def test_latents_are_denormalised_before_the_vae(tmp_path):
    from flatdino.models.dit import LightningDiT, dit_preset
    from flatdino.models.flow import LatentNorm, sample_noise
    from flatdino.pipeline.generate import Generator
    from flatdino.sampling.outdir import batch_file
    from flatdino.sampling.sample import generate_batches

    dit = LightningDiT(dit_preset("tiny", tokens=4, latent_dim=3))  # untrained: v = 0, so x1 = x0
    norm = LatentNorm(torch.full((4, 3), 5.0), torch.full((4, 3), 2.0))
    seen = []

    class StubVAE:
        def decode(self, z):
            seen.append(z.clone())
            return torch.zeros(len(z), 256, 8)

    cfg = SampleConfig(dit="", out="", n=3, steps=2, cfg=1.0, batch_size=2, progress=False)
    (tmp_path / "batches").mkdir()
    generate_batches(
        cfg,
        Generator(dit, norm, StubVAE(), 3.0),
        np.zeros(3, np.int64),
        torch.device("cpu"),
        tmp_path,
        todo=[0, 1],
    )
    noise = torch.from_numpy(np.stack([sample_noise(0, i, (4, 3)) for i in range(3)]))
    torch.testing.assert_close(torch.cat(seen), noise * 2.0 + 5.0)
    latents = [np.load(batch_file(tmp_path, b))["latents"] for b in (0, 1)]  # batches of 2 + 1
    np.testing.assert_allclose(np.concatenate(latents), (noise * 2.0 + 5.0).numpy(), rtol=1e-6)
    assert np.load(batch_file(tmp_path, 1))["features"].shape == (1, 256, 8)


def test_noise_depends_only_on_seed_and_index():
    from flatdino.models.flow import sample_noise
    from flatdino.sampling.outdir import batches_of

    a = sample_noise(3, 7, (8, 16))
    assert a.dtype == np.float32 and a.shape == (8, 16)
    assert np.array_equal(a, sample_noise(3, 7, (8, 16)))
    assert not np.array_equal(a, sample_noise(3, 8, (8, 16)))
    assert not np.array_equal(a, sample_noise(4, 7, (8, 16)))
    assert abs(float(np.stack([sample_noise(0, i, (64,)) for i in range(200)]).std()) - 1) < 0.02
    assert [list(r) for r in batches_of(5, 2)] == [[0, 1], [2, 3], [4]]


def test_bf16_autocast_keeps_the_euler_state_in_fp32_and_stays_close(chain):
    from flatdino.pipeline.checkpoints import load_dit

    dit, flow, _, _ = load_dit(str(chain / "dit"))
    x0 = torch.randn(
        16, dit.cfg.tokens, dit.cfg.latent_dim, generator=torch.Generator().manual_seed(0)
    )
    y = torch.arange(16) % 10
    args = (dit, x0, y, 8, float(flow.kappa), 2.0, (0.0, 1.0), dit.null_class)
    full = euler_sample(*args)
    half = euler_sample(*args, autocast=torch.bfloat16)
    assert full.dtype == half.dtype == torch.float32
    rel = ((half - full).norm() / full.norm()).item()
    assert 0 < rel < 0.02, rel  # bf16 networks differ from fp32 by under 2% after 8 steps


def test_tf32_only_on_cuda_only_from_the_default_and_restored():
    from flatdino.pipeline.env import fast_matmul, inference_dtype

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert inference_dtype("auto", cuda) == torch.bfloat16 and inference_dtype("auto", cpu) is None
    assert inference_dtype("fp32", cuda) is None and inference_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(FlatDinoError, match="--precision must be one of auto, bf16, fp32"):
        inference_dtype("fp16", cpu)
    assert torch.get_float32_matmul_precision() == "highest"
    with fast_matmul(cuda):
        assert torch.get_float32_matmul_precision() == "high"
    assert torch.get_float32_matmul_precision() == "highest"
    for device, precision in ((cpu, "auto"), (cuda, "fp32")):
        with fast_matmul(device, precision):
            assert torch.get_float32_matmul_precision() == "highest"
    torch.set_float32_matmul_precision("medium")  # the user's own choice is kept
    try:
        with fast_matmul(cuda):
            assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision("highest")


def _outputs(folder: Path) -> dict[str, bytes]:
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "sample.json"]
    return {str(p.relative_to(folder)): p.read_bytes() for p in files}


def test_two_ranks_write_the_same_bytes_as_one_and_a_run_resumes(chain, tmp_path, monkeypatch):
    """torchrun with 2 gloo ranks against one process: every output file identical, bit for bit;
    then a run killed after its first batch continues from it and ends identical too."""
    from conftest import torchrun

    common = [
        "sample",
        "--dit",
        str(chain / "dit"),
        "--num-samples",
        "10",
        "--batch-size",
        "3",
        "--steps",
        "3",
        "--cfg",
        "2",
        "--decoder",
        str(chain / "decoder"),
        "--save-features",
        "--device",
        "cpu",
        "--no-progress",
    ]
    invoke(*common, "--out", tmp_path / "one")
    two = torchrun(2, *common, "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    one = _outputs(tmp_path / "one")
    assert len([k for k in one if k.startswith("images/")]) == 10
    assert {"samples.npz", "latents.npy", "features.npy", "grid.png"} <= set(one)
    assert _outputs(tmp_path / "two") == one
    assert json.loads((tmp_path / "two" / "sample.json").read_text())["world"] == 2

    import flatdino.sampling.outdir as outdir

    real_submit = outdir.BatchWriter.submit

    def killed_after_two(self, b, *args):
        if b > 1:
            raise KeyboardInterrupt
        real_submit(self, b, *args)

    cfg = SampleConfig(
        dit=str(chain / "dit"),
        out=str(tmp_path / "again"),
        n=10,
        batch_size=3,
        steps=3,
        cfg=2.0,
        decoder=str(chain / "decoder"),
        save_features=True,
        device="cpu",
        progress=False,
    )
    with monkeypatch.context() as m:
        m.setattr(outdir.BatchWriter, "submit", killed_after_two)
        with pytest.raises(KeyboardInterrupt):
            sample(cfg)
    assert not (tmp_path / "again").exists()
    (partial,) = tmp_path.glob(".again.partial-*")
    assert sorted(p.name for p in (partial / "batches").iterdir()) == ["000000.npz", "000001.npz"]
    damaged = partial / "batches" / "000001.npz"
    damaged.write_bytes(damaged.read_bytes()[:100])  # a batch file cut short by a crash
    zeroed = partial / "batches" / "000000.npz"  # its zip index intact, a data region zeroed
    data = bytearray(zeroed.read_bytes())
    data[200:400] = bytes(200)
    zeroed.write_bytes(bytes(data))
    with pytest.raises(FlatDinoError, match="000000.npz' was damaged .* rerun the same command"):
        sample(cfg)  # caught by its CRC when assembled, and removed
    summary = sample(cfg)
    assert summary["resumed_batches"] == 3 and not partial.exists()  # 0 and 1 generated again
    assert _outputs(tmp_path / "again") == one
    stamp = (tmp_path / "again" / "samples.npz").stat().st_mtime_ns
    summary = sample(dataclasses.replace(cfg, writers=2))  # the same run again: nothing to do
    assert summary["resumed_batches"] == 4 and summary["seconds"] == 0.0
    assert (tmp_path / "again" / "samples.npz").stat().st_mtime_ns == stamp


def test_a_full_disk_is_an_error_not_a_crash():
    """Sequential writes: /dev/full gives OSError(ENOSPC), where a written memory map gets SIGBUS
    and kills the process (the CI failure this replaced)."""
    with pytest.raises(OSError) as caught, open("/dev/full", "wb") as file:
        NpyWriter(file, np.dtype(np.uint8), (1 << 20,)).write(np.zeros(1 << 20, np.uint8))
    assert caught.value.errno == errno.ENOSPC


def test_sampling_checks_free_space_first_and_a_full_disk_keeps_the_finished_batches(
    chain, tmp_path, monkeypatch, capsys
):
    import flatdino.sampling.outdir as outdir

    out = tmp_path / "samples"
    args = [
        "flatdino",
        "sample",
        "--dit",
        str(chain / "dit"),
        "--out",
        str(out),
        "--n",
        "64",
        "--decoder",
        str(chain / "decoder"),
        "--steps",
        "1",
        "--device",
        "cpu",
        "--no-progress",
    ]
    free = shutil.disk_usage(tmp_path)._replace(free=10 * 2**20)
    with monkeypatch.context() as m:
        m.setattr(outdir.shutil, "disk_usage", lambda path: free)
        m.setattr("sys.argv", args)
        with pytest.raises(SystemExit) as exited:
            main()
    err = capsys.readouterr().err
    assert exited.value.code == 1 and "needs up to 0.04 GiB" in err and "0.01 GiB is free" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no --out, no temporary folder

    def full(self, rows):
        raise OSError(errno.ENOSPC, "No space left on device")  # as a full disk raises it

    with monkeypatch.context() as m:
        m.setattr(outdir.NpyWriter, "write", full)  # the disk fills while samples.npz is assembled
        m.setattr("sys.argv", args)
        with pytest.raises(SystemExit) as exited:
            main()
    err = capsys.readouterr().err
    assert exited.value.code == 1 and len(err.strip().splitlines()) == 1
    assert "no space left on the device; free some space" in err
    (partial,) = tmp_path.iterdir()  # no --out; the finished batches are kept for the rerun
    assert (
        partial.name.startswith(".samples.partial-") and len(list(partial.glob("batches/*"))) == 1
    )
    summary = sample(
        SampleConfig(
            dit=str(chain / "dit"),
            out=str(out),
            n=64,
            steps=1,
            decoder=str(chain / "decoder"),
            device="cpu",
            progress=False,
        )
    )
    assert summary["resumed_batches"] == 1 and sorted(p.name for p in tmp_path.iterdir()) == [
        "samples"
    ]


def test_run_key_follows_what_decides_the_bits_not_how_it_is_spelled(tmp_path, monkeypatch):
    import os

    from flatdino.sampling.sample import run_key

    dit, vae = tmp_path / "ckpt", tmp_path / "vae"
    for folder in (dit, vae):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"old")
    cfg = SampleConfig(dit=str(dit), out=str(tmp_path / "s"), classes="1,2", per_class=2)
    labels = class_labels(cfg, 10)
    cpu = torch.device("cpu")

    def key(c=cfg, dtype=None, ckpts=(dit, vae)):
        return run_key(c, class_labels(c, 10), dtype, cpu, list(ckpts))

    same = dataclasses.replace(cfg, out="elsewhere", writers=2, classes=" 1, 2", progress=False)
    assert key(same) == key() and run_key(cfg, labels, None, cpu, [dit, vae]) == key()
    monkeypatch.chdir(tmp_path)
    assert key(ckpts=(Path("ckpt"), Path("vae"))) == key()  # relative and absolute: one key
    assert key(dataclasses.replace(cfg, seed=1)) != key()
    assert key(dataclasses.replace(cfg, per_class=3)) != key()
    assert key(dtype=torch.bfloat16) != key()
    before = key()
    os.utime(vae / "model.safetensors", ns=(1, 1))  # the VAE saved again: another mtime
    assert key() != before
    before = key()
    os.utime(dit / "model.safetensors", ns=(2, 2))
    assert key() != before


def test_ranks_share_an_error_instead_of_waiting_for_each_other(tmp_path):
    """The waits of `sample` carry errors: when rank 1 fails, rank 0 raises naming it."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Manager().dict()
    rendezvous = tmp_path / "rendezvous"  # a file, not a port another process could take first
    procs = [
        ctx.Process(target=_agree_rank, args=(r, rendezvous, results), daemon=True)
        for r in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        p.kill()  # a hung rank fails the test below instead of hanging pytest
    assert results[0].startswith("FlatDinoError: sample: rank 1 failed: OSError: disk gone")
    assert results[1] == "OSError: disk gone"


def _agree_rank(rank: int, rendezvous: Path, results) -> None:
    import torch.distributed as dist

    from flatdino.sampling.ranks import agree
    from flatdino.trainers.runner import Dist

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        assert agree(Dist(rank, 2), None, None, payload=rank) == 0  # rank 0's payload
        try:
            agree(Dist(rank, 2), None, OSError("disk gone") if rank == 1 else None)
            results[rank] = "returned"
        except Exception as e:
            results[rank] = f"{type(e).__name__}: {e}"
    finally:
        dist.destroy_process_group()
