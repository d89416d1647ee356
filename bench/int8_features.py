"""Features in 8 bits against float16: bytes, error on real photos, and what the VAE learns.

Three measurements, printed side by side (docs/benchmarks.md, "Features in 8 bits"):
  1. error: scikit-image's sample photos (views: centre crop, flip, 2 random crops) through the
     tiny backbone and a random-weight DINOv2-B/14 (the real preset's shape, 768 channels);
     the relative error ||y - x|| / ||x|| against the float32 features x of: float16 (today's
     store), int8 with float16 scales (the store: quantised from its float16 features), int8
     with float32 scales, and the backbone under bf16 autocast (the GPU extraction's own noise);
  2. bytes: the same photos extracted into a float16 and an int8 store with the ViT-B (weights
     as a local file), and the digits stores of 3: features bytes per row-view and store sizes;
  3. learning: the tiny VAE (the demo's recipe, fewer steps) trained on the int8 and on the
     float16 digits stores, same seeds: validation relative error against the float16 val
     features, and k-NN top-1 of its latents (eval knn).

    python bench/int8_features.py [--steps 300] [--out DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from flatdino.eval.knn import knn_eval
from flatdino.models.dinov2 import BACKBONES, DinoPatchFeatures, build_vit
from flatdino.pipeline.checkpoints import load_vae, resolve_vae
from flatdino.pipeline.encode import EncodeConfig, encode_latents
from flatdino.pipeline.extract import ExtractConfig, extract_features
from flatdino.pipeline.feature_store import FeatureStore
from flatdino.pipeline.preprocess import ViewRecipe, adm_center_crop, to_rgb, views_from_crops
from flatdino.pipeline.quantise import dequantise, quantise
from flatdino.trainers.runner import Dist
from flatdino.trainers.train_vae import TrainVAEConfig, evaluate, train_vae

NAMES = (
    "astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "camera", "coins", "horse",
    "immunohistochemistry", "brick", "grass", "gravel", "moon", "page", "text", "clock", "cat",
    "retina", "logo", "colorwheel",
)  # fmt: skip


def photos() -> dict[str, np.ndarray]:
    """The sample photos this scikit-image ships (those that need a download are skipped)."""
    from skimage import data

    out = {}
    for name in NAMES:
        try:
            img = np.asarray(getattr(data, name)())
        except Exception:  # not shipped in the wheel, and no network
            continue
        if img.dtype == bool:
            img = img.astype(np.uint8) * 255
        out[name] = img
    return out


def vitb(path: Path) -> DinoPatchFeatures:
    """A random-weight DINOv2-B/14 (seeded), saved as timm safetensors for --weights."""
    torch.manual_seed(0)
    vit = build_vit(BACKBONES["dinov2-vitb14-reg"])
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, path)
    return DinoPatchFeatures(vit).eval()


def rel(y: np.ndarray, x: np.ndarray) -> float:
    return float(np.linalg.norm(y - x) / np.linalg.norm(x))


def quantise_f32(x: np.ndarray) -> np.ndarray:
    """int8 with float32 scales (the alternative), dequantised."""
    s = np.abs(x).max(-1, keepdims=True) / 127
    return np.clip(np.rint(x / np.where(s > 0, s, 1)), -127, 127) * s


@torch.no_grad()
def errors(model: DinoPatchFeatures, images: list[np.ndarray]) -> dict[str, float]:
    crops = torch.from_numpy(
        np.stack([adm_center_crop(to_rgb(Image.fromarray(i)), 256) for i in images])
    )
    recipe = ViewRecipe(views=4, seed=0)
    views = views_from_crops(crops, np.arange(len(images)), recipe, torch.device("cpu"))
    views = views.flatten(0, 1)  # (n*4, 3, 224, 224)
    x = torch.cat([model(views[i : i + 8]) for i in range(0, len(views), 8)]).numpy()  # fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xb = torch.cat([model(views[i : i + 8]).float() for i in range(0, len(views), 8)]).numpy()
    f16 = x.astype(np.float16)
    q16 = dequantise(quantise(f16))  # what an int8 store holds
    per_vector = np.linalg.norm(q16 - x, axis=-1) / np.linalg.norm(x, axis=-1)
    return {
        "vectors": x.shape[0] * x.shape[1],
        "C": x.shape[-1],
        "max|x|/rms": float((np.abs(x).max(-1) / np.sqrt((x**2).mean(-1))).mean()),
        "float16": rel(f16.astype(np.float32), x),
        "int8 (fp16 scale)": rel(q16, x),
        "int8 (fp32 scale, from fp32)": rel(quantise_f32(x), x),
        "int8 per-vector max": float(per_vector.max()),
        "bf16 backbone": rel(xb, x),
    }


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def store_bytes(path: Path) -> dict[str, float]:
    store = FeatureStore(path)
    rows = store.num_images * store.num_views
    feats = dir_bytes(path / "features") + (
        dir_bytes(path / "feature_scales") if (path / "feature_scales").exists() else 0
    )
    return {"bytes/row-view": feats / rows, "store bytes": dir_bytes(path)}


def extract(data: str, out: Path, dtype: str, **kw) -> Path:
    base = dict(backend="local", batch_size=16, shard_size=16, progress=False, overwrite=True)
    extract_features(ExtractConfig(data=data, out=str(out), feature_dtype=dtype, **base | kw))
    return out


def learning(root: Path, steps: int) -> dict[str, dict]:
    """Tiny VAE on the digits stores of each dtype, same seeds; metrics against float16 val."""
    out = {}
    for dtype in ("float16", "int8"):
        for split in ("train", "val"):
            extract("digits", root / f"{dtype}-{split}.zarr", dtype, split=split, backbone="tiny")
    for dtype in ("float16", "int8"):
        start = time.perf_counter()
        run = root / f"vae-{dtype}"
        train_vae(
            TrainVAEConfig(
                features=str(root / f"{dtype}-train.zarr"),
                out=str(run),
                preset="tiny",
                steps=steps,
                batch_size=32,
                lr=1e-3,
                num_workers=0,
                log_every=10**9,
                ckpt_every=10**9,
                device="cpu",
                progress=False,
            )
        )
        vae = load_vae(resolve_vae(str(run)))[0]
        row = {
            f"val rel err ({v} val)": evaluate(vae, str(root / f"{v}-val.zarr"), Dist(), 64)[
                "val_rel_err"
            ]
            for v in ("float16", "int8")
        }
        for split in ("train", "val"):
            encode_latents(
                EncodeConfig(
                    features=str(root / f"{dtype}-{split}.zarr"),
                    vae=str(run),
                    out=str(root / f"latents-{dtype}-{split}.zarr"),
                    backend="local",
                    device="cpu",
                    progress=False,
                )
            )
        pairs = [
            (str(root / f"{dtype}-train.zarr"), str(root / f"{dtype}-val.zarr")),
            (str(root / f"latents-{dtype}-train.zarr"), str(root / f"latents-{dtype}-val.zarr")),
        ]
        knn = knn_eval(pairs)
        row |= {"knn top1 features": knn[0]["top1"], "knn top1 latents": knn[1]["top1"]}
        row |= {
            f"digits train {k}": v for k, v in store_bytes(root / f"{dtype}-train.zarr").items()
        }
        row["seconds"] = time.perf_counter() - start
        out[dtype] = row
    return out


def show(title: str, table: dict[str, dict]) -> None:
    print(f"\n## {title}")
    cols = list(table)
    keys = list(dict.fromkeys(k for c in cols for k in table[c]))
    print(f"{'':34s}" + "".join(f"{c:>20s}" for c in cols))
    for k in keys:
        cells = [table[c].get(k) for c in cols]
        print(f"{k:34s}" + "".join(f"{v:>20.5g}" if v is not None else f"{'':>20s}" for v in cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300, help="VAE steps per dtype")
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--skip-learning", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    root = Path(args.out or tempfile.mkdtemp(prefix="int8-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    pics = photos()
    print(f"{len(pics)} photos: {', '.join(pics)}")
    from flatdino.pipeline.backbone import load_backbone

    weights = root / "vitb-random.safetensors"
    models = {"tiny": load_backbone("tiny")[0].eval(), "ViT-B (random)": vitb(weights)}
    show(
        "relative error against float32 features",
        {k: errors(m, list(pics.values())) for k, m in models.items()},
    )

    folder = root / "photos"
    for i, (name, img) in enumerate(pics.items()):
        (folder / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(to_rgb(Image.fromarray(img)))).save(
            folder / f"c{i % 2}" / f"{name}.png"
        )
    sizes, stores = {}, {}
    for dtype in ("float16", "int8"):
        stores[dtype] = extract(
            str(folder), root / f"photos-{dtype}.zarr", dtype, weights=str(weights)
        )
        sizes[dtype] = store_bytes(stores[dtype])
    a, b = FeatureStore(stores["float16"]).features[:], FeatureStore(stores["int8"]).features[:]
    sizes["int8"]["rel err vs float16 store"] = rel(b, a.astype(np.float32))
    sizes["int8 / float16"] = {k: sizes["int8"][k] / sizes["float16"][k] for k in sizes["float16"]}
    show("ViT-B stores of the photos (2 views)", sizes)

    if not args.skip_learning:
        table = learning(root, args.steps)
        table["int8 / float16"] = {
            k: table["int8"][k] / table["float16"][k] for k in table["float16"] if "bytes" in k
        }
        show(f"tiny VAE on digits, {args.steps} steps, same seeds", table)


if __name__ == "__main__":
    main()
