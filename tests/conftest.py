"""Shared fixtures: tiny-backbone configs, a small image folder with every kind of bad input."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile

# Before any import of huggingface_hub, which reads it once: tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# A test run leaves nothing in the system temp folder: what libraries put there (wandb, imported by
# timm, makes two folders per process and leaves them when Ray ends the process; Ray's session
# folders) goes to one short-named folder of this session, removed in pytest_unconfigure.
# pytest's own tmp_path folders stay where they were (kept for failed tests).
os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", tempfile.gettempdir())
os.environ["TMPDIR"] = tempfile.tempdir = tempfile.mkdtemp(prefix="fd-")  # short: Ray's sockets
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from flatdino.pipeline.extract import ExtractConfig, extract_features
from flatdino.pipeline.storage import open_group


def tiny_config(data: str, out: Path, **overrides) -> ExtractConfig:
    """A fast CPU config: tiny backbone, local backend, small shards, no progress bar."""
    base = ExtractConfig(
        data=data,
        out=str(out),
        backbone="tiny",
        backend="local",
        batch_size=16,
        shard_size=16,
        torch_threads=2,
        progress=False,
    )
    return dataclasses.replace(base, **overrides)


def read_store(path: Path | str) -> dict[str, np.ndarray]:
    """Every array of a store (a path or a URL), for bit-level comparisons."""
    group = open_group(path)
    names = ("features", "cls", "labels", "valid", "done")
    return {name: group[name][:] for name in names if name in group}


def assert_same_store(a: Path | str, b: Path | str) -> None:
    """Bit-identical arrays and manifest (attrs hold a creation time and may differ)."""
    from flatdino.pipeline.feature_store import FeatureStore

    left, right = read_store(a), read_store(b)
    assert left.keys() == right.keys()
    for name in left:
        assert left[name].dtype == right[name].dtype, name
        assert left[name].tobytes() == right[name].tobytes(), f"{name} differs"
    assert FeatureStore(a).manifest().equals(FeatureStore(b).manifest())


@pytest.fixture(scope="session")
def digits_val_store(tmp_path_factory) -> Path:
    """The digits val split (359 images, 23 shards of 16) through the tiny backbone, locally."""
    out = tmp_path_factory.mktemp("stores") / "digits-val.zarr"
    extract_features(tiny_config("digits", out, split="val"))
    return out


def _png_bytes(img: Image.Image, **kw) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format=kw.pop("format", "PNG"), **kw)
    return buf.getvalue()


@pytest.fixture(scope="session")
def messy_folder(tmp_path_factory) -> Path:
    """An ImageFolder with real photos, every PIL mode, and broken files; returns its root."""
    from skimage import data

    root = tmp_path_factory.mktemp("messy")
    good, odd, empty = root / "a_good", root / "b_odd", root / "c_empty"
    for d in (good, odd, empty):
        d.mkdir()
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        Image.fromarray(getattr(data, name)()).save(good / f"{name}.jpg", quality=95)
    rgb = Image.fromarray(data.astronaut())
    camera = data.camera()  # (512, 512) uint8
    rgb.convert("L").save(odd / "gray.png")
    rgb.convert("CMYK").save(odd / "cmyk.jpg")
    rgb.convert("RGBA").save(odd / "rgba.png")
    Image.fromarray(camera.astype(np.uint16) * 257).save(odd / "sixteen_bit.png")
    pal = rgb.convert("P", palette=Image.ADAPTIVE)
    pal.info["transparency"] = 0
    pal.save(odd / "palette.png", transparency=0)
    rgb.convert("1").save(odd / "bilevel.png")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(odd / "tiny.png")
    Image.new("RGB", (7000, 300), (10, 200, 10)).save(odd / "wide.png")
    rgb.resize((3000, 3000)).save(odd / "huge.jpg", quality=80)
    full = (good / "astronaut.jpg").read_bytes()
    (odd / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (odd / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 10)
    (odd / "text.png").write_text("this is a text file with an image extension\n")
    (odd / "notes.txt").write_text("skipped: no image extension\n")
    (odd / ".DS_Store").write_bytes(b"\x00\x01")
    return root


@pytest.fixture(scope="session")
def local_ray():
    """One small local Ray instance shared by the Ray tests. Its processes get the S3 server's
    credentials when they start, as a cluster's nodes have their own (the driver never forwards
    them); the driver's environment is left as it was."""
    import ray

    with pytest.MonkeyPatch.context() as env:
        for key, value in S3_ENV.items():
            env.setenv(key, value)
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def fake_feature_store(
    path: Path | str, channels: int, n: int = 4, valid: bool = True
) -> Path | str:
    """A complete feature store of ones with C = `channels` (to test shape refusals); with
    `valid` False every image failed."""
    from flatdino.pipeline.feature_store import FeatureStore

    store = FeatureStore.create(
        path,
        shape=(n, 1, 256, channels),
        labels=np.zeros(n, np.int32),
        paths=[str(i) for i in range(n)],
        class_names=["a"],
        shard_size=8,
        chunk_rows=8,
        attrs={"fingerprint": {}},
    )
    store.write_shard(
        store.shards()[0], np.ones((n, 1, 256, channels), np.float16), np.full(n, valid), {}
    )
    store.finalize()
    return path


def fake_latents_store(
    path: Path,
    mu: np.ndarray,
    labels: np.ndarray,
    valid: np.ndarray | None = None,
    shard_size: int = 16,
    class_names: list[str] | None = None,
    fingerprint: dict | None = None,
    cls: np.ndarray | None = None,
) -> Path:
    """A complete latents store (encode-latents' layout) holding the given mu (N, V, T, d) (and
    CLS tokens (N, V, C) when given)."""
    n, v, t, d = mu.shape
    valid = np.ones(n, bool) if valid is None else valid
    group = zarr.create_group(str(path), zarr_format=3)
    group.create_array("mu", shape=mu.shape, chunks=(shard_size, v, t, d), dtype=mu.dtype)
    group["mu"][:] = mu
    if cls is not None:
        group.create_array(
            "cls", shape=cls.shape, chunks=(shard_size, v, cls.shape[2]), dtype=cls.dtype
        )
        group["cls"][:] = cls
    for name, value in (("labels", labels.astype(np.int32)), ("valid", valid)):
        group.create_array(name, shape=(n,), dtype=value.dtype)
        group[name][:] = value
    kept = mu[valid].astype(np.float64)
    for name, value in (("mu_mean", kept.mean((0, 1))), ("mu_std", kept.std((0, 1)))):
        group.create_array(name, shape=(t, d), dtype="float32")
        group[name][:] = value.astype(np.float32)
    classes = class_names or [str(c) for c in range(int(labels.max()) + 1)]
    group.attrs.update(
        {
            "kind": "flatdino.latents",
            "complete": True,
            "shard_size": shard_size,
            "class_names": classes,
            "fingerprint": fingerprint or {"vae_sha256": "x"},
            "vae_checkpoint": "/nowhere/vae",
        }
    )
    return path


def build_chain(root: Path, invoke, dit: tuple = ("--steps", "5"), decoder: bool = True) -> Path:
    """extract-features -> train-vae -> encode-latents (-> train-decoder) -> train-dit on the
    digits' val split through the CLI with tiny presets, into `root`: what `sample`, its tests and
    sweep-cfg's need. The stages before train-dit are built once per session (`chain_inputs`) and
    linked into `root`; `invoke(*args)` runs one command and checks it succeeded; `dit` are
    train-dit's run-length and learning options."""
    inputs = _chain_inputs(invoke)
    for name in ("features.zarr", "vae", "latents.zarr", *(("decoder",) if decoder else ())):
        (root / name).symlink_to(inputs / name, target_is_directory=True)
    invoke(
        "train-dit",
        "--latents",
        root / "latents.zarr",
        "--out",
        root / "dit",
        "--preset",
        "tiny",
        *dit,
        "--batch-size",
        "32",
        "--device",
        "cpu",
        "--no-progress",
    )
    return root


_CHAIN_INPUTS: list[Path] = []  # the session's one build of the stages before train-dit


def _chain_inputs(invoke) -> Path:
    if _CHAIN_INPUTS:
        return _CHAIN_INPUTS[0]
    root = Path(tempfile.mkdtemp(prefix="chain-"))  # in the session's temp folder, removed at exit
    feats, vae, lat = root / "features.zarr", root / "vae", root / "latents.zarr"
    invoke(
        "extract-features",
        "--data",
        "digits",
        "--split",
        "val",
        "--backbone",
        "tiny",
        "--out",
        feats,
        "--backend",
        "local",
        "--no-progress",
    )
    invoke(
        "train-vae",
        "--features",
        feats,
        "--out",
        vae,
        "--preset",
        "tiny",
        "--steps",
        "5",
        "--batch-size",
        "32",
        "--num-workers",
        "0",
        "--no-progress",
    )
    invoke(
        "encode-latents",
        "--features",
        feats,
        "--vae",
        vae,
        "--out",
        lat,
        "--backend",
        "local",
        "--no-progress",
    )
    invoke(
        "train-decoder",
        "--features",
        feats,
        "--out",
        root / "decoder",
        "--preset",
        "tiny",
        "--steps",
        "3",
        "--batch-size",
        "8",
        "--num-workers",
        "0",
        "--device",
        "cpu",
        "--no-progress",
    )
    _CHAIN_INPUTS.append(root)
    return root


def npz_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of an .npz file (a parity file of tests/data/official), read once."""
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def official_weights(ref: dict[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    """The official weights of model `name` in a parity file, as float32 (bfloat16 values are
    stored as their raw 16 bits, `make_parity_dit_dh.py`)."""
    prefix, out = f"{name}/w/", {}
    for k, bits in ref.items():
        if k.startswith(prefix):
            wide = bits.astype(np.uint32) << 16 if bits.dtype == np.uint16 else bits
            out[k[len(prefix) :]] = wide.view(np.float32)
    return out


def assert_zero_init_and_every_parameter_learns(model) -> None:
    """adaLN-Zero: an untrained generator (T = 8, d = 16) predicts v = 0; after a few SGD steps
    on the flow loss (behind zero-initialised layers, gradients arrive a few updates later) its
    output is finite and non-zero and every parameter has had a gradient."""
    import torch

    from flatdino.models.flow import flow_loss

    x, t, y = torch.randn(4, 8, 16), torch.rand(4), torch.tensor([0, 3, 9, 10])
    assert model(x, t, y).abs().max() == 0
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(4):
        opt.zero_grad()
        flow_loss(model, x, y, null_class=model.null_class).backward()
        opt.step()
    v = model(x, t, y)
    assert torch.isfinite(v).all() and v.abs().max() > 0
    stale = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert stale == []


def train_dit_straight_and_resumed(tmp_path: Path, stop_after: int, **kw) -> Path:
    """train-dit with `kw` straight through and again stopped after `stop_after` steps and
    resumed; asserts the two runs' raw and EMA weights are the same bits; returns the straight
    run."""
    import torch
    from safetensors.torch import load_file

    from flatdino.trainers.train_dit import TrainDiTConfig, train_dit

    straight, split = tmp_path / "straight", tmp_path / "split"
    train_dit(TrainDiTConfig(out=str(straight), **kw))
    train_dit(TrainDiTConfig(out=str(split), stop_after=stop_after, **kw))
    train_dit(TrainDiTConfig(out=str(split), resume=True, **kw))
    for name in ("model", "ema"):
        a = load_file(str(straight / "checkpoints" / f"{name}.safetensors"))
        b = load_file(str(split / "checkpoints" / f"{name}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    return straight


def free_port() -> str:
    """A TCP port nobody listens on now. Another process may take it before it is used: prefer a
    launcher that binds port 0 itself (`torchrun` below) where there is one."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def torchrun_cmd(n: int, *args: str) -> list[str]:
    """`torchrun --nproc-per-node n flatdino ARGS`. `--standalone` makes torchrun's own store bind a
    free port: a port picked here and bound there later was once taken in between (EADDRINUSE)."""
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    return [*head, str(n), "-m", "flatdino.cli.main", *args]


def tiny_dit_args(store: Path, run: Path, steps: int, *extra: str) -> list[str]:
    """`train-dit` of the tiny preset on CPU, batch 16, a metrics line every step: the command the
    torchrun tests start (their own options in `extra`)."""
    head = ["train-dit", "--latents", str(store), "--out", str(run), "--preset", "tiny"]
    run_options = ["--batch-size", "16", "--steps", str(steps), "--log-every", "1"]
    return [*head, *run_options, "--device", "cpu", "--no-progress", *extra]


TORCHRUN_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per rank on 2 cores


def torchrun(n: int, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """`torchrun_cmd` run to its end on CPU (gloo), one thread per rank."""
    cmd = torchrun_cmd(n, *args)
    return subprocess.run(cmd, capture_output=True, text=True, env=TORCHRUN_ENV, timeout=timeout)


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
    "AWS_ALLOW_HTTP": "true",
}


def start_moto(env: dict | None = None, tries: int = 3) -> tuple[subprocess.Popen, str]:
    """moto's standalone S3 server on 127.0.0.1 and a free port: (process, endpoint URL). A server
    that exits at once (its port taken in the meantime) is started again on another port."""
    import time
    import urllib.request

    for _ in range(tries):
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", port],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
        )
        endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
                return proc, endpoint
            except OSError:
                time.sleep(0.1)
        proc.kill()
    raise RuntimeError(f"moto's S3 server did not start in {tries} tries")


@pytest.fixture(scope="session")
def s3_server():
    """One moto S3 server for the session (stopped at the end): its endpoint URL."""
    proc, endpoint = start_moto()
    yield endpoint
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def s3(s3_server, monkeypatch) -> str:
    """A fresh bucket on the session's S3 server, its credentials and endpoint in the
    environment (as a user sets them): 's3://BUCKET'. The server forgets it afterwards."""
    import urllib.request
    import uuid

    import boto3

    for key, value in {**S3_ENV, "AWS_ENDPOINT_URL": s3_server}.items():
        monkeypatch.setenv(key, value)
    bucket = f"flatdino-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    yield f"s3://{bucket}"
    urllib.request.urlopen(urllib.request.Request(f"{s3_server}/moto-api/reset", method="POST"))


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory) -> Path:
    """A file shaped like pytorch-fid's pt_inception-2015-12-05 weights, with random values
    (small weights, unit BatchNorm statistics, so the features stay finite)."""
    from unittest import mock

    import pytorch_fid.inception as fid_inception
    import torch

    state: dict = {}  # what the published file holds: Inception3's keys

    def record(module, state_dict, *args, **kwargs):
        g = torch.Generator().manual_seed(0)
        for k, v in module.state_dict().items():
            if k.endswith("running_var"):
                v = torch.ones_like(v)
            elif k.endswith("running_mean"):
                v = torch.zeros_like(v)
            elif v.is_floating_point():
                v = 0.05 * torch.randn(v.shape, generator=g)
            state[k] = v

    with (
        mock.patch.object(fid_inception, "load_state_dict_from_url", lambda *a, **k: {}),
        mock.patch.object(torch.nn.Module, "load_state_dict", record),
    ):
        fid_inception.InceptionV3([3])  # builds the architecture; its one load is recorded
    path = tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(state, path)
    return path


def pytest_unconfigure(config):
    # After multiprocessing's own exit work, which removes its folder in there (the socket that
    # hands a shared tensor's file descriptor to another process, `resource_sharer`) and fails
    # loudly when it is gone: its finalizers run in decreasing priority, that folder's at -100.
    from multiprocessing.util import Finalize

    Finalize(None, shutil.rmtree, (tempfile.tempdir, True), exitpriority=-200)
