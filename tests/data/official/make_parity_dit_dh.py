"""Generate DiT-DH reference (parity) data from the OFFICIAL FlatDINO JAX / flax-nnx code.

A sibling of make_parity.py (same throwaway environment, same source checkout, same import
stubs, same weight randomisation); it documents how ``parity_dit_dh.npz`` was produced:

    /tmp/official-env/bin/python tests/data/official/make_parity_dit_dh.py

Versions used for the committed file: jax/jaxlib 0.8.1, flax 0.12.1, numpy 2.x, Python 3.11 (CPU).

Toy models
----------
Three official ``DiTDH`` modules (decoder/dit_dh.py), each built with
``flatdino.train_generator.make_generator`` from ``GeneratorConfig(model_type="dit_dh")`` the
way train_generator.main does for flat latents (``patch_size=None``, ``input_size=T``,
``in_channels=d``), with T=4 tokens of d=8, num_classes=10, class_dropout_prob=0.1 (an 11-row
class table), mlp_ratio=8/3 (hidden int(width·8/3)) and the fp32 policy, nnx.Rngs(2):

* ``rope``: encoder 8 wide, 2 blocks, 2 heads; head 12 wide, 2 blocks, 2 heads; RoPE on, no
  registers (the official defaults otherwise: RMSNorm, SwiGLU, no QK-norm, shift on);
* ``regs``: the same widths, 1 block each, use_rope=False, num_registers=2 (registers need
  RoPE off);
* ``same``: encoder and head both 8 wide (no s_projector), 1 block each, RoPE on.

Weight randomisation as make_parity.py (every nnx.Param; non-Param Variables stay as made):
``kernel`` N(0, 1/fan_in); ``embedding``, ``pos_embed``, ``reg_enc_tokens``, ``reg_dec_tokens``
N(0, 0.5²); ``scale`` 1 + N(0, 0.1²); ``bias`` N(0, 0.05²); every value rounded to the nearest
bfloat16 (values stay float32). numpy seed 0.

Outputs (``parity_dit_dh.npz``)
-------------------------------
* ``<name>/w/<path>``: the weights, ``nnx.to_pure_dict(nnx.state(m, nnx.Not(nnx.RngState)))``
  flattened with "/" (flax layout, kernels (in, out); RoPE tables ``enc_feat_rope/freqs_*`` and
  ``dec_feat_rope/freqs_*``, ``t_embedder/W``), as raw bits to keep the file small: the
  randomised Params as uint16 (the upper half of their float32, exact since they are bfloat16
  values), everything else as the uint32 of its float32;
* ``<name>/x`` (3, T, d), ``<name>/t`` (3,) = [0, 0.37, 0.93], ``<name>/y`` (3,) = [1, 7, 10];
  ``<name>/v`` = ``model(x, t, y, train=False)["x"]``;
* ``<name>/params``: the module's nnx.Param count; ``<name>/config``: the GeneratorConfig as
  the official trainer saves it in its checkpoints' ``config`` item (``asdict(cfg)``, JSON);
* ``params/dit-dh-xl``: the nnx.Param count of ``train_generator.get_experiment("ditxl-dh")``
  on 32 × 128 latents (in_channels=128, num_tokens=32, 1000 classes), built with
  ``nnx.eval_shape`` as count_parameters.py builds the others: 835,058,132.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_parity  # noqa: E402  (the source checkout and the import stubs)

HERE = Path(__file__).resolve().parent
T, D, NUM_CLASSES = 4, 8, 10
BASE = dict(
    encoder_dim=8,
    decoder_dim=12,
    encoder_depth=2,
    decoder_depth=2,
    encoder_heads=2,
    decoder_heads=2,
    mlp_ratio=8 / 3,
    num_classes=NUM_CLASSES,
    class_dropout_prob=0.1,
)
VARIANTS = {
    "rope": {},
    "regs": dict(use_rope=False, num_registers=2, encoder_depth=1, decoder_depth=1),
    "same": dict(decoder_dim=8, encoder_depth=1, decoder_depth=1),
}


def main() -> None:
    commit = make_parity.open_official()

    import flax.nnx as nnx
    import jax
    import jax.numpy as jnp
    from flax.traverse_util import flatten_dict

    import flatdino.train_generator as official_gen

    mp, _ = make_parity.jax_ready()
    count, randomize = make_parity.param_count, make_parity.randomize

    out: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(0)
    g0 = official_gen.GeneratorConfig()
    for name, change in VARIANTS.items():
        dh = replace(g0.dit_dh, in_channels=D, input_size=T, **{**BASE, **change})  # as main
        cfg = replace(g0, model_type="dit_dh", dit_dh=dh)
        model = official_gen.make_generator(cfg, mp, nnx.Rngs(2), num_tokens=T)
        assert model.cfg.patch_size is None and model.cfg.input_size == T
        randomize(model, rng)
        pure = nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.RngState)))
        for path, leaf in flatten_dict(pure).items():
            bits = np.ascontiguousarray(np.asarray(leaf, np.float32)).view(np.uint32)
            if np.all(bits & 0xFFFF == 0):  # a bfloat16 value: its 16 bits say it exactly
                bits = (bits >> 16).astype(np.uint16)
            out[f"{name}/w/" + "/".join(str(k) for k in path)] = bits
        x = rng.standard_normal((3, T, D)).astype(np.float32)
        t = np.array([0.0, 0.37, 0.93], np.float32)
        y = np.array([1, 7, NUM_CLASSES], np.int32)
        v = model(jnp.asarray(x), jnp.asarray(t), jnp.asarray(y), train=False)["x"]
        out[f"{name}/x"], out[f"{name}/t"], out[f"{name}/y"] = x, t, y
        out[f"{name}/v"] = np.asarray(v)
        out[f"{name}/params"] = np.array(count(model))
        out[f"{name}/config"] = np.array(json.dumps(asdict(cfg)))
        assert out[f"{name}/v"].shape == (3, T, D) and np.all(np.isfinite(out[f"{name}/v"]))

    xl = official_gen.get_experiment("ditxl-dh")
    xl = replace(xl, dit_dh=replace(xl.dit_dh, in_channels=128))
    big = nnx.eval_shape(lambda: official_gen.make_generator(xl, mp, nnx.Rngs(0), num_tokens=32))
    out["params/dit-dh-xl"] = np.array(count(big))
    out["meta/official_commit"] = np.array(commit)

    np.savez_compressed(HERE / "parity_dit_dh.npz", **out)
    print(f"wrote {len(out)} arrays; params:", {k: int(v) for k, v in out.items() if "params" in k})
    print("jax", jax.__version__)


if __name__ == "__main__":
    main()
