"""Where a run's metrics and pictures go besides metrics.jsonl: TensorBoard, W&B, or nowhere.

`--log-to auto` (the default) is TensorBoard when its package is installed, else none; asking for a
backend whose package is missing is a one-line error naming the extra to install. Only rank 0
writes. Every picture is also saved as RUN/grids/TAG-STEP.png, for users of neither tool.

TensorBoard writes RUN/tensorboard/ (`tensorboard --logdir RUN`); a resumed run purges the events
after its step, so the curves do not fold back. W&B writes under RUN/wandb/ and never prompts for a
login: it runs online only when the user configured it (WANDB_MODE, WANDB_API_KEY or a netrc entry
for api.wandb.ai), else offline (`wandb sync RUN/wandb/offline-run-*` uploads it later); the run id
is kept in RUN/wandb-id.txt so a resumed run continues the same W&B run.
"""

from __future__ import annotations

import importlib.util
import logging
import netrc
import os
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from ..pipeline.errors import FlatDinoError

log = logging.getLogger("flatdino.train")

LOG_TO = ("auto", "tensorboard", "wandb", "none")
_PACKAGE = {"tensorboard": "tensorboard", "wandb": "wandb"}


class Tracker:
    """The interface, and the `none` backend: pictures go to RUN/grids/ only."""

    name = "none"

    def __init__(self, out: Path):
        self.out = out

    def scalars(self, step: int, values: dict) -> None:
        """Every number of one metrics row (the non-numbers are left out)."""

    def image(self, tag: str, step: int, image: np.ndarray) -> None:
        """A uint8 (H, W, 3) picture; always saved as RUN/grids/TAG-STEP.png."""
        folder = self.out / "grids"
        folder.mkdir(exist_ok=True)
        path = folder / f"{tag.replace('/', '-')}-{step:07d}.png"
        Image.fromarray(image).save(path, compress_level=1)  # fast; the step is waiting

    def close(self) -> None:
        pass


def _numbers(values: dict) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in values.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and k != "step"
    }


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self, out: Path, step: int):
        super().__init__(out)
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run drops the events a killed invocation wrote after its checkpoint
        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=step or None)

    def scalars(self, step: int, values: dict) -> None:
        for k, v in _numbers(values).items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def image(self, tag: str, step: int, image: np.ndarray) -> None:
        super().image(tag, step, image)
        self.writer.add_image(tag, image, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _wandb_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbTracker(Tracker):
    name = "wandb"

    def __init__(self, out: Path, config: dict, project: str):
        super().__init__(out)
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("online" if _wandb_configured() else "offline")
        id_file = out / "wandb-id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        self.wandb = wandb
        self.run = wandb.init(
            project=project,
            name=out.name,
            id=run_id,
            resume="allow",
            dir=str(out),
            config=config,
            mode=mode,
        )
        log.info("W&B run %s (%s) in %s", run_id, mode, out / "wandb")

    def scalars(self, step: int, values: dict) -> None:
        self.run.log(_numbers(values), step=step)

    def image(self, tag: str, step: int, image: np.ndarray) -> None:
        super().image(tag, step, image)
        self.run.log({tag: self.wandb.Image(image)}, step=step)

    def close(self) -> None:
        self.run.finish()


def resolve_log_to(log_to: str) -> str:
    """The backend `--log-to` names, after checking that its package is there."""
    if log_to not in LOG_TO:
        raise FlatDinoError(f"--log-to must be one of {', '.join(LOG_TO)}; got {log_to!r}")
    if log_to == "auto":
        return "tensorboard" if importlib.util.find_spec("tensorboard") else "none"
    if log_to != "none" and importlib.util.find_spec(_PACKAGE[log_to]) is None:
        raise FlatDinoError(
            f"--log-to {log_to} needs the {log_to} package; install it with "
            f"`pip install 'flatdino[{log_to}]'`, or pass --log-to none"
        )
    return log_to


def open_tracker(
    log_to: str, out: Path, config: dict, step: int, main: bool, project: str = "flatdino"
) -> Tracker:
    """The tracker of rank 0 (the other ranks get one that writes nothing)."""
    backend = resolve_log_to(log_to)
    if not main:
        return _Silent(out)
    if backend == "tensorboard":
        return TensorBoardTracker(out, step)
    if backend == "wandb":
        return WandbTracker(out, config, project)
    return Tracker(out)


class _Silent(Tracker):
    def image(self, tag: str, step: int, image: np.ndarray) -> None:
        pass


def plot_curves(run: Path) -> Path:
    """RUN/curves.png: every metric of RUN/metrics.jsonl against the step, one panel each (loss,
    lr and grad-norm first, then validation and FD); a step logged twice (a resumed run repeats
    the steps after its checkpoint) keeps its last value."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = run / "metrics.jsonl"
    if not path.exists():
        raise FlatDinoError(f"{str(run)!r} has no metrics.jsonl to plot; pass a run folder")
    series: dict[str, dict[int, float]] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        for key, value in _numbers(row).items():
            if key not in ("epoch", "samples_per_s", "sample_seconds"):
                series.setdefault(key, {})[int(row["step"])] = value
    if not series:
        raise FlatDinoError(f"{str(path)!r} holds no metrics yet; plot after the first log step")
    first = [k for k in ("loss", "lr", "grad_norm") if k in series]
    names = first + sorted(k for k in series if k not in first)
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        steps = sorted(series[name])
        ax.plot(steps, [series[name][s] for s in steps], marker="." if len(steps) < 30 else None)
        ax.set_title(name)
        ax.set_xlabel("step")
        if name in ("loss", "val_mse") and min(series[name].values()) > 0:
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.suptitle(run.name)
    fig.tight_layout()
    out = run / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
