"""Parameter counts (nnx.Param leaves) of the official models at the paper's sizes.

Run in the same throwaway environment as make_parity.py (see its docstring):

    /tmp/official-env/bin/python tests/data/official/count_parameters.py

It builds the official modules unmodified with `nnx.eval_shape` (no memory, no init): the VAE as
`train.get_experiment("fast-32-bl-128")` / `-64` build it (ViT-B encoder, ViT-L decoder) and the
LightningDiTs as `train_generator.get_experiment("dit{s,b,l,xl}")` builds them, on 32 × 128
latents. flatdino's `OFFICIAL_PARAMETERS` (models/official.py) are its output; the tests hold our
presets to them.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_parity  # noqa: E402  (the source checkout and the import stubs)


def main() -> None:
    make_parity.open_official()

    import flax.nnx as nnx

    import flatdino.train as official_train
    import flatdino.train_generator as official_gen
    from flatdino.autoencoder import FlatDinoAutoencoder

    mp, _ = make_parity.jax_ready()
    count = make_parity.param_count

    out: dict = {}
    for name, experiment in (
        ("flatdino-32x128", "fast-32-bl-128"),
        ("flatdino-32x64", "fast-32-bl-64"),
    ):
        cfg = official_train.get_experiment(experiment)
        vae = nnx.eval_shape(lambda c=cfg: FlatDinoAutoencoder(c, mp=mp, rngs=nnx.Rngs(0)))
        enc, dec = count(vae.encoder), count(vae.decoder)
        out[name] = {"encoder": enc, "decoder": dec, "total": enc + dec}
    for size in ("s", "b", "l", "xl"):
        cfg = official_gen.get_experiment(f"dit{size}")
        cfg = replace(cfg, dit=replace(cfg.dit, in_channels=128))
        model = nnx.eval_shape(
            lambda c=cfg: official_gen.make_generator(c, mp, nnx.Rngs(0), num_tokens=32)
        )
        out[f"dit-{size}"] = count(model)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
