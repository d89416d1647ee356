"""The generator bundle of `flatdino sample` and `flatdino sweep-cfg`, built from run folders:
the DiT (EMA or raw weights) with its flow settings and latent normalisation, the VAE its latents
came from (checked by checksum), an optional pixel decoder and an optional AutoGuidance guide,
each checked against the others. Nothing needs an option typed again: the DiT's flow.json names
the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..pipeline.checkpoints import (
    FlowRecord,
    load_dit,
    load_pixel_decoder,
    load_vae,
    resolve_checkpoint,
    resolve_vae,
)
from ..pipeline.errors import FlatDinoError
from ..pipeline.generate import Generator


@dataclass
class Bundle:
    """The networks of the chain (on the CPU until moved) and where each came from."""

    gen: Generator
    flow: FlowRecord  # the DiT's flow.json
    dit_ckpt: Path
    vae_ckpt: Path
    decoder_path: Path | None  # a checkpoint folder, or RAE's model.pt
    guide_ckpt: Path | None

    @property
    def checkpoints(self) -> list[Path]:
        """The DiT's, the VAE's, the decoder's and the guide's, those there are."""
        extra = [p for p in (self.decoder_path, self.guide_ckpt) if p is not None]
        return [self.dit_ckpt, self.vae_ckpt, *extra]


def load_bundle(
    dit: str,
    ema: bool = True,
    vae: str | None = None,
    decoder: str | None = None,
    guide_dit: str | None = None,
) -> Bundle:
    """The DiT of run or checkpoint folder `dit` (`ema`: its EMA weights, and the guide's), the
    VAE it names (or `vae`), the pixel decoder `decoder` and AutoGuidance's weaker DiT
    `guide_dit`, each refused in one line when it does not fit the others."""
    model, flow, norm, dit_ckpt = load_dit(dit, ema)
    vae_model, vae_ckpt = _load_vae(vae, flow)
    decoder_model, decoder_path = None, None
    if decoder:
        decoder_model = load_pixel_decoder(decoder)[0]
        decoder_path = Path(decoder)
        if not decoder_path.is_file():
            decoder_path = resolve_checkpoint(decoder, "--decoder", "train-decoder")
    _check_pair(decoder_model, vae_model)
    guide, guide_ckpt = _load_guide(guide_dit, ema, model, flow)
    gen = Generator(model, norm, vae_model, float(flow.kappa), decoder_model, guide)
    return Bundle(gen, flow, dit_ckpt, vae_ckpt, decoder_path, guide_ckpt)


def _load_vae(path: str | None, flow: FlowRecord) -> tuple[torch.nn.Module, Path]:
    """The VAE the latents were encoded with (checked by checksum), or the one --vae names; and
    its checkpoint folder."""
    given, path = path is not None, path or flow.vae_checkpoint
    if not path:
        raise FlatDinoError("the DiT checkpoint names no VAE; pass --vae RUN_DIR")
    try:
        ckpt = resolve_vae(path)
        model, sha = load_vae(ckpt)
    except FlatDinoError as e:
        if given:
            raise
        raise FlatDinoError(f"{e} (the VAE the DiT's latents came from; pass --vae)") from e
    expected = (flow.latents_fingerprint or {}).get("vae_sha256")
    if expected and sha != expected:
        raise FlatDinoError(
            f"VAE {path!r} (sha256 {sha[:12]}) is not the one the DiT's latents were encoded with "
            f"({expected[:12]}); pass --vae with that checkpoint"
        )
    return model, ckpt


def _check_pair(decoder, vae) -> None:
    if decoder is not None and (decoder.cfg.num_patches, decoder.cfg.in_dim) != (
        vae.cfg.num_patches,
        vae.cfg.in_dim,
    ):
        raise FlatDinoError(
            f"--decoder expects ({decoder.cfg.num_patches}, {decoder.cfg.in_dim}) features but the "
            f"VAE produces ({vae.cfg.num_patches}, {vae.cfg.in_dim}); use a decoder for this backbone"
        )


def _load_guide(
    path: str | None, ema: bool, dit, flow: FlowRecord
) -> tuple[torch.nn.Module | None, Path | None]:
    """AutoGuidance's weaker DiT (--guide-dit) and its checkpoint folder, checked to predict
    velocities in the main DiT's space: the same (T, d, classes) and the same latents."""
    if not path:
        return None, None
    ckpt = resolve_checkpoint(path, "--guide-dit", "train-dit")
    if not (ckpt / "flow.json").exists():
        raise FlatDinoError(
            f"--guide-dit {path!r} is not a train-dit checkpoint (no flow.json); pass a "
            "train-dit run folder or one of its RUN/steps/NNNNNNN"
        )
    guide, guide_flow, _, _ = load_dit(str(ckpt), ema)
    shape = (dit.cfg.tokens, dit.cfg.latent_dim, dit.cfg.num_classes, dit.cfg.cls_dim)
    found = (guide.cfg.tokens, guide.cfg.latent_dim, guide.cfg.num_classes, guide.cfg.cls_dim)
    if found != shape:
        raise FlatDinoError(
            f"--guide-dit {path!r} is a DiT for (tokens, latent_dim, classes, cls_dim) = {found} "
            f"but --dit is one for {shape}; guide with a DiT trained on the same latents"
        )
    fixes = {"latents_fingerprint": "--latents", "normalize": "--latents and --normalize"}
    key = guide_flow.first_difference(flow, tuple(fixes))
    if key is not None:
        raise FlatDinoError(
            f"--guide-dit {path!r} was not trained on the latents --dit was (their "
            f"flow.json's {key} differ); guide with a DiT trained with the same {fixes[key]}"
        )
    return guide, ckpt
