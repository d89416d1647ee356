"""`flatdino eval fid` on generated-size sets: seconds and peak memory against the set's size.

Writes samples.npz files of N uint8 256 x 256 images (natural-image crops from scikit-image,
shifted per image) for each N, then runs `flatdino eval fid --real A --fake A` in a fresh process
(FD-DINOv2 with the tiny backbone, so the networks do not hide the reading) and reads its peak
resident memory. With streaming, memory stays flat as N grows; a reader that loads the whole set
needs N x 196 KiB per side.

    python bench/eval_fid.py [--sizes 2000,10000] [--space dinov2] [--precision-recall]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image


def write_samples(path: Path, n: int) -> None:
    """An uncompressed samples.npz of n images, written row block by row block."""
    from skimage import data

    base = [
        np.asarray(Image.fromarray(im).resize((384, 384)))
        for im in (data.astronaut(), data.coffee(), data.chelsea(), data.rocket())
    ]
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w") as z:
        with z.open("labels.npy", "w") as f:
            np.lib.format.write_array(f, np.zeros(n, np.int64))
        with z.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_2_0(
                f, {"descr": "|u1", "fortran_order": False, "shape": (n, 256, 256, 3)}
            )
            for i in range(n):
                top, left = rng.integers(0, 128, size=2)
                f.write(
                    np.ascontiguousarray(base[i % 4][top : top + 256, left : left + 256]).tobytes()
                )


def run(path: Path, args) -> tuple[float, float]:
    cmd = [
        sys.executable,
        "-c",
        "import resource, sys; from flatdino.cli.main import main; "
        "sys.argv = ['flatdino'] + sys.argv[1:]\ntry: main()\nfinally: "
        "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)",
        "eval",
        "fid",
        "--real",
        str(path),
        "--fake",
        str(path),
        "--space",
        args.space,
        "--backbone",
        "tiny",
        "--device",
        "cpu",
        "--no-progress",
    ]
    if args.precision_recall:
        cmd.append("--precision-recall")
    tic = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - tic
    peak_kib = int(done.stderr.rsplit("PEAK", 1)[1].split()[0])
    return seconds, peak_kib / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2000,10000")
    parser.add_argument("--space", default="dinov2")
    parser.add_argument("--precision-recall", action="store_true")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="flatdino-bench-fid-") as tmp:
        for n in (int(s) for s in args.sizes.split(",")):
            path = Path(tmp) / f"samples-{n}.npz"
            write_samples(path, n)
            rows.append((n, path.stat().st_size / 2**30, *run(path, args)))
            path.unlink()
    print(
        f"flatdino eval fid, the same samples.npz as --real and --fake, --space {args.space} "
        "(tiny backbone), CPU"
    )
    print(f"  {'images':>7}  {'npz GiB':>7}  {'seconds':>8}  {'images/s':>8}  {'peak GiB':>8}")
    for n, size, seconds, peak in rows:
        print(f"  {n:7d}  {size:7.2f}  {seconds:8.1f}  {2 * n / seconds:8.1f}  {peak:8.2f}")
    (n0, _, _, p0), (n1, _, _, p1) = rows[0], rows[-1]
    print(f"  {n1 / n0:.1f}x the images: {p1 / p0:.2f}x the peak memory")


if __name__ == "__main__":
    main()
