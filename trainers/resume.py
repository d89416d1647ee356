"""Resuming a run: the checkpoint to continue, its weights, optimiser, RNG and data position.

The position (epoch, micro step) belongs to the data order of the ranks that saved it. Resumed
with the same global --batch-size and --seed:
- same ranks, same --micro-batch: exactly where it stopped (bit-identical on CPU);
- same ranks, another --micro-batch: the same place in each rank's sample stream (the micro step
  is converted; each rank's order does not depend on the micro batch);
- another number of ranks: at an epoch boundary, the next epoch as the new ranks deal it; from
  the middle of an epoch, the start of the next one (the rest of the interrupted epoch is
  skipped and said so: each epoch's order depends on the ranks, and no row may be seen twice).
  Every rank then starts a new RNG stream from (seed, step, world, rank).
Every rank must find the same checkpoint step (a checkpoint on a disk some ranks cannot see is
refused, never one rank resuming while another starts fresh).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from ..pipeline.checkpoints import read_json
from ..pipeline.errors import FlatDinoError
from .runner import RESUME_FIX, Dist, load_trainer_state, load_weights

log = logging.getLogger("flatdino.train")


def map_position(saved: dict, setup: dict, position: dict) -> tuple[dict, str | None]:
    """The loop position of a checkpoint made under `saved` (run_setup) for a run under `setup`:
    (position, a note for the log or None). Refuses what cannot be continued."""
    changed = [k for k in ("batch_size", "seed") if saved.get(k, setup[k]) != setup[k]]
    if changed:
        what = ", ".join(f"{k} {saved[k]} (now {setup[k]})" for k in changed)
        raise FlatDinoError(
            f"the checkpoint was trained with {what}; resume with the same --batch-size and --seed "
            "(the number of ranks and --micro-batch may change)"
        )
    position = dict(position)
    old_world, old_micro = (
        saved.get("world", setup["world"]),
        saved.get("micro_batch", setup["micro_batch"]),
    )
    if old_world == setup["world"]:
        samples = position["micro_step"] * old_micro  # this rank's place in its sample stream
        position["micro_step"] = samples // setup["micro_batch"]
        if samples % setup["micro_batch"]:  # cannot happen at an optimiser step; guard anyway
            raise FlatDinoError("the checkpoint's position does not fall on a whole micro batch")
        return position, None
    if position["micro_step"] == 0:
        return (
            position,
            f"continuing epoch {position['epoch']} on {setup['world']} ranks (saved on {old_world})",
        )
    skipped = position["epoch"]
    position.update(epoch=skipped + 1, micro_step=0)
    note = (
        f"saved on {old_world} ranks in the middle of epoch {skipped}, resumed on "
        f"{setup['world']} ranks: the rest of epoch {skipped} is skipped (each epoch's order depends "
        f"on the ranks; no row is seen twice); continuing with epoch {skipped + 1}"
    )
    return position, note


def _set_rng_state(rngs: list[dict] | dict, d: Dist, seed: int, step: int) -> None:
    """Each rank's saved RNG state; under another number of ranks, new streams for all of them
    from (seed, step, world, rank): deterministic, and different per rank."""
    rngs = [rngs] if isinstance(rngs, dict) else rngs  # dict: an older single-process checkpoint
    if len(rngs) != d.world:
        torch.manual_seed(
            int(np.random.SeedSequence([seed, step, d.world, d.rank]).generate_state(1)[0])
        )
        return
    state = rngs[d.rank]
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():  # cuda-only: the GPUs' random generators
        torch.cuda.set_rng_state_all(state["cuda"])


def _agree(step: int | None, where: Path, d: Dist) -> None:
    """Every rank found the same checkpoint step (None: none), or a one-line error on all."""
    if d.world == 1:
        return
    found: list = [None] * d.world
    dist.all_gather_object(found, (step, str(where)))
    if len({s for s, _ in found}) > 1:
        seen = "; ".join(
            f"rank {r}: {'no checkpoint' if s is None else f'step {s}'} in {w}"
            for r, (s, w) in enumerate(found)
        )
        raise FlatDinoError(
            f"the ranks do not agree on where to resume ({seen}); put the run folder on a "
            "filesystem that every node reads, or pass --resume-from with a path every rank sees"
        )


def keep_finished(out: Path, resume_from: Path, d: Dist) -> None:
    """Before a run continues from another checkpoint (--resume-from RUN/pre-decay), keep the
    run's own latest checkpoint as RUN/steps/NNNNNNN: the continuation rewrites checkpoints/."""
    own = out / "checkpoints"
    if not d.main or not (own / "trainer.pt").exists() or own.resolve() == resume_from.resolve():
        return
    step = int(load_trainer_state(own)["state"]["step"])
    kept = out / "steps" / f"{step:07d}"
    if not kept.exists():
        tmp = kept.with_name(f".{kept.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(own, tmp)
        os.replace(tmp, kept)
        log.info(
            "kept the checkpoint of step %d as %s before continuing from %s",
            step,
            kept,
            resume_from,
        )


def resume_run(
    resume_from: str | None,
    out: Path,
    model: nn.Module,
    model_config: dict,
    opt: torch.optim.Optimizer,
    state: dict,
    d: Dist,
    setup: dict,
    extra_weights: dict[str, nn.Module] | None = None,
) -> None:
    """Load weights (+ extras such as the EMA), optimiser, RNG and loop position.

    From `resume_from` when given (e.g. RUN/pre-decay, to extend a run), else RUN/checkpoints (or
    the previous one, kept as .checkpoints.old while a save was swapping it in); a run that never
    reached a checkpoint starts from scratch. The position is mapped to this run's ranks and micro
    batch (`map_position`); every rank must find the same checkpoint.
    """
    resume_dir = Path(resume_from) if resume_from else out / "checkpoints"
    if not resume_dir.exists() and not resume_from and (out / ".checkpoints.old").exists():
        resume_dir = out / ".checkpoints.old"  # killed between the two renames of a save
    if not resume_dir.exists():
        if resume_from:
            raise FlatDinoError(f"--resume-from {resume_from!r} does not exist")
        _agree(None, resume_dir, d)
        return
    saved_cfg = read_json(resume_dir / "config.json", RESUME_FIX)
    if saved_cfg != model_config:
        keys = sorted(
            k for k in {*saved_cfg, *model_config} if saved_cfg.get(k) != model_config.get(k)
        )
        differ = ", ".join(f"{k} {saved_cfg.get(k)!r}, now {model_config.get(k)!r}" for k in keys)
        raise FlatDinoError(
            f"checkpoint {str(resume_dir)!r} holds a model that does not match this store and "
            f"preset ({differ}); resume with the same store, preset and model options (train-dit: "
            "--cls)"
        )
    saved = load_trainer_state(resume_dir)
    _agree(int(saved["state"]["step"]), resume_dir, d)
    try:
        position, note = map_position(saved.get("setup", setup), setup, saved["state"])
    except FlatDinoError as e:
        raise FlatDinoError(f"checkpoint {str(resume_dir)!r}: {e}") from None
    load_weights(resume_dir, model)
    for name, module in (extra_weights or {}).items():
        load_weights(resume_dir, module, name)
    opt.load_state_dict(saved["optimizer"])
    _set_rng_state(saved["rng"], d, setup["seed"], int(position["step"]))
    state.update(position)
    log.info("resumed from %s at step %d", resume_dir, state["step"])
    if note:
        log.warning("resume: %s", note)
