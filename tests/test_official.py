"""Parity with the official JAX code (noctrog/flatdino) and `flatdino import-official`.

tests/data/official/ holds what the official modules themselves computed at toy size with seeded
random weights (make_parity.py, run in a throwaway jax/flax/orbax environment): the weights as
the flattened nnx state, the VAE's mu, logvar and reconstruction, the DiT's velocity, two sampler
trajectories with CFG, and two orbax checkpoints of those weights written as the official
trainers write them. Converted, our models must give the official outputs to < 1e-5.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from flatdino.cli.main import app
from flatdino.models.dit import LightningDiT
from flatdino.models.flow import flow_sample
from flatdino.models.official import (
    OfficialFormatError,
    convert_dit,
    convert_vae,
    dit_config_from_official,
    dit_flow_from_official,
    vae_config_from_official,
    vae_config_from_shapes,
)
from flatdino.models.vae import FlatDinoVAE

DATA = Path(__file__).parent / "data" / "official"
VAE_CKPT, DIT_CKPT = DATA / "vae_ckpt", DATA / "dit_ckpt"


@pytest.fixture
def invoke():
    runner = CliRunner(env={"COLUMNS": "250", "NO_COLOR": "1"})
    return lambda args: runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    with np.load(DATA / "parity.npz") as f:
        return {k: f[k] for k in f.files}


def _tree(ref: dict, prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix) :]: v for k, v in ref.items() if k.startswith(prefix)}


def _config(ckpt: Path, step: int) -> dict:
    return json.loads((ckpt / str(step) / "config" / "metadata").read_text())


def _rel(a: torch.Tensor, b: np.ndarray) -> float:
    b = torch.from_numpy(np.asarray(b, np.float32))
    return ((a.float() - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def vae(ref) -> FlatDinoVAE:
    cfg = vae_config_from_official(_config(VAE_CKPT, 100))
    model = FlatDinoVAE(cfg).eval()
    model.load_state_dict(convert_vae(_tree(ref, "vae/"), cfg), strict=True)
    return model


@pytest.fixture(scope="module")
def dit(ref) -> LightningDiT:
    cfg = dit_config_from_official(_config(DIT_CKPT, 200))
    model = LightningDiT(cfg).eval()
    state, stats = convert_dit(_tree(ref, "dit/"), cfg)
    assert stats is None  # the toy generator trained without latent normalisation
    model.load_state_dict(state, strict=True)
    return model


def test_vae_forward_matches_the_official_code(vae, ref):
    x = torch.from_numpy(ref["vae_in/x"])
    with torch.no_grad():
        mu, logvar = vae.encode(x)
        recon = vae.decode(mu)
    assert _rel(mu, ref["vae_out/mu"]) < 1e-5
    assert _rel(logvar, ref["vae_out/logvar"]) < 1e-5
    assert _rel(recon, ref["vae_out/recon"]) < 1e-5


def test_dit_velocity_matches_the_official_code(dit, ref):
    x, t, y = (torch.from_numpy(ref[f"dit_in/{k}"]) for k in ("x", "t", "y"))
    with torch.no_grad():
        v = dit(x, t, y.long())
    assert _rel(v, ref["dit_out/v"]) < 1e-5


@pytest.mark.parametrize("out, lo", [("traj_out", 0.0), ("traj2_out", 0.225)])
def test_sampler_trajectory_with_cfg_matches_the_official_sampler(dit, ref, out, lo):
    """6 Euler steps, shift 3, CFG 4.5 strictly inside (lo, 1): the official sampler leaves the
    t = 0 step of (0, 1) unguided, and so must we."""
    steps, shift, cfg, _, hi = ref["traj/meta"][:5]
    x0, labels = torch.from_numpy(ref["traj_in/x0"]), torch.from_numpy(ref["traj_in/labels"])
    x = flow_sample(
        dit,
        x0,
        labels.long(),
        steps=int(steps),
        kappa=float(shift),
        cfg=float(cfg),
        cfg_interval=(lo, float(hi)),
        null_class=dit.null_class,
    )
    assert _rel(x, ref[f"{out}/x"]) < 1e-5


def test_the_converter_refuses_what_it_cannot_place(ref):
    tree = _tree(ref, "vae/")
    cfg = vae_config_from_official(_config(VAE_CKPT, 100))
    with pytest.raises(OfficialFormatError, match="holds 'encoder/extra/kernel'"):
        convert_vae({**tree, "encoder/extra/kernel": np.zeros((2, 2))}, cfg)
    missing = {k: v for k, v in tree.items() if k != "decoder/pos_embed"}
    with pytest.raises(OfficialFormatError, match="no 'decoder/pos_embed'"):
        convert_vae(missing, cfg)
    with pytest.raises(OfficialFormatError, match=r"expects \(1, 4, 48\)"):
        convert_vae({**tree, "decoder/pos_embed": np.zeros((1, 5, 48), np.float32)}, cfg)
    with pytest.raises(OfficialFormatError, match="match no preset"):
        vae_config_from_shapes(tree)  # the toy sizes are no preset, and heads are not in weights
    official = _config(VAE_CKPT, 100)
    with pytest.raises(OfficialFormatError, match="tanh = True"):
        vae_config_from_official({**official, "tanh": True})


def test_flow_settings_follow_the_official_trainer():
    cfg = _config(DIT_CKPT, 200)
    flow = dit_flow_from_official(cfg)  # kappa unset: sqrt(T·d / time_dist_shift_base)
    assert flow["kappa"] == pytest.approx((4 * 8 / 4096) ** 0.5)
    assert flow["class_dropout"] == 0.1 and flow["normalize"] is False
    assert dit_flow_from_official({**cfg, "kappa": 3.0})["kappa"] == 3.0
    assert dit_flow_from_official({**cfg, "time_dist_shift_base": None})["kappa"] == 1.0
    # the official trainer shifts nothing without a base, even with kappa set
    no_base = {**cfg, "kappa": 3.0, "time_dist_shift_base": None}
    assert dit_flow_from_official(no_base)["kappa"] == 1.0


# --------------------------------------------------------------------------- import-official


def test_import_official_round_trip_to_sample(tmp_path, ref, vae, dit, invoke):
    r = invoke(["import-official", str(VAE_CKPT), "--out", str(tmp_path / "vae")])
    assert r.exit_code == 0, r.output
    assert "the official vae (custom" in r.output
    saved = load_file(str(tmp_path / "vae" / "model.safetensors"))
    for k, v in vae.state_dict().items():
        torch.testing.assert_close(saved[k], v, rtol=0, atol=0)

    r = invoke(
        [
            "import-official",
            str(DIT_CKPT),
            "--out",
            str(tmp_path / "dit"),
            "--vae",
            str(tmp_path / "vae"),
        ]
    )
    assert r.exit_code == 0, r.output
    raw = load_file(str(tmp_path / "dit" / "model.safetensors"))
    ema = load_file(str(tmp_path / "dit" / "ema.safetensors"))
    for k, v in dit.state_dict().items():
        torch.testing.assert_close(raw[k], v, rtol=0, atol=0)
        scale = 1.0 if k == "t_embed.W" else 0.5  # model_ema: every Param × 0.5, buffers kept
        torch.testing.assert_close(ema[k], v * scale, rtol=0, atol=0)

    out = tmp_path / "samples"
    r = invoke(
        [
            "sample",
            "--dit",
            str(tmp_path / "dit"),
            "--out",
            str(out),
            "--classes",
            "2,5",
            "--per-class",
            "1",
            "--steps",
            "6",
            "--cfg",
            "4.5",
            "--no-ema",
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    assert r.exit_code == 0, r.output
    latents = np.load(out / "latents.npy")
    features = np.load(out / "features.npy")
    assert latents.shape == (2, 4, 8) and features.shape == (2, 16, 24)
    with torch.no_grad():  # the imported VAE decodes what the imported DiT generated
        expected = vae.decode(torch.from_numpy(latents)).numpy()
    assert features.dtype == np.float16  # sample stores features in half precision
    np.testing.assert_allclose(features, expected, rtol=1e-3, atol=2e-3)
    flow = json.loads((tmp_path / "dit" / "flow.json").read_text())
    assert flow["official"]["checkpoint"].endswith("200") and flow["vae_checkpoint"]


def test_import_official_refuses_bad_input_in_one_line(tmp_path, invoke):
    (tmp_path / "empty").mkdir()
    r = invoke(["import-official", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "is not an official FlatDINO checkpoint" in r.output
    assert len(r.output.strip().splitlines()) == 1

    r = invoke(["import-official", str(VAE_CKPT), "--step", "7", "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "has no step 7; it has [100]" in r.output

    bare = tmp_path / "bare"  # no config item: the shapes must name a preset, and these do not
    shutil.copytree(VAE_CKPT, bare, ignore=shutil.ignore_patterns("config"))
    r = invoke(["import-official", str(bare), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "match no preset" in r.output and "enc_dim=32" in r.output

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("user data")
    r = invoke(["import-official", str(VAE_CKPT), "--out", str(tmp_path / "mine"), "--overwrite"])
    assert r.exit_code == 1 and "refusing to delete it" in r.output
    assert (tmp_path / "mine" / "keep.txt").exists()
    assert not list(tmp_path.glob(".o.partial-*")) and not (tmp_path / "o").exists()


def test_import_official_without_orbax_names_the_extra(tmp_path, invoke, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_orbax(name, *args, **kwargs):
        if name.startswith("orbax"):
            raise ImportError("No module named 'orbax'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_orbax)
    r = invoke(["import-official", str(VAE_CKPT), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "pip install 'flatdino[official]'" in r.output


def test_info_lists_the_presets_beside_the_official_counts(invoke):
    r = invoke(["info", "--presets", "--json"])
    assert r.exit_code == 0, r.output
    rows = {(row["model"], row["preset"]): row for row in json.loads(r.output)}
    assert (
        rows[("dit", "dit-xl")]["parameters"] == rows[("dit", "dit-xl")]["official"] == 675_478_016
    )
    paper = rows[("vae", "flatdino-32x128")]
    assert paper["parameters"] == paper["official"] == 517_915_648
    assert rows[("vae", "tiny")]["official"] is None


def test_a_checkpoint_of_the_older_layout_is_one_line(tmp_path):
    """VAE folders from before the official layout (a `logvar_init` field, `encoder.pos`)."""
    from safetensors.torch import save_file

    from flatdino.pipeline.checkpoints import load_vae
    from flatdino.pipeline.errors import FlatDinoError

    old = {
        "in_dim": 64,
        "num_patches": 256,
        "tokens": 8,
        "latent_dim": 16,
        "enc_dim": 64,
        "enc_depth": 2,
        "enc_heads": 2,
        "dec_dim": 64,
        "dec_depth": 2,
        "dec_heads": 2,
        "mlp_ratio": 4.0,
        "logvar_init": -5.0,
    }
    (tmp_path / "config.json").write_text(json.dumps(old))
    save_file({"encoder.pos": torch.zeros(1, 256, 64)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(FlatDinoError, match="must be trained again") as e:
        load_vae(tmp_path)
    assert "\n" not in str(e.value) and "logvar_init" in str(e.value)


def test_generator_shapes_that_match_no_preset_are_refused(ref):
    from flatdino.models.official import dit_config_from_shapes, dit_shapes

    tree = _tree(ref, "dit/")
    assert dit_shapes(tree) == {
        "tokens": 4,
        "latent_dim": 8,
        "dim": 32,
        "depth": 2,
        "num_classes": 10,
        "mlp_hidden": 85,
        "cls_dim": 0,
    }
    with pytest.raises(OfficialFormatError, match="match no preset"):
        dit_config_from_shapes(tree)
    with pytest.raises(OfficialFormatError, match="pred_type = 'x'"):
        dit_config_from_official({**_config(DIT_CKPT, 200), "pred_type": "x"})
