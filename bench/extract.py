"""Steady-state images/s of the whole extract-features job against its slowest stage alone.

Backbone-bound (tiny and ViT-B): the job against the worker's compute alone (`embed_views` on
already-decoded crops: views made and embedded, same batches). Decode-bound (tiny backbone, Ray):
the job with 1 and 2 decode tasks per core against `decode_shard` alone in this process (one core)
times the machine's cores; the goal is a ratio >= 0.8. Without a GPU the worker's compute
shares those cores, so the decode-bound case also prints the job against that CPU ceiling
(1 / (1/(decode x cores) + 1/worker alone)), and the engine feeding a worker that only reads
its crops (an infinitely fast GPU: what the decode pool alone delivers). Also the bytes a decode task ships to an actor per
image, from the arrays produced: float32 views before, uint8 crops now.

All sides see the same JPEG photos (scikit-image's samples, 300x451 to 1000x872, repeated). The
job's figure excludes start-up (Ray, model load): it counts images from the first finished shard
on. Prints ratios measured side by side in one run; it gates nothing.

    python bench/extract.py                      # all three cases
    python bench/extract.py --cases decode --decode-per-cpu 1,2,3
    python bench/extract.py --cases tiny,vitb --vitb-images 32 --backends local
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from flatdino.models.dinov2 import BACKBONES, build_vit
from flatdino.pipeline.backbone import load_backbone
from flatdino.pipeline.engine import ACTOR_CPUS, Placement, run_shards
from flatdino.pipeline.extract import (
    DecodedShard,
    ExtractConfig,
    decode_job,
    decode_shard,
    embed_views,
    extract_features,
)
from flatdino.pipeline.preprocess import ViewRecipe, make_views
from flatdino.pipeline.sources import open_source
from flatdino.pipeline.store import Shard, shard_bounds


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


def decode_first(cfg: ExtractConfig, stop: int | None = None) -> DecodedShard:
    """`decode_shard` over images [0, stop) of `cfg.data` (default: all) as one shard."""
    source = open_source(cfg.data)
    stop = len(source) if stop is None else min(stop, len(source))
    recipe = ViewRecipe(views=cfg.views, seed=cfg.view_seed)
    paths = list(source.paths[:stop])
    return decode_shard(source.kind, source.root, paths, Shard(0, 0, stop), recipe)


def backbone_alone(cfg: ExtractConfig, steady_from: int) -> float:
    """images/s of the worker's compute on pre-decoded crops of the same images, same batching."""
    torch.set_num_threads(cfg.torch_threads or os.cpu_count() or 1)
    d = decode_first(cfg)
    model, _ = load_backbone(cfg.backbone, cfg.weights)
    device, n = torch.device("cpu"), cfg.shard_size

    def embed(lo: int) -> None:
        idx = d.indices[lo : lo + n]
        embed_views(
            model, d.crops[lo : lo + n], idx, d.recipe, cfg.batch_size, torch.float32, device
        )

    embed(0)  # warm-up
    start = time.perf_counter()
    for lo in range(steady_from, len(d.crops), n):  # the shards the job's figure counts
        embed(lo)
    return (len(d.crops) - steady_from) / (time.perf_counter() - start)


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
        data=str(data),
        out="",
        backbone=name,
        weights=weights,
        batch_size=32,
        shard_size=16,
        progress=False,
        overwrite=True,
    )
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


def decode_alone(cfg: ExtractConfig, steady_from: int) -> float:
    """images/s of `decode_shard` in this process, shard by shard: one core (PIL and numpy decode,
    crop and stack on the calling thread)."""
    source = open_source(cfg.data)
    job = decode_job(source, ViewRecipe(views=cfg.views, seed=cfg.view_seed), _FreeWorker, ())
    shards = [s for s in shard_bounds(len(source), cfg.shard_size) if s.start >= steady_from]
    start = time.perf_counter()
    for s in shards:
        job.prepare(*job.prepare_args(s))
    return sum(s.stop - s.start for s in shards) / (time.perf_counter() - start)


def shipped_bytes(cfg: ExtractConfig) -> tuple[float, float]:
    """Bytes per image a decode task hands to an actor, from one shard's arrays: (float32 views as
    decode_shard made them before, with make_views per image; the uint8 crops it ships now)."""
    d = decode_first(cfg, cfg.shard_size)
    pairs = zip(d.crops, d.indices, strict=True)
    views = np.stack([make_views(crop, int(i), d.recipe).numpy() for crop, i in pairs])
    return views.nbytes / len(views), d.crops.nbytes / len(d.crops)


class _FreeWorker:
    """A worker whose device is infinitely fast: it only reads the crops it is handed, so the job's
    rate is what the decode pool delivers (what a GPU actor would see)."""

    def __call__(self, decoded: DecodedShard) -> int:
        decoded.crops[:, ::32, ::32].sum()  # touch the crops' pages, as a copy to a GPU would
        return len(decoded.crops)


def pool_alone(cfg: ExtractConfig, per_cpu: int) -> float:
    """images/s of the Ray engine feeding `_FreeWorker` from `decode_shard` tasks, from the first
    finished shard on (Ray started, actor placed before the clock runs)."""
    import ray

    source = open_source(cfg.data)
    job = decode_job(source, ViewRecipe(views=cfg.views, seed=cfg.view_seed), _FreeWorker, ())
    shards = shard_bounds(len(source), cfg.shard_size)
    placement = Placement("ray", workers=1, num_gpus_per_worker=0, decode_per_cpu=per_cpu)
    ray.init(include_dashboard=False, logging_level="ERROR")
    try:
        images, start = 0, None
        for n in run_shards(job, shards, placement):
            if start is None:
                start = time.perf_counter()
            else:
                images += n
        return images / (time.perf_counter() - start)
    finally:
        ray.shutdown()


def measure_decode(images: int, per_cpu: list[int], work: Path, repeats: int) -> dict:
    """The tiny backbone on Ray (a local instance with every core), decode the slowest stage."""
    data = make_folder(work / "images-decode", images)
    base = ExtractConfig(
        data=str(data),
        out=str(work / "decode.zarr"),
        backbone="tiny",
        batch_size=32,
        shard_size=16,
        backend="ray",
        progress=False,
        overwrite=True,
    )
    cores = os.cpu_count() or 1
    runs = {
        "decode_1core": lambda: decode_alone(base, steady_from=base.shard_size),
        "worker_alone": lambda: backbone_alone(base, steady_from=base.shard_size),
    }
    for k in per_cpu:
        runs[f"job_k{k}"] = lambda k=k: job(dataclasses.replace(base, decode_per_cpu=k))
        runs[f"pool_k{k}"] = lambda k=k: pool_alone(base, k)
    best: dict[str, float] = {}
    for _ in range(repeats):
        for key, run in runs.items():
            best[key] = max(best.get(key, 0.0), run())
    before, after = shipped_bytes(base)
    row = {"images": images, "views": base.views, "cores": cores, **best}
    row.update(bytes_per_image_views=before, bytes_per_image_crops=after)
    # Without a GPU the worker's views and backbone take the same cores as decoding: per image,
    # 1/(decode x cores) + 1/worker seconds at best, whatever the overlap
    row["cpu_ceiling"] = 1 / (1 / (row["decode_1core"] * cores) + 1 / row["worker_alone"])
    for k in per_cpu:
        row[f"ratio_k{k}"] = row[f"job_k{k}"] / (row["decode_1core"] * cores)
        row[f"ceiling_ratio_k{k}"] = row[f"job_k{k}"] / row["cpu_ceiling"]
        row[f"pool_ratio_k{k}"] = row[f"pool_k{k}"] / (row["decode_1core"] * cores)
        free = max(cores - ACTOR_CPUS, 1)  # the cores the actor leaves to decode tasks
        row[f"pool_free_ratio_k{k}"] = row[f"pool_k{k}"] / (row["decode_1core"] * free)
    return row


def print_rows(rows: list[dict], backends: list[str]) -> None:
    print(
        f"{'backbone':20s} {'images':>6s} {'alone img/s':>11s}",
        *(f"{'job ' + b:>10s} {'ratio':>6s}" for b in backends),
    )
    for r in rows:
        cells = (f"{r[f'job_{b}']:10.2f} {r[f'ratio_{b}']:6.3f}" for b in backends)
        print(f"{r['backbone']:20s} {r['images']:6d} {r['backbone_alone']:11.2f}", *cells)


def print_decode(r: dict, per_cpu: list[int]) -> None:
    cores, alone = r["cores"], r["decode_1core"]
    print(
        f"decode-bound: tiny backbone, Ray, {r['images']} images, V={r['views']}: decode_shard "
        f"alone {alone:.2f} img/s on 1 core x {cores} cores = {alone * cores:.2f} img/s; "
        f"worker alone {r['worker_alone']:.2f} img/s; CPU ceiling {r['cpu_ceiling']:.2f} img/s"
    )
    print(
        f"{'decode tasks/core':>17s} {'job img/s':>10s} {'ratio':>6s} {'/ceiling':>8s} "
        f"{'free-worker img/s':>17s} {'ratio':>6s} {'/free cores':>11s}  "
        "(ratio: / (decode x cores), goal >= 0.8)"
    )
    for k in per_cpu:
        print(
            f"{k:17d} {r[f'job_k{k}']:10.2f} {r[f'ratio_k{k}']:6.3f} "
            f"{r[f'ceiling_ratio_k{k}']:8.3f} {r[f'pool_k{k}']:17.2f} "
            f"{r[f'pool_ratio_k{k}']:6.3f} {r[f'pool_free_ratio_k{k}']:11.3f}"
        )
    before, after = r["bytes_per_image_views"], r["bytes_per_image_crops"]
    print(
        f"shipped per image, decode task -> actor: float32 views {before:,.0f} B before, "
        f"uint8 crop {after:,.0f} B now ({before / after:.2f}x less)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", default="tiny,vitb,decode", help="any of tiny, vitb, decode")
    parser.add_argument("--tiny-images", type=int, default=512)
    parser.add_argument("--vitb-images", type=int, default=64)
    parser.add_argument("--decode-images", type=int, default=2048)
    parser.add_argument("--decode-per-cpu", default="1,2", help="decode tasks per core to run")
    parser.add_argument("--backends", default="local,ray")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs per side")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    cases, backends = args.cases.split(","), args.backends.split(",")
    per_cpu = [int(k) for k in args.decode_per_cpu.split(",")]
    rows, decode = [], None
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "tiny" in cases:
            rows.append(measure("tiny", args.tiny_images, None, backends, work, args.repeats))
        if "vitb" in cases:  # ViT-B with random weights (no hub here): the real backbone's compute
            from safetensors.torch import save_file

            vitb = work / "vitb-random.safetensors"
            save_file(build_vit(BACKBONES["dinov2-vitb14-reg"]).state_dict(), vitb)
            rows.append(
                measure(
                    "dinov2-vitb14-reg", args.vitb_images, str(vitb), backends, work, args.repeats
                )
            )
        if "decode" in cases:
            decode = measure_decode(args.decode_images, per_cpu, work, args.repeats)
    if rows:
        print_rows(rows, backends)
    if decode:
        print_decode(decode, per_cpu)
    print(
        f"cpu threads: {torch.get_num_threads()}  cores: {os.cpu_count()}  torch {torch.__version__}"
    )
    if args.json:
        args.json.write_text(json.dumps({"backbone_bound": rows, "decode_bound": decode}, indent=2))


if __name__ == "__main__":
    main()
