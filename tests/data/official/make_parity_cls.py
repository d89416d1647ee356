"""Generate CLS-token reference (parity) data from the OFFICIAL FlatDINO JAX / flax-nnx code.

A sibling of make_parity.py and make_parity_dit_dh.py (same throwaway environment, source
checkout, import stubs and weight randomisation); it documents how ``parity_cls.npz`` was made:

    /tmp/official-env/bin/python tests/data/official/make_parity_cls.py

Versions used for the committed file: jax/jaxlib 0.8.1, flax 0.12.1, numpy 2.x, Python 3.11 (CPU).

Toy models, each with ``in_cls_dim=6`` (a 6-wide CLS token), T=4 tokens of d=8, num_classes=10,
class_dropout_prob=0.1, the fp32 policy, built with ``train_generator.make_generator``:

* ``dit``: the official ``LightningDiT`` (models/dit.py) 32 wide, 1 block, 2 heads, SwiGLU hidden
  round(8·32/3), flat tokens (``num_patches=T``), RoPE on (nnx.Rngs(1));
* ``dh``: the official ``DiTDH`` (decoder/dit_dh.py), encoder 8 wide, head 12 wide, 1 block and
  2 heads each, RoPE on (nnx.Rngs(2));
* ``dh_regs``: the same with use_rope=False and num_registers=2 (the CLS token goes before the
  registers).

Weights randomised as make_parity.py (numpy seed 0; ``kernel`` N(0, 1/fan_in), ``embedding``,
``pos_embed`` and registers N(0, 0.5²), ``scale`` 1 + N(0, 0.1²), ``bias`` N(0, 0.05²), rounded
to bfloat16 values) and stored as raw bits as make_parity_dit_dh.py does.

Outputs per model ``<name>/``:

* ``w/<path>``, ``params``, ``config`` as in parity_dit_dh.npz;
* ``x`` (3, T, d), ``cls`` (3, 6), ``t`` = [0, 0.37, 0.93], ``y`` = [1, 7, 10]; ``v`` and
  ``v_cls``: ``model(x, t, y, train=False, cls_=cls)["x"]`` and ``["cls"]``;
* ``traj/x0``, ``traj/cls0``: the starting noise ``decoder/sampling._sample_latents`` draws from
  jax.random.PRNGKey(1234) for labels [2, 5] (checked against a steps=0 call); ``traj/x`` and
  ``traj/cls``: its result after 4 Euler steps, time shift 3, cfg_scale 4.5 inside the interval
  (0.225, 1) (so the first step is unguided);
* ``loss/x1``, ``loss/cls1`` (the data), ``loss/x0``, ``loss/cls0`` (the noise), ``loss/t``,
  ``loss/y`` and ``loss/value``: the v-prediction loss of train_generator.train_step's
  ``flow_matching_v_pred_v_loss`` written out (that function is nested inside train_step, which
  needs DINOv2 and the VAE): x_t = (1 - t)·x0 + t·x1 for both parts with one t per sample, the
  model called with train=False (the labels given are the dropped ones), and
  (Σ token errors² + Σ CLS errors²) / (number of token + CLS elements).
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
T, D, C, NUM_CLASSES = 4, 8, 6, 10
DH = dict(
    encoder_dim=8,
    decoder_dim=12,
    encoder_depth=1,
    decoder_depth=1,
    encoder_heads=2,
    decoder_heads=2,
    mlp_ratio=8 / 3,
    num_classes=NUM_CLASSES,
    class_dropout_prob=0.1,
    in_cls_dim=C,
)
DH_VARIANTS = {"dh": {}, "dh_regs": dict(use_rope=False, num_registers=2)}
STEPS, SHIFT, CFG, LO, HI = 4, 3.0, 4.5, 0.225, 1.0


def main() -> None:
    commit = make_parity.open_official()

    import flax.nnx as nnx
    import jax
    import jax.numpy as jnp
    from flax.traverse_util import flatten_dict

    import flatdino.decoder.sampling as official_sampling
    import flatdino.train_generator as official_gen

    mp, _ = make_parity.jax_ready()
    count, randomize = make_parity.param_count, make_parity.randomize

    g0 = official_gen.GeneratorConfig()
    dit_cfg = replace(
        g0,
        dit=replace(
            g0.dit,
            in_channels=D,
            num_patches=T,
            num_classes=NUM_CLASSES,
            class_dropout_prob=0.1,
            in_cls_dim=C,
            transformer=replace(g0.dit.transformer, **{**make_parity.DIT, "num_layers": 1}),
        ),
        dit_dh=replace(g0.dit_dh, in_channels=D),  # as train_generator.main does
    )
    configs = {"dit": (dit_cfg, 1)}
    for name, change in DH_VARIANTS.items():
        dh = replace(g0.dit_dh, in_channels=D, input_size=T, **{**DH, **change})
        configs[name] = (replace(g0, model_type="dit_dh", dit_dh=dh), 2)

    out: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(0)
    for name, (cfg, seed) in configs.items():
        model = official_gen.make_generator(cfg, mp, nnx.Rngs(seed), num_tokens=T)
        randomize(model, rng)
        pure = nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.RngState)))
        for path, leaf in flatten_dict(pure).items():
            bits = np.ascontiguousarray(np.asarray(leaf, np.float32)).view(np.uint32)
            if np.all(bits & 0xFFFF == 0):  # a bfloat16 value: its 16 bits say it exactly
                bits = (bits >> 16).astype(np.uint16)
            out[f"{name}/w/" + "/".join(str(k) for k in path)] = bits
        out[f"{name}/params"] = np.array(count(model))
        out[f"{name}/config"] = np.array(json.dumps(asdict(cfg)))

        # velocity of both outputs
        x = rng.standard_normal((3, T, D)).astype(np.float32)
        cls = rng.standard_normal((3, C)).astype(np.float32)
        t = np.array([0.0, 0.37, 0.93], np.float32)
        y = np.array([1, 7, NUM_CLASSES], np.int32)
        v = model(jnp.asarray(x), jnp.asarray(t), jnp.asarray(y), train=False, cls_=cls)
        for k, a in dict(x=x, cls=cls, t=t, y=y, v=v["x"], v_cls=v["cls"]).items():
            out[f"{name}/{k}"] = np.asarray(a)

        # a few Euler steps with interval CFG, from the sampler's own noise
        labels = jnp.array([2, 5], jnp.int32)
        key = jax.random.PRNGKey(1234)
        key1, k_x = jax.random.split(key)  # the first lines of _sample_latents
        _, k_cls = jax.random.split(key1)
        x0 = np.asarray(jax.random.normal(k_x, (2, T, D), dtype=jnp.float32))
        cls0 = np.asarray(jax.random.normal(k_cls, (2, C), dtype=jnp.float32))
        run = dict(labels=labels, key=key, latent_shape=(T, D), cfg_scale=CFG, pred_type="v")
        start = official_sampling._sample_latents(model, steps=0, **run)
        np.testing.assert_array_equal(np.asarray(start["x"]), x0)
        np.testing.assert_array_equal(np.asarray(start["cls"]), cls0)
        final = official_sampling._sample_latents(
            model,
            steps=STEPS,
            cfg_interval_min=LO,
            cfg_interval_max=HI,
            time_dist_shift=SHIFT,
            **run,
        )
        out[f"{name}/traj/x0"], out[f"{name}/traj/cls0"] = x0, cls0
        out[f"{name}/traj/x"] = np.asarray(final["x"])
        out[f"{name}/traj/cls"] = np.asarray(final["cls"])

        # one training-loss value from given data, noise and times
        parts = {
            "x1": rng.standard_normal((3, T, D)),
            "cls1": rng.standard_normal((3, C)),
            "x0": rng.standard_normal((3, T, D)),
            "cls0": rng.standard_normal((3, C)),
        }
        parts = {k: a.astype(np.float32) for k, a in parts.items()}
        lt = np.array([0.1, 0.5, 0.8], np.float32)
        ly = np.array([3, NUM_CLASSES, 9], np.int32)
        tb, tc = lt[:, None, None], lt[:, None]
        xt = (1.0 - tb) * parts["x0"] + tb * parts["x1"]
        xt_cls = (1.0 - tc) * parts["cls0"] + tc * parts["cls1"]
        pred = model(jnp.asarray(xt), jnp.asarray(lt), jnp.asarray(ly), train=False, cls_=xt_cls)
        token_err = jnp.square(pred["x"] - (parts["x1"] - parts["x0"]))
        cls_err = jnp.square(pred["cls"] - (parts["cls1"] - parts["cls0"]))
        value = (jnp.sum(token_err) + jnp.sum(cls_err)) / (token_err.size + cls_err.size)
        for k, a in parts.items():
            out[f"{name}/loss/{k}"] = a
        out[f"{name}/loss/t"], out[f"{name}/loss/y"] = lt, ly
        out[f"{name}/loss/value"] = np.asarray(value, np.float32)

    out["meta/traj"] = np.array([STEPS, SHIFT, CFG, LO, HI], np.float32)
    out["meta/official_commit"] = np.array(commit)
    for k, a in out.items():
        if a.dtype.kind == "f":
            assert np.all(np.isfinite(a)), k
    np.savez_compressed(HERE / "parity_cls.npz", **out)
    print(f"wrote {len(out)} arrays; params:", {k: int(v) for k, v in out.items() if "params" in k})
    print("jax", jax.__version__)


if __name__ == "__main__":
    main()
