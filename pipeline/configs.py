"""The configs of the pipeline's commands (extract-features, encode-latents, import-official), each
field an option with its default and help (pipeline/options.py). No torch: the CLI builds its
options from these classes; extract.py, encode.py and official.py re-export them."""

from __future__ import annotations

from dataclasses import dataclass

from ..models.configs import BACKBONES
from .options import (
    BACKEND_HELP,
    BACKENDS,
    DEVICE_HELP,
    GPUS_HELP,
    PRECISION_HELP,
    PROGRESS_HELP,
    RAY_ADDRESS_HELP,
    STORE_URL,
    WORKERS_HELP,
    internal,
)
from .options import option as opt

FEATURE_DTYPES = ("float16", "int8")  # how a feature store holds features (pipeline/quantise.py)


@dataclass(frozen=True)
class ExtractConfig:
    """Everything `extract_features` needs; the CLI only fills it in."""

    data: str = opt(
        help="ImageFolder directory (ROOT/CLASS/IMAGE), Parquet manifest with 'path' and 'label' "
        "columns, or 'digits' (built-in, offline)."
    )
    out: str = opt(help="Feature store to create or resume (Zarr v3)." + STORE_URL)
    split: str = opt(
        "all",
        choices=("all", "train", "val"),
        help="digits: train (80%), val (20%) or all rows of a fixed seeded split. Directories and "
        "manifests: recorded in the store only.",
    )
    backbone: str = opt(
        "dinov2-vitb14-reg",
        choices=BACKBONES,
        help="dinov2-vitb14-reg: DINOv2-B/14 with 4 registers (timm). tiny: same structure, "
        "random weights, for tests and the demo.",
    )
    weights: str | None = opt(  # None: the hub (or the seeded init of tiny)
        None,
        path=True,
        help="Local weights: timm safetensors, original DINOv2 .pth, or a transformers checkpoint "
        "directory. Default: the Hugging Face hub.",
    )
    views: int = opt(
        2,
        min=1,
        help="Views stored per image: 0 centre crop, 1 its flip, >=2 seeded random-resized crops.",
    )
    view_seed: int = opt(0, flags=("--seed",), help="Seed of the random crops of views >= 2.")
    batch_size: int = opt(  # images x views are flattened into batches
        64, min=1, help="Backbone batch size (images x views)."
    )
    shard_size: int = opt(  # = per storage object of the features array
        64, min=8, help="Images per unit of work (resume granularity); a multiple of 8."
    )
    chunk_rows: int = internal(
        1
    )  # images per inner (per-view) chunk of a shard; divides shard_size
    dtype: str = opt(  # how the backbone computes; feature_dtype is how its output is stored
        "fp32",
        choices=("fp32", "bf16"),
        help="Backbone compute precision; bf16 for GPUs.",
    )
    feature_dtype: str = opt(  # in the fingerprint when int8 (float16 stores keep theirs)
        "float16",
        choices=FEATURE_DTYPES,
        help="Stored features: float16, or int8 with one float16 scale per patch vector (0.50 of "
        "the bytes, under 1% relative error; docs/stores.md).",
    )
    cls_token: bool = opt(  # in the fingerprint when True (--no-cls stores keep theirs)
        True,
        flags=("--cls/--no-cls",),
        help="Also keep each view's DINOv2 CLS token (float16, C values; what train-dit --cls "
        "generates beside the latents). --no-cls: patches only, as stores before format 4.",
    )
    device: str = opt("auto", help=DEVICE_HELP)
    backend: str = opt("ray", choices=BACKENDS, help=BACKEND_HELP)
    workers: int = opt(1, min=1, help=WORKERS_HELP)
    num_gpus_per_worker: float | None = opt(None, help=GPUS_HELP)
    torch_threads: int = opt(
        0,
        min=0,
        help="CPU threads per backbone worker; 0: a Ray actor takes cores / workers, "
        "--backend local keeps the process's setting.",
    )
    decode_per_cpu: int = opt(  # speed only: not in the fingerprint
        1,
        min=1,
        flags=("--decode-tasks-per-cpu",),
        help="Ray backend: image-decoding tasks per CPU core the actors leave free (each "
        "asks for 1/N CPU); 2 or more when decoding waits on storage.",
    )
    ray_address: str | None = opt(None, help=RAY_ADDRESS_HELP)
    max_failed_fraction: float = opt(
        0.01,
        min=0.0,
        max=1.0,
        help="Exit 1 when more than this fraction of images fail to decode (they are kept as "
        "invalid rows).",
    )
    overwrite: bool = opt(
        False, flags=("--overwrite",), help="Replace an existing store made with other settings."
    )
    progress: bool = opt(True, help=PROGRESS_HELP)


@dataclass(frozen=True)
class EncodeConfig:
    """Everything `encode_latents` needs; the CLI only fills it in."""

    features: str = opt(help="Feature store to encode (from extract-features)." + STORE_URL)
    vae: str = opt(
        path=True,
        help="train-vae run folder (uses best/, else checkpoints/) or a checkpoint folder.",
    )
    out: str = opt(help="Latents store to create or resume (Zarr v3)." + STORE_URL)
    batch_size: int = opt(256, min=1, help="Encoder batch size (images x views).")
    dtype: str = opt(
        "float32", choices=("float32", "float16"), help="Stored dtype of mu (and logvar)."
    )
    save_logvar: bool = opt(False, flags=("--save-logvar",), help="Also store logvar.")
    device: str = opt("auto", help=DEVICE_HELP)
    precision: str = opt("auto", help=PRECISION_HELP)
    backend: str = opt("ray", choices=BACKENDS, help=BACKEND_HELP)
    workers: int = opt(1, min=1, help=WORKERS_HELP)
    num_gpus_per_worker: float | None = opt(None, help=GPUS_HELP)
    ray_address: str | None = opt(None, help=RAY_ADDRESS_HELP)
    overwrite: bool = opt(
        False,
        flags=("--overwrite",),
        help="Replace an existing store made with another VAE or settings.",
    )
    progress: bool = opt(True, help=PROGRESS_HELP)


@dataclass(frozen=True)
class ImportConfig:
    """Everything `import_official` needs; the CLI only fills it in."""

    checkpoint: str = opt(
        path=True,
        argument=True,
        help="An official FlatDINO orbax checkpoint folder (noctrog/flatdino): ROOT (its "
        "latest step), ROOT/STEP, or a folder of items. A VAE has the items encoder + "
        "decoder, a generator model and model_ema; the config item beside them gives the "
        "architecture (without it the shapes must match a preset).",
    )
    out: str = opt(
        path=True,
        help="Checkpoint folder to write (config.json + safetensors), for encode-latents "
        "--vae, sample --dit / --vae and the evaluations.",
    )
    step: int | None = opt(None, min=0, help="Step of ROOT to import (default: the latest).")
    vae: str | None = opt(
        None,
        path=True,
        help="Generator only: the VAE its latents came from (an imported or trained VAE "
        "folder), recorded so that `sample` needs no --vae.",
    )
    overwrite: bool = opt(
        False, flags=("--overwrite",), help="Replace an --out written by import-official before."
    )
