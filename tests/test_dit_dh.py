"""DiT-DH (a DiT encoder with a wide decoupled head): parity with the official `DiTDH`, the
parameter counts, its init and gradients.

tests/data/official/parity_dit_dh.npz holds what the official module computed at toy size with
seeded random weights (make_parity_dit_dh.py, run in the throwaway jax/flax environment): three
variants (RoPE; registers without RoPE; encoder and head of one width), their weights as the
flattened nnx state, the velocity of three (x, t, y) and the nnx.Param counts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_zero_init_and_every_parameter_learns, npz_arrays, official_weights
from flatdino.models.configs import dit_dh_parameters
from flatdino.models.dit_dh import (
    DIT_DH_PRESETS,
    DiTDH,
    DiTDHConfig,
    count_generator_parameters,
    generator_preset,
)
from flatdino.models.official import OFFICIAL_PARAMETERS, OfficialFormatError
from flatdino.models.official_dh import convert_dit_dh

DATA = Path(__file__).parent / "data" / "official" / "parity_dit_dh.npz"
# The toy modules of make_parity_dit_dh.py: T = 4 tokens of d = 8, 10 classes.
TOY = DiTDHConfig(
    tokens=4, latent_dim=8, dim=8, depth=2, heads=2, dh_dim=12, dh_depth=2, dh_heads=2,
    num_classes=10,
)  # fmt: skip
VARIANTS = {
    "rope": TOY,
    "regs": DiTDHConfig(**{**TOY.to_dict(), "use_rope": False, "registers": 2, "depth": 1,
                           "dh_depth": 1}),
    "same": DiTDHConfig(**{**TOY.to_dict(), "dh_dim": 8, "depth": 1, "dh_depth": 1}),
}  # fmt: skip


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    return npz_arrays(DATA)


def _rel(a: torch.Tensor, b: np.ndarray) -> float:
    b_ = torch.from_numpy(np.asarray(b, np.float32))
    return ((a.float() - b_).norm() / b_.norm()).item()


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_velocity_matches_the_official_dit_dh(ref, name):
    cfg = VARIANTS[name]
    model = DiTDH(cfg).eval()
    state, stats = convert_dit_dh(official_weights(ref, name), cfg)
    assert stats is None  # trained without latent normalisation
    model.load_state_dict(state, strict=True)
    x, t, y = (torch.from_numpy(ref[f"{name}/{k}"]) for k in ("x", "t", "y"))
    with torch.no_grad():
        v = model(x, t, y.long())
    assert ref[f"{name}/v"].std() > 0.1  # a reference that moves: zero init would not pass
    assert _rel(v, ref[f"{name}/v"]) < 1e-5
    n = sum(p.numel() for p in model.parameters())
    assert n == int(ref[f"{name}/params"]) == dit_dh_parameters(cfg)


def test_dit_dh_xl_has_the_official_parameter_count(ref):
    cfg = generator_preset("dit-dh-xl")
    assert (cfg.dim, cfg.depth, cfg.dh_dim, cfg.dh_depth, cfg.dh_mlp_hidden) == (
        1152, 28, 2048, 2, 5461,
    )  # fmt: skip
    official = int(ref["params/dit-dh-xl"])
    assert count_generator_parameters(cfg) == dit_dh_parameters(cfg) == official
    assert OFFICIAL_PARAMETERS["dit-dh-xl"] == official


def test_the_converter_refuses_what_it_cannot_place(ref):
    tree = official_weights(ref, "rope")
    with pytest.raises(OfficialFormatError, match="holds 'in_cls_proj/kernel'"):
        convert_dit_dh({**tree, "in_cls_proj/kernel": np.zeros((2, 2), np.float32)}, TOY)
    with pytest.raises(OfficialFormatError, match="no 'decoder_blocks/1/mlp/up_proj/kernel'"):
        convert_dit_dh({k: v for k, v in tree.items() if "decoder_blocks/1/mlp/up" not in k}, TOY)
    with pytest.raises(OfficialFormatError, match="fixed table"):  # another RoPE base
        convert_dit_dh(tree, DiTDHConfig(**{**TOY.to_dict(), "rope_base": 100.0}))


def test_registers_with_rope_are_refused_by_name():
    with pytest.raises(ValueError, match="registers need use_rope=False"):
        DiTDHConfig(registers=2)


@pytest.mark.parametrize("name", sorted(DIT_DH_PRESETS))
def test_presets_on_the_meta_device(name):
    with torch.device("meta"):
        model = DiTDH(generator_preset(name))
        v = model(torch.empty(2, 32, 128), torch.empty(2), torch.zeros(2, dtype=torch.long))
    assert v.shape == (2, 32, 128)


def test_zero_init_output_and_every_parameter_learns():
    torch.manual_seed(0)
    assert_zero_init_and_every_parameter_learns(
        DiTDH(generator_preset("dit-dh-tiny", tokens=8, latent_dim=16, registers=2, use_rope=False))
    )


# --------------------------------------------------------------------------- train-dit and sample


def _vae_checkpoint(path: Path, tokens: int, latent_dim: int) -> str:
    """A randomly initialised tiny VAE saved as train-vae saves one; returns its sha256."""
    from safetensors.torch import save_file

    from flatdino.models.vae import FlatDinoVAE, vae_preset
    from flatdino.pipeline.checkpoints import vae_sha256

    cfg = vae_preset("tiny", tokens=tokens, latent_dim=latent_dim, in_dim=8, num_patches=4)
    torch.manual_seed(0)
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(cfg.to_dict()))
    save_file(FlatDinoVAE(cfg).state_dict(), str(path / "model.safetensors"))
    return vae_sha256(path)


def test_dit_dh_trains_resumes_bit_exactly_and_samples(tmp_path):
    """train-dit --preset dit-dh-tiny: checkpoints say the kind, a run stopped and resumed equals
    the straight run bit for bit, and `flatdino sample` rebuilds the DiT-DH and runs the chain."""
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from conftest import fake_latents_store, train_dit_straight_and_resumed
    from flatdino.cli.main import app
    from flatdino.pipeline.checkpoints import load_dit

    T, d = 4, 6
    sha = _vae_checkpoint(tmp_path / "vae", T, d)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 12)
    mu = (rng.normal(size=(3, 1, T, d))[labels] + 0.3 * rng.normal(size=(36, 1, T, d))).astype(
        np.float32
    )
    store = fake_latents_store(tmp_path / "lat.zarr", mu, labels, fingerprint={"vae_sha256": sha})
    kw = dict(
        latents=str(store), preset="dit-dh-tiny", steps=6, batch_size=8, micro_batch=4, lr=1e-3,
        ema_decay=0.9, log_every=1, ckpt_every=100, progress=False, device="cpu",
    )  # fmt: skip
    straight = train_dit_straight_and_resumed(tmp_path, 4, **kw)
    a = load_file(str(straight / "checkpoints" / "ema.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in a.items() if k.startswith("out."))  # it trained

    config = json.loads((straight / "checkpoints" / "config.json").read_text())
    assert (config["kind"], config["tokens"], config["latent_dim"], config["num_classes"]) == (
        "dit_dh", T, d, 3,
    )  # fmt: skip
    model, flow, norm, _ = load_dit(str(straight))
    assert isinstance(model, DiTDH) and model.null_class == 3

    out = tmp_path / "samples"
    args = ["sample", "--dit", straight, "--vae", tmp_path / "vae", "--out", out, "--n", "3"]
    args += ["--steps", "3", "--cfg", "2", "--device", "cpu", "--no-progress"]
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    latents, features = np.load(out / "latents.npy"), np.load(out / "features.npy")
    assert latents.shape == (3, T, d) and features.shape == (3, 4, 8)
    info = CliRunner().invoke(app, ["info", str(straight / "checkpoints")])
    assert info.exit_code == 0 and f"parameters: {dit_dh_parameters(model.cfg)}\n" in info.output


# --------------------------------------------------------------------------- import-official


def _orbax_checkpoint(
    root: Path,
    tree: dict[str, np.ndarray],
    config: str,
    step: int,
    buffers: tuple[str, ...] = ("t_embedder/W", "feat_rope/"),
) -> Path:
    """An orbax CheckpointManager folder as the official trainer's `save_checkpoint` writes it:
    `model` and `model_ema` (every Param × 0.5; the `buffers` kept) PyTree items of the nested
    nnx state and the `config` JSON item (optim and loader left out, as in tests/data/official)."""
    import orbax.checkpoint as ocp

    def nested(flat: dict) -> dict:
        out: dict = {}
        for path, value in flat.items():
            *parents, leaf = path.split("/")
            node = out
            for p in parents:
                node = node.setdefault(int(p) if p.isdigit() else p, {})
            node[int(leaf) if leaf.isdigit() else leaf] = value
        return out

    ema = {k: v if any(b in k for b in buffers) else v * np.float32(0.5) for k, v in tree.items()}
    mngr = ocp.CheckpointManager(
        str(root), options=ocp.CheckpointManagerOptions(create=True),
        item_names=["model", "model_ema", "config"],
    )  # fmt: skip
    mngr.save(
        step,
        args=ocp.args.Composite(
            model=ocp.args.PyTreeSave(nested(tree)),
            model_ema=ocp.args.PyTreeSave(nested(ema)),
            config=ocp.args.JsonSave(json.loads(config)),
        ),
    )
    mngr.wait_until_finished()
    mngr.close()
    return root


@pytest.mark.parametrize("name", ["regs", "rope"])
def test_import_official_dit_dh_round_trip(ref, tmp_path, name):
    """import-official reads an official DiT-DH checkpoint (config item or, for a preset, shapes)
    into a folder `sample` takes; its weights are the converter's."""
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from flatdino.cli.main import app
    from flatdino.pipeline.checkpoints import load_dit

    tree = official_weights(ref, name)
    ckpt = _orbax_checkpoint(tmp_path / "official", tree, str(ref[f"{name}/config"]), 300)
    out = tmp_path / "imported"
    r = CliRunner().invoke(app, ["import-official", str(ckpt), "--out", str(out)])
    assert r.exit_code == 0, r.output
    cfg = VARIANTS[name]
    expected, _ = convert_dit_dh(tree, cfg)
    raw, ema = load_file(str(out / "model.safetensors")), load_file(str(out / "ema.safetensors"))
    for k, v in expected.items():
        torch.testing.assert_close(raw[k], v, rtol=0, atol=0)
        torch.testing.assert_close(ema[k], v if k == "t_embed.W" else v * 0.5, rtol=0, atol=0)
    config = json.loads((out / "config.json").read_text())
    assert config == cfg.to_dict()
    model, flow, _, _ = load_dit(str(out), ema=False)
    assert isinstance(model, DiTDH) and flow.kappa == pytest.approx((4 * 8 / 4096) ** 0.5)
    x, t, y = (torch.from_numpy(ref[f"{name}/{k}"]) for k in ("x", "t", "y"))
    with torch.no_grad():
        assert _rel(model(x, t, y.long()), ref[f"{name}/v"]) < 1e-5


def test_official_dit_dh_settings_it_cannot_represent_are_refused(ref):
    from flatdino.models.official_dh import dit_dh_config_from_official, dit_dh_config_from_shapes

    official = json.loads(str(ref["regs/config"]))
    assert dit_dh_config_from_official(official) == VARIANTS["regs"]
    both = {**official, "dit_dh": {**official["dit_dh"], "use_rope": True}}
    with pytest.raises(OfficialFormatError, match="num_registers with use_rope"):
        dit_dh_config_from_official(both)
    cls = {**official, "dit_dh": {**official["dit_dh"], "in_cls_dim": 768}}
    assert dit_dh_config_from_official(cls).cls_dim == 768  # read, not refused (test_cls_gen.py)
    with pytest.raises(OfficialFormatError, match="pred_type = 'x'"):
        dit_dh_config_from_official({**official, "pred_type": "x"})
    with pytest.raises(OfficialFormatError, match="match no preset"):
        dit_dh_config_from_shapes(
            official_weights(ref, "rope")
        )  # toy sizes: no preset to take heads from


def test_dit_dh_trains_under_two_gloo_ranks(tmp_path):
    """torchrun with 2 CPU ranks: DDP over the DiT-DH (every parameter is used, so no unused-
    parameter error), rank 0's checkpoint rebuilds as a DiT-DH."""
    from conftest import fake_latents_store, tiny_dit_args, torchrun
    from flatdino.pipeline.checkpoints import load_dit

    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(2), 16)
    mu = rng.normal(size=(32, 1, 4, 6)).astype(np.float32)
    store = fake_latents_store(tmp_path / "lat.zarr", mu, labels)
    run = tmp_path / "ddp"
    done = torchrun(2, *tiny_dit_args(store, run, 3, "--preset", "dit-dh-tiny"))
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)
    model, *_ = load_dit(str(run))
    assert isinstance(model, DiTDH) and model.cfg.num_classes == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
