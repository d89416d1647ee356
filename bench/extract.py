"""Steady-state images/s of the whole extract-features job against the backbone alone.

Both sides see the same JPEG photos (scikit-image's samples, repeated), the same views and the
same batch size; the backbone-alone side starts from already-decoded tensors. The job's figure
excludes start-up (Ray, model load): it counts images from the first finished shard on. Prints
ratios measured side by side in one run; it gates nothing.

    python bench/extract.py                      # tiny and ViT-B (random weights), local and Ray
    python bench/extract.py --vitb-images 32 --backends local
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from flatdino.models.dinov2 import BACKBONES, build_vit
from flatdino.pipeline.backbone import load_backbone
from flatdino.pipeline.extract import ExtractConfig, decode_shard, embed_views, extract_features
from flatdino.pipeline.preprocess import ViewRecipe
from flatdino.pipeline.sources import open_source
from flatdino.pipeline.store import Shard


def make_folder(root: Path, n: int) -> Path:
    """n JPEGs in 2 classes, cycling through scikit-image's colour sample photos."""
    from skimage import data

    photos = [
        data.astronaut(),
        data.coffee(),
        data.chelsea(),
        data.rocket(),
        data.hubble_deep_field(),
    ]
    for i in range(n):
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photos[i % len(photos)]).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def backbone_alone(cfg: ExtractConfig, steady_from: int) -> float:
    """images/s of the backbone on pre-decoded views of the same images, same batching."""
    torch.set_num_threads(cfg.torch_threads or os.cpu_count() or 1)
    source = open_source(cfg.data)
    recipe = ViewRecipe(views=cfg.views)
    pixels = decode_shard(
        source.kind, source.root, list(source.paths), Shard(0, 0, len(source)), recipe
    ).pixels
    model, _ = load_backbone(cfg.backbone, cfg.weights)
    device = torch.device("cpu")
    embed_views(model, pixels[: cfg.shard_size], cfg.batch_size, torch.float32, device)  # warm-up
    start = time.perf_counter()
    for lo in range(steady_from, len(pixels), cfg.shard_size):  # the shards the job's figure counts
        embed_views(model, pixels[lo : lo + cfg.shard_size], cfg.batch_size, torch.float32, device)
    return (len(pixels) - steady_from) / (time.perf_counter() - start)


def job(cfg: ExtractConfig) -> float:
    if cfg.backend == "ray":
        import ray

        ray.init(include_dashboard=False, logging_level="ERROR")
        try:
            return extract_features(cfg).steady_images_per_s
        finally:
            ray.shutdown()
    return extract_features(cfg).steady_images_per_s


def measure(
    name: str, images: int, weights: str | None, backends: list[str], work: Path, repeats: int
) -> dict:
    """Best of `repeats` for each side, interleaved, so that machine noise hits all sides alike."""
    data = make_folder(work / f"images-{name}", images)
    base = ExtractConfig(
        data=str(data), out="", backbone=name, weights=weights, batch_size=32, shard_size=16,
        progress=False, overwrite=True,
    )  # fmt: skip
    row = {"backbone": name, "images": images, "views": base.views, "batch_size": base.batch_size}
    best: dict[str, float] = {}
    for _ in range(repeats):
        runs = {"backbone_alone": lambda: backbone_alone(base, steady_from=base.shard_size)}
        for b in backends:
            out = str(work / f"{name}-{b}.zarr")
            runs[f"job_{b}"] = lambda b=b, out=out: job(
                dataclasses.replace(base, backend=b, out=out)
            )
        for key, run in runs.items():
            best[key] = max(best.get(key, 0.0), run())
    row.update(best)
    for b in backends:
        row[f"ratio_{b}"] = row[f"job_{b}"] / row["backbone_alone"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny-images", type=int, default=512)
    parser.add_argument("--vitb-images", type=int, default=64)
    parser.add_argument("--backends", default="local,ray")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs per side")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    backends = args.backends.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows.append(measure("tiny", args.tiny_images, None, backends, work, args.repeats))
        # ViT-B with random weights (no hub here): same compute as the real backbone
        from safetensors.torch import save_file

        vitb = work / "vitb-random.safetensors"
        save_file(build_vit(BACKBONES["dinov2-vitb14-reg"]).state_dict(), vitb)
        rows.append(
            measure("dinov2-vitb14-reg", args.vitb_images, str(vitb), backends, work, args.repeats)
        )
    print(
        f"{'backbone':20s} {'images':>6s} {'alone img/s':>11s}",
        *(f"{'job ' + b:>10s} {'ratio':>6s}" for b in backends),
    )
    for r in rows:
        cells = (f"{r[f'job_{b}']:10.2f} {r[f'ratio_{b}']:6.3f}" for b in backends)
        print(f"{r['backbone']:20s} {r['images']:6d} {r['backbone_alone']:11.2f}", *cells)
    print(
        f"cpu threads: {torch.get_num_threads()}  cores: {os.cpu_count()}  torch {torch.__version__}"
    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
