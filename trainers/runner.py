"""Trainer machinery shared by the trainers (assembled by trainers/run.py): distributed set-up, the run
folder (config.json, log.txt, metrics.jsonl), checkpoints in safetensors + trainer state, resume.

Run folder:
    RUN/config.json          the trainer config (with the model config inside)
    RUN/log.txt              rank 0's log lines
    RUN/metrics.jsonl        one JSON object per logged step (and per evaluation)
    RUN/checkpoints/         latest: model.safetensors, config.json, trainer.pt (optimiser, step,
                             RNG, data position)
    RUN/best/                best validation loss so far (model + config)
    RUN/pre-decay/           the state at the start of the LR decay, to extend a run later
A checkpoint directory is written beside its final name and renamed over it, so a crash never
leaves a half-written checkpoint and the last good one stays intact.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors.torch import save_file

from ..pipeline.checkpoints import read_torch, read_weights
from ..pipeline.env import resolve_device
from ..pipeline.errors import FlatDinoError

log = logging.getLogger("flatdino.train")


class NonFiniteLossError(FlatDinoError):
    """The loss became NaN or inf; the last good checkpoint is kept."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step  # the first non-finite optimiser step (0-based)


@dataclass(frozen=True)
class Dist:
    """This process's place in the job (single process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this run created the process group (and destroys it at the end)
    timeout: timedelta = timedelta(minutes=10)  # --dist-timeout of every wait on another rank
    store: Any = None  # rendezvous store of the group this run made: the roll call meets there

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto", timeout_s: float = 600) -> Dist:
    """Join the torchrun group when launched by torchrun (gloo on CPU, nccl on CUDA), every wait
    on another rank bounded by `timeout_s` (--dist-timeout; trainers/waits.py names a rank that
    does not answer).

    One process: `--device cuda:N` is that GPU. Under torchrun each rank takes cuda:LOCAL_RANK, so
    a fixed cuda:N there (every rank on one GPU) is refused."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    timeout = timedelta(seconds=timeout_s)
    dev = resolve_device(device)  # a CUDA device that is not there is a one-line error
    if dev.type == "cuda":
        if world > 1 and dev.index is not None:
            raise FlatDinoError(
                f"--device {device} under torchrun: each rank uses cuda:LOCAL_RANK; pass --device "
                "auto or cuda (choose the GPUs with CUDA_VISIBLE_DEVICES)"
            )
        dev = torch.device("cuda", local if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    owns = world > 1 and not dist.is_initialized()
    store = None
    if owns:
        if dev.type == "cuda":  # cuda-only: the NCCL group of a multi-GPU run
            nccl_raises_on_timeout()
        store, rank, world = next(dist.rendezvous("env://", rank, world, timeout=timeout))
        store.set_timeout(timeout)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    return Dist(rank, world, dev, owns, timeout, store)


def nccl_raises_on_timeout() -> None:
    """NCCL collectives run on the GPU and the host does not wait for them, so NCCL's timeout is
    kept by a watchdog thread. By default (TORCH_NCCL_ASYNC_ERROR_HANDLING=3) it ends the process
    at the timeout, without a word from us; 2 makes it abort the communicators only, so the next
    collective raises in Python and the roll call can name the rank that is missing. A value the
    user set is kept. (Blocking wait would also raise, at the cost of a host sync per collective.)"""
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")


def teardown_distributed(d: Dist) -> None:
    """Leave the torchrun group at the end of a run (NCCL warns about, and may hang on, a group
    that is never destroyed); a group the caller made is the caller's."""
    if d.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, d: Dist, compile: bool) -> nn.Module:
    """The module the loop calls: DDP across ranks, then torch.compile when asked."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    net = DDP(model) if d.world > 1 else model
    return torch.compile(net) if compile else net


def split_batch(batch_size: int, micro_batch: int | None, d: Dist) -> tuple[int, int]:
    """(per-device micro batch, accumulation steps) that make up the global --batch-size."""
    micro = micro_batch or batch_size // d.world
    accum = batch_size // max(1, micro * d.world)
    if accum < 1 or micro * d.world * accum != batch_size:
        raise FlatDinoError(
            f"--batch-size {batch_size} must equal micro batch {micro} x {d.world} ranks x k; "
            "change --batch-size or --micro-batch"
        )
    return micro, accum


def all_reduce_mean(value: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= d.world
    return value


def setup_run_dir(out: Path, config: dict, d: Dist, resume: bool) -> None:
    """Create the run folder with config.json (rank 0); refuse a used one unless resuming."""
    if d.main:
        if out.exists() and (out / "config.json").exists() and not resume:
            raise FlatDinoError(
                f"run folder {str(out)!r} holds a run already; pass --resume to continue it or "
                "choose another --out"
            )
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(config, indent=2, default=str))


def append_metrics(out: Path, row: dict, d: Dist) -> None:
    if d.main:
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}


def save_checkpoint(
    path: Path,
    model: nn.Module,
    model_config: dict,
    trainer_state: dict | None,
    d: Dist,
    extra_weights: dict[str, nn.Module] | None = None,
    extra_json: dict[str, dict] | None = None,
) -> None:
    """Write model.safetensors + config.json (+ trainer.pt) to `path` atomically (rank 0).

    `extra_weights` {"ema": module} adds ema.safetensors; `extra_json` {"flow": {...}} adds
    flow.json: what a loader needs beyond the architecture.
    """
    if not d.main:
        return
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_cpu_state(model), tmp / "model.safetensors")
    for name, module in (extra_weights or {}).items():
        save_file(_cpu_state(module), tmp / f"{name}.safetensors")
    (tmp / "config.json").write_text(json.dumps(model_config, indent=2))
    for name, values in (extra_json or {}).items():
        (tmp / f"{name}.json").write_text(json.dumps(values, indent=2))
    if trainer_state is not None:
        torch.save(trainer_state, tmp / "trainer.pt")
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


# A damaged file of the checkpoint being resumed: what the user can do instead.
RESUME_FIX = "resume from another checkpoint with --resume-from, or start again without --resume"


def load_weights(path: Path, model: nn.Module, name: str = "model") -> None:
    state = read_weights(path / f"{name}.safetensors", RESUME_FIX)
    unwrap(model).load_state_dict(state, strict=True)


def load_trainer_state(path: Path) -> dict:
    f = path / "trainer.pt"
    if not f.exists():
        raise FlatDinoError(
            f"{str(path)!r} has no trainer.pt to resume from; start without --resume"
        )
    return read_torch(f, RESUME_FIX)


def seed_ranks(seed: int, d: Dist) -> None:
    """After the model is built (identically) on every rank: one random stream per rank, so ranks
    draw different noise, times and dropout (as DiT's train.py: seed · world + rank)."""
    torch.manual_seed(seed * d.world + d.rank)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # cuda-only: the GPUs' random generators
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def run_setup(batch_size: int, micro: int, seed: int, d: Dist) -> dict:
    """What a saved loop position depends on; resume refuses a different one."""
    return {"batch_size": batch_size, "micro_batch": micro, "world": d.world, "seed": seed}


def trainer_state(opt: torch.optim.Optimizer, state: dict, d: Dist, setup: dict) -> dict:
    """trainer.pt: optimiser, loop position, every rank's RNG state (a collective under DDP), and
    the `setup` (batch sizes, ranks, seed) the position only has a meaning for."""
    rngs = [_rng_state()]
    if d.world > 1:
        rngs = [None] * d.world
        dist.all_gather_object(rngs, _rng_state())
    return {"optimizer": opt.state_dict(), "rng": rngs, "state": dict(state), "setup": setup}
