"""Generate reference (parity) data from the OFFICIAL FlatDINO JAX / flax-nnx code.

This script is NOT part of the PyTorch package and is never imported by the tests; it
documents how ``parity.npz``, ``vae_ckpt/``, ``dit_ckpt/`` and ``keys.txt`` (all in this
folder) were produced, so they can be regenerated.

How to run (from a fresh shell, cwd = the repository root)::

    python3 -m venv /tmp/official-env
    /tmp/official-env/bin/pip install "jax[cpu]<=0.8.1" "flax<=0.12.1" orbax-checkpoint \
        jmp einops numpy dacite
    /tmp/official-env/bin/python tests/data/official/make_parity.py

The official source is taken from ``/tmp/official-src`` (override with $FLATDINO_SRC).  If
it is missing it is extracted from the git mirror ($FLATDINO_MIRROR, default
``/work/.mirror/noctrog+flatdino/repo``) with ``git archive HEAD | tar -x``.  The official
modules run UNMODIFIED; third-party packages they import but that play no part here (grain,
tensorflow(_datasets), cv2, albumentations, matplotlib, wandb, transformers, tyro, tqdm,
chex, optax, PIL, pandas, requests, torch, ...) are replaced by inert stub modules, but only
when they are not installed (the stub finder sits at the END of ``sys.meta_path``).
Versions used for the committed files: jax/jaxlib 0.8.1, flax 0.12.1, orbax-checkpoint
0.12.8, numpy 2.4.6, Python 3.11 (CPU).

Everything is deterministic (numpy seed 0 for the weight randomisation, nnx.Rngs(0) for
the VAE construction, nnx.Rngs(1) for the DiT, jax.random.PRNGKey(1234) for the sampler).

Toy models
----------
VAE (``FlatDinoAutoencoder``), derived from ``flatdino.train.baseline`` exactly the way
``flatdino.train.build_config`` derives the paper configs (``dataclasses.replace`` of the
baseline encoder/decoder ViTConfigs, mlp_type="swiglu"; other TransformerConfig fields are
inherited, i.e. the class defaults qkv_bias=mlp_bias=True, norm "ln", qk_norm=True,
eps=1e-6, plus baseline's ``selective=True`` which only toggles gradient checkpointing):

* C=24 feature channels, P=16 patches, T=4 latent tokens, d=8 latent dim;
* encoder ViTEncoder: patch=None, use_pos_embeds=False, num_patches=P, input_dim=C,
  num_registers=T, output_dim=2d, embed_dim=32, 2 layers, 2 heads, mlp_hidden_dim=128;
* decoder ViTEncoder: patch=None, use_pos_embeds=True (learned, (1,T,48)), num_patches=T,
  input_dim=d, num_registers=P, output_dim=C, embed_dim=48, 2 layers, 4 heads, mlp 192;
* fp32 policy ``jmp.get_policy("params=float32,compute=float32,output=float32")``.

DiT (``LightningDiT``), built with ``flatdino.train_generator.make_generator`` from
``GeneratorConfig()`` the way train_generator.main does for flat latents
(``DiTConfig(patch_embed=None, num_patches=T)``, in_channels=d, num_tokens=T), with
num_classes=10, class_dropout_prob=0.1 (table has 11 rows, row 10 = null class) and the
DiTConfig default transformer (norm "rms", qk_norm False, swiglu, trunc_normal) resized to
embed_dim=32, 2 layers, 2 heads, mlp_hidden_dim=round(8*32/3)=85.  Same fp32 policy.

Weight randomisation (every nnx.Param, after construction; non-Param Variables such as the
sin-cos ``pos_embed``, the RoPE ``feat_rope/freqs_{cos,sin}`` and the Gaussian-Fourier
``t_embedder/W`` stay as the code made them):

* ``kernel``: N(0, 1/fan_in) with fan_in = kernel.shape[0]  (flax kernels are (in, out));
* ``embedding`` / ``pos_embed`` / ``reg_tokens``: N(0, 0.5^2);
* ``scale`` (LayerNorm / RMSNorm, incl. q_norm/k_norm): 1 + N(0, 0.1^2);
* ``bias``: N(0, 0.05^2);
* then every randomised value is rounded to the nearest bfloat16-representable float32
  (values stay float32; this only makes the files compress ~2x).

Outputs
-------
``parity.npz`` (float32 unless said otherwise):

* ``vae/encoder/<path>``, ``vae/decoder/<path>``: the VAE weights, i.e.
  ``nnx.to_pure_dict(nnx.state(module, nnx.Not(nnx.RngState)))`` flattened with "/"
  (Params + non-RNG Variables; RNG keys/counts skipped).  Layout is flax's: Linear
  kernels are (in, out); ``blocks/<i>/...``; LayerNorm params under ``.../norm/{scale,bias}``.
* ``vae_in/x`` (2, P, C) N(0,1).
* ``vae_out/mu``, ``vae_out/logvar`` (2, T, d): aux of ``FlatDinoAutoencoder.encode(x)``
  with key=None (the returned z equals mu because tanh=False); ``vae_out/recon`` (2, P, C)
  = ``decode(mu)``.
* ``dit/<path>``: the DiT weights, same flattening (``dit/t_embedder/W``, ``dit/pos_embed``
  (T, 32), ``dit/feat_rope/freqs_cos`` (T, 16), ...).
* ``dit_in/x`` (3, T, d), ``dit_in/t`` (3,) = [0, 0.37, 0.93], ``dit_in/y`` (3,) int32 =
  [1, 7, 10]; ``dit_out/v`` (3, T, d) = ``model(x, t, y, train=False)["x"]``.
* ``traj_in/labels`` (2,) int32 = [2, 5]; ``traj_in/x0`` (2, T, d): the initial noise of
  the official ``_sample_latents`` (key split exactly as it does; checked against a
  steps=0 call); ``traj_out/x`` (2, T, d): final state of ``_sample_latents`` (pred "v",
  steps=6, time_dist_shift=3, cfg_scale=4.5, interval (0, 1) -- CFG only where
  lo < t < hi, so the first step at t=0 has none); ``traj2_out/x``: same with
  cfg_interval_min=0.225; ``traj/meta`` = [steps, shift, cfg, lo, hi, lo2];
  ``traj/warped_ts`` (steps+1,) the shifted time grid; ``traj_out/states`` and
  ``traj2_out/states`` (steps+1, 2, T, d): x0 and the state after every step (re-run with
  the official jitted ``integration_step_upred``; last entry asserted == traj*_out/x);
  ``traj_out/cfg_applied`` / ``traj2_out/cfg_applied`` (steps,) int8: which steps used CFG.
* ``meta/official_commit``: the official git commit (str).

``vae_ckpt/`` (step 100) and ``dit_ckpt/`` (step 200): orbax CheckpointManager directories
written like the official trainers (``item_names`` + ``ocp.args.Composite`` of PyTreeSave
items and a JsonSave ``config``).  vae_ckpt items: ``encoder``, ``decoder`` (exactly
``FlatDinoAutoencoder.get_state()``, i.e. to_pure_dict of the FULL nnx state, RNG state
included) and ``config`` (``asdict(FlatDinoConfig)``).  dit_ckpt items: ``model`` (full
state), ``model_ema`` (the same, with every nnx.Param multiplied by 0.5; buffers and RNG
state unchanged) and ``config`` (``asdict(GeneratorConfig)``).  ``optim`` / ``loader``
are not written.  Both checkpoints are re-read with raw (target-less) PyTreeRestore and
compared to the npz, and re-loaded with the official restore paths
(``FlatDinoAutoencoder(mngr=...)`` and ``decoder.sampling._restore_generator``) whose
forward passes are compared to ``vae_out/*`` and ``dit_out/v``.

``keys.txt``: every leaf of every pytree item in both checkpoints (as restored raw,
"/"-joined), with shape, dtype and kind (Param / Variable (buffer) / RngKey / RngCount).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import shutil
import subprocess
import sys
import types
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SRC = Path(os.environ.get("FLATDINO_SRC", "/tmp/official-src"))
MIRROR = Path(os.environ.get("FLATDINO_MIRROR", "/work/.mirror/noctrog+flatdino/repo"))

# --------------------------------------------------------------------------- source


def ensure_source() -> str:
    commit = "unknown"
    if MIRROR.exists():
        commit = (
            subprocess.run(
                ["git", "-C", str(MIRROR), "rev-parse", "HEAD"], capture_output=True, text=True
            ).stdout.strip()
            or "unknown"
        )
    if not (SRC / "flatdino" / "models" / "dit.py").exists():
        SRC.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "-C", str(MIRROR), "archive", "HEAD"], capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(SRC)], input=archive, check=True)
    return commit


# --------------------------------------------------------------------------- stubs

# Third-party packages imported (transitively) by flatdino.train / flatdino.train_generator
# that are irrelevant here.  Only used when the real package is not importable.
STUB_ROOTS = {
    "grain",
    "tensorflow",
    "tensorflow_datasets",
    "cv2",
    "albumentations",
    "matplotlib",
    "wandb",
    "transformers",
    "tyro",
    "tqdm",
    "chex",
    "optax",
    "PIL",
    "osfclient",
    "requests",
    "torch",
    "torchvision",
    "lpips_nnx",
    "lpips",
    "skimage",
    "sklearn",
    "google",
    "pandas",
    "seaborn",
}


class _StubMeta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _stub_class(name)


def _stub_class(name: str) -> type:
    # A class: can be subclassed (grain.MapTransform), called, used as decorator, etc.
    return _StubMeta(
        name,
        (object,),
        {
            "__init__": lambda self, *a, **k: None,
            "__call__": lambda self, *a, **k: self,
            "__getattr__": lambda self, n: _stub_class(n),
        },
    )


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = _stub_class(name)
        setattr(self, name, value)
        return value


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    stubbed: set[str] = set()

    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] in STUB_ROOTS:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        self.stubbed.add(spec.name.split(".")[0])
        return module

    def exec_module(self, module):
        pass


# --------------------------------------------------------------------------- shared by the scripts here


def open_official() -> str:
    """The official package importable: its source checked out and on sys.path, the stub finder
    installed; returns the commit. Import the official modules after this, then `jax_ready`."""
    commit = ensure_source()
    sys.path.insert(0, str(SRC))
    sys.meta_path.append(FINDER)
    return commit


FINDER = _StubFinder()  # what it stubbed: FINDER.stubbed


def jax_ready():
    """After the official imports: their persistent compilation cache off (their entry points
    set its options at import time; nothing is written to /tmp/jax_cache), the one-device mesh
    the official trainers set (nnx.with_partitioning initialisers need a "model" axis); returns
    (the fp32 policy the toy models are built with, that mesh)."""
    import jax
    import jmp
    from jax.sharding import Mesh

    jax.config.update("jax_enable_compilation_cache", False)
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    jax.set_mesh(mesh)
    return jmp.get_policy("params=float32,compute=float32,output=float32"), mesh


def param_count(module) -> int:
    """The module's nnx.Param count."""
    import flax.nnx as nnx
    import jax

    return int(sum(np.prod(v.shape) for v in jax.tree.leaves(nnx.state(module, nnx.Param))))


def to_bf16_grid(a: np.ndarray) -> np.ndarray:
    """`a` rounded to bfloat16 values, kept as float32."""
    import jax.numpy as jnp

    return np.asarray(jnp.asarray(a, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32))


# Params drawn like embeddings (registers and CLS tokens of every official model included).
EMBEDDINGS = (
    "embedding",
    "pos_embed",
    "reg_tokens",
    "cls_token",
    "reg_enc_tokens",
    "reg_dec_tokens",
)


def randomize(module, rng: np.random.Generator) -> None:
    """Every nnx.Param of `module` redrawn from `rng` in sorted path order (non-Param Variables
    stay as made): kernel N(0, 1/fan_in), embeddings N(0, 0.5²), scale 1 + N(0, 0.1²), bias
    N(0, 0.05²), rounded to bfloat16 values."""
    import flax.nnx as nnx
    import jax.numpy as jnp
    from flax.traverse_util import flatten_dict, unflatten_dict

    params = nnx.state(module, nnx.Param)
    new = {}
    for path, leaf in sorted(
        flatten_dict(nnx.to_pure_dict(params)).items(), key=lambda kv: str(kv[0])
    ):
        name, shape = path[-1], tuple(leaf.shape)
        if name == "kernel":
            val = rng.normal(0.0, 1.0 / np.sqrt(shape[0]), shape)
        elif name in EMBEDDINGS:
            val = rng.normal(0.0, 0.5, shape)
        elif name == "scale":
            val = 1.0 + rng.normal(0.0, 0.1, shape)
        elif name == "bias":
            val = rng.normal(0.0, 0.05, shape)
        else:
            raise KeyError(f"unhandled Param {'/'.join(map(str, path))}")
        new[path] = jnp.asarray(to_bf16_grid(val.astype(np.float32)))
    nnx.replace_by_pure_dict(params, unflatten_dict(new))
    nnx.update(module, params)


# --------------------------------------------------------------------------- sizes

C, P, T, D = 24, 16, 4, 8
ENC = dict(embed_dim=32, num_layers=2, num_heads=2, mlp_hidden_dim=128)
DEC = dict(embed_dim=48, num_layers=2, num_heads=4, mlp_hidden_dim=192)
DIT = dict(embed_dim=32, num_layers=2, num_heads=2, mlp_hidden_dim=round(8 * 32 / 3))
NUM_CLASSES = 10
VAE_STEP, DIT_STEP = 100, 200
STEPS, SHIFT, CFG, LO, HI, LO2 = 6, 3.0, 4.5, 0.0, 1.0, 0.225


def main() -> None:
    commit = open_official()

    import flax
    import flax.nnx as nnx
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    from flax.traverse_util import flatten_dict

    import flatdino.train as official_train
    import flatdino.train_generator as official_gen
    from flatdino.autoencoder import FlatDinoAutoencoder, FlatDinoConfig
    from flatdino.decoder import sampling as official_sampling

    mp, mesh = jax_ready()

    # ------------------------------------------------------------------ helpers
    def flat(tree, prefix: str) -> dict[str, np.ndarray]:
        return {
            prefix + "/".join(str(k) for k in path): leaf
            for path, leaf in flatten_dict(tree).items()
        }

    def kinds(module) -> dict[str, str]:
        out = {}
        for path, var in nnx.state(module).flat_state():
            out["/".join(str(k) for k in path)] = type(var).__name__
        return out

    def weights_npz(module, prefix: str) -> dict[str, np.ndarray]:
        pure = nnx.to_pure_dict(nnx.state(module, nnx.Not(nnx.RngState)))
        return {k: np.asarray(v) for k, v in flat(pure, prefix).items()}

    # ------------------------------------------------------------------ VAE
    base = official_train.baseline
    vae_cfg: FlatDinoConfig = replace(
        base,
        encoder=replace(
            base.encoder,
            patch=None,
            use_pos_embeds=False,
            num_patches=P,
            input_dim=C,
            num_registers=T,
            output_dim=2 * D,
            transformer=replace(base.encoder.transformer, mlp_type="swiglu", **ENC),
        ),
        decoder=replace(
            base.decoder,
            patch=None,
            use_pos_embeds=True,
            num_patches=T,
            input_dim=D,
            num_registers=P,
            output_dim=C,
            transformer=replace(base.decoder.transformer, mlp_type="swiglu", **DEC),
        ),
    )
    assert vae_cfg.num_latents == T and vae_cfg.num_output_patches == P
    vae = FlatDinoAutoencoder(vae_cfg, mp=mp, rngs=nnx.Rngs(0))

    rng = np.random.default_rng(0)
    randomize(vae.encoder, rng)
    randomize(vae.decoder, rng)

    out: dict[str, np.ndarray] = {}
    out.update(weights_npz(vae.encoder, "vae/encoder/"))
    out.update(weights_npz(vae.decoder, "vae/decoder/"))

    x_vae = rng.standard_normal((2, P, C)).astype(np.float32)
    z, aux = vae.encode(jnp.asarray(x_vae))
    recon = vae.decode(aux["mu"])
    np.testing.assert_array_equal(np.asarray(z), np.asarray(aux["mu"]))
    out["vae_in/x"] = x_vae
    out["vae_out/mu"] = np.asarray(aux["mu"])
    out["vae_out/logvar"] = np.asarray(aux["logvar"])
    out["vae_out/recon"] = np.asarray(recon)
    assert out["vae_out/mu"].shape == (2, T, D) and out["vae_out/recon"].shape == (2, P, C)

    # ------------------------------------------------------------------ DiT
    g0 = official_gen.GeneratorConfig()
    gen_cfg = replace(
        g0,
        dit=replace(
            g0.dit,
            in_channels=D,
            num_patches=T,
            num_classes=NUM_CLASSES,
            class_dropout_prob=0.1,
            transformer=replace(g0.dit.transformer, **DIT),
        ),
        dit_dh=replace(g0.dit_dh, in_channels=D),  # as train_generator.main does
    )
    assert gen_cfg.dit.patch_embed is None
    dit = official_gen.make_generator(gen_cfg, mp, nnx.Rngs(1), num_tokens=T)
    randomize(dit, rng)
    out.update(weights_npz(dit, "dit/"))

    x_dit = rng.standard_normal((3, T, D)).astype(np.float32)
    t_dit = np.array([0.0, 0.37, 0.93], np.float32)
    y_dit = np.array([1, 7, NUM_CLASSES], np.int32)
    v = dit(jnp.asarray(x_dit), jnp.asarray(t_dit), jnp.asarray(y_dit), train=False)["x"]
    out["dit_in/x"], out["dit_in/t"], out["dit_in/y"] = x_dit, t_dit, y_dit
    out["dit_out/v"] = np.asarray(v)

    # ------------------------------------------------------------------ sampler
    labels = jnp.array([2, 5], jnp.int32)
    key = jax.random.PRNGKey(1234)
    _, key_ = jax.random.split(key)  # first lines of _sample_latents
    x0 = np.asarray(jax.random.normal(key_, (labels.shape[0], T, D), dtype=jnp.float32))
    x0_fn = official_sampling._sample_latents(
        dit,
        labels=labels,
        steps=0,
        key=key,
        latent_shape=(T, D),
        cfg_scale=CFG,
        time_dist_shift=SHIFT,
        pred_type="v",
    )
    np.testing.assert_array_equal(np.asarray(x0_fn), x0)

    ts = jnp.linspace(0.0, 1.0, STEPS + 1, dtype=jnp.float32)
    shift = jnp.asarray(SHIFT, jnp.float32)
    warped = ts / (shift - (shift - 1.0) * ts)
    dts = warped[1:] - warped[:-1]

    def trajectory(lo: float, tag: str) -> None:
        final = official_sampling._sample_latents(
            dit,
            labels=labels,
            steps=STEPS,
            key=key,
            latent_shape=(T, D),
            cfg_scale=CFG,
            cfg_interval_min=lo,
            cfg_interval_max=HI,
            time_dist_shift=SHIFT,
            pred_type="v",
        )
        # Step-by-step replay with the official jitted step, for debugging a port.
        state = jnp.asarray(x0)
        states, applied = [x0], []
        uncond = jnp.full_like(labels, NUM_CLASSES)
        for i in range(STEPS):
            tv = float(warped[i])
            use = (tv > lo) and (tv < HI)
            applied.append(int(use))
            t = jnp.full((labels.shape[0],), warped[i], dtype=jnp.float32)
            state = official_sampling.integration_step_upred(
                dit,
                state,
                t,
                dts[i],
                labels,
                uncond,
                use,
                CFG if use else None,
                cls_state=None,
            )
            states.append(np.asarray(state))
        np.testing.assert_array_equal(states[-1], np.asarray(final))
        out[f"{tag}/x"] = np.asarray(final)
        out[f"{tag}/states"] = np.stack(states).astype(np.float32)
        out[f"{tag}/cfg_applied"] = np.array(applied, np.int8)

    out["traj_in/labels"] = np.asarray(labels)
    out["traj_in/x0"] = x0
    trajectory(LO, "traj_out")
    trajectory(LO2, "traj2_out")
    out["traj/meta"] = np.array([STEPS, SHIFT, CFG, LO, HI, LO2], np.float32)
    out["traj/warped_ts"] = np.asarray(warped)
    out["meta/official_commit"] = np.array(commit)

    for k, a in out.items():
        if a.dtype.kind == "f":
            assert np.all(np.isfinite(a)), k

    # ------------------------------------------------------------------ checkpoints
    vae_dir, dit_dir = HERE / "vae_ckpt", HERE / "dit_ckpt"
    for d_ in (vae_dir, dit_dir):
        if d_.exists():
            shutil.rmtree(d_)

    vae_items = FlatDinoAutoencoder.get_item_names() + ["config"]
    mngr = ocp.CheckpointManager(
        str(vae_dir), options=ocp.CheckpointManagerOptions(create=True), item_names=vae_items
    )
    vae_state = vae.get_state()
    mngr.save(
        VAE_STEP,
        args=ocp.args.Composite(
            config=ocp.args.JsonSave(asdict(vae_cfg)),
            **{name: ocp.args.PyTreeSave(tree) for name, tree in vae_state.items()},
        ),
    )
    mngr.wait_until_finished()
    mngr.close()

    dit_ema = nnx.clone(dit)
    ema_params = jax.tree.map(lambda a: a * 0.5, nnx.state(dit_ema, nnx.Param))
    nnx.update(dit_ema, ema_params)
    dit_items = ["model", "model_ema", "config"]
    mngr = ocp.CheckpointManager(
        str(dit_dir), options=ocp.CheckpointManagerOptions(create=True), item_names=dit_items
    )
    mngr.save(
        DIT_STEP,
        args=ocp.args.Composite(
            model=ocp.args.PyTreeSave(nnx.to_pure_dict(nnx.state(dit))),
            model_ema=ocp.args.PyTreeSave(nnx.to_pure_dict(nnx.state(dit_ema))),
            config=ocp.args.JsonSave(asdict(gen_cfg)),
        ),
    )
    mngr.wait_until_finished()
    mngr.close()

    # ------------------------------------------------------------------ verify (raw restore)
    live_kinds = {
        ("vae", "encoder"): kinds(vae.encoder),
        ("vae", "decoder"): kinds(vae.decoder),
        ("dit", "model"): kinds(dit),
        ("dit", "model_ema"): kinds(dit_ema),
    }
    lines = [
        "# Leaves of the orbax pytree items, restored raw (PyTreeRestore() without a target),",
        "# flattened with '/'.  kind = type of the nnx Variable in the live official module:",
        "#   Param (trainable), Variable (fixed buffer), RngKey / RngCount (nnx RNG state).",
        "# path\tshape\tdtype\tkind",
    ]
    for ckpt_dir, step, tag, items in (
        (vae_dir, VAE_STEP, "vae", ["encoder", "decoder"]),
        (dit_dir, DIT_STEP, "dit", ["model", "model_ema"]),
    ):
        m = ocp.CheckpointManager(
            str(ckpt_dir),
            options=ocp.CheckpointManagerOptions(read_only=True),
            item_names=items + ["config"],
        )
        assert m.all_steps() == [step], m.all_steps()
        restored = m.restore(
            step,
            args=ocp.args.Composite(
                config=ocp.args.JsonRestore(),
                **{it: ocp.args.PyTreeRestore() for it in items},
            ),
        )
        m.close()
        for it in items:
            flat_r = flat(restored[it], "")
            kk = live_kinds[(tag, it)]
            assert set(flat_r) == set(kk), (tag, it, set(flat_r) ^ set(kk))
            lines.append(f"\n## {ckpt_dir.name}/{step}/{it}  ({len(flat_r)} leaves)")
            for path in sorted(flat_r):
                leaf = flat_r[path]
                dtype = str(getattr(leaf, "dtype", type(leaf).__name__))
                shape = tuple(getattr(leaf, "shape", ()))
                lines.append(f"{tag}_ckpt/{it}/{path}\t{shape}\t{dtype}\t{kk[path]}")
                if kk[path] in ("RngKey", "RngCount"):
                    continue
                ref_key = ("vae/" + it + "/" + path) if tag == "vae" else ("dit/" + path)
                ref = out[ref_key]
                if it == "model_ema" and kk[path] == "Param":
                    ref = ref * np.float32(0.5)
                np.testing.assert_array_equal(np.asarray(leaf), ref, err_msg=ref_key)
            n_ref = sum(
                1 for k in out if k.startswith("vae/" + it + "/" if tag == "vae" else "dit/")
            )
            n_ckpt = sum(1 for p in flat_r if kk[p] not in ("RngKey", "RngCount"))
            assert n_ref == n_ckpt, (tag, it, n_ref, n_ckpt)
        cfg_json = restored["config"]
        lines.append(
            f"\n## {ckpt_dir.name}/{step}/config  (JSON) top-level keys: "
            + ", ".join(cfg_json.keys())
        )
    (HERE / "keys.txt").write_text("\n".join(lines) + "\n")

    # ------------------------------------------------------------------ verify (official restore)
    m = ocp.CheckpointManager(
        str(vae_dir),
        options=ocp.CheckpointManagerOptions(read_only=True),
        item_names=vae_items,
    )
    from dacite import Config as DaciteConfig
    from dacite import from_dict

    cfg_d = m.restore(VAE_STEP, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    vae_cfg_r = from_dict(FlatDinoConfig, cfg_d, DaciteConfig(cast=[tuple], strict=False))
    assert vae_cfg_r == vae_cfg
    vae_r = FlatDinoAutoencoder(vae_cfg_r, mesh, mngr=m, step=VAE_STEP, mp=mp, rngs=nnx.Rngs(5))
    m.close()
    _, aux_r = vae_r.encode(jnp.asarray(x_vae))
    np.testing.assert_array_equal(np.asarray(aux_r["mu"]), out["vae_out/mu"])
    np.testing.assert_array_equal(np.asarray(aux_r["logvar"]), out["vae_out/logvar"])
    np.testing.assert_array_equal(np.asarray(vae_r.decode(aux_r["mu"])), out["vae_out/recon"])

    for use_ema, scale in ((False, 1.0), (True, 0.5)):
        gen_r, cfg_blob = official_sampling._restore_generator(
            dit_dir, mesh=mesh, mp=mp, latent_tokens=T, use_ema=use_ema
        )
        got = {
            k: np.asarray(a)
            for k, a in flat(nnx.to_pure_dict(nnx.state(gen_r, nnx.Param)), "dit/").items()
        }
        for k2, a in got.items():
            np.testing.assert_array_equal(a, out[k2] * np.float32(scale), err_msg=k2)
        if not use_ema:
            v_r = gen_r(jnp.asarray(x_dit), jnp.asarray(t_dit), jnp.asarray(y_dit), train=False)
            np.testing.assert_array_equal(np.asarray(v_r["x"]), out["dit_out/v"])

    # ------------------------------------------------------------------ write npz
    np.savez_compressed(HERE / "parity.npz", **out)
    print(f"wrote {len(out)} arrays to {HERE / 'parity.npz'}")
    print(
        "jax",
        jax.__version__,
        "flax",
        flax.__version__,
        "orbax",
        ocp.__version__ if hasattr(ocp, "__version__") else "?",
    )
    print("stubbed modules:", sorted(FINDER.stubbed))


if __name__ == "__main__":
    main()
