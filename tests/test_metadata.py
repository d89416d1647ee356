"""Damaged or mistaken metadata is one line (issue 29, part 4): a store's zarr.json, an array's
zarr.json (labels), its manifest; a run's config.json and flow.json that are empty, truncated or
another kind's; a run folder of one kind passed where another is expected, in every command that
takes one. Each message names the file, what it is, what was expected and what to do."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flatdino.cli.main import app
from flatdino.pipeline.checkpoints import load_pixel_decoder, resolve_vae
from flatdino.pipeline.errors import FlatDinoError, MetadataError
from flatdino.pipeline.feature_store import FeatureStore

FIXTURE = Path(__file__).parent / "fixtures" / "format-v2"
runner = CliRunner(env={"COLUMNS": "400", "NO_COLOR": "1"})
NAMES = {"vae": "VAE", "dit": "DiT", "decoder": "pixel decoder"}
TRAINERS = {"vae": "train-vae", "dit": "train-dit", "decoder": "train-decoder"}


def one_line_error(result, *fragments: str) -> str:
    """Exit 1, a single `error:` line holding every fragment, no traceback; the line."""
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def run(*args) -> object:
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """The v2 fixture's VAE and DiT runs and stores, and a tiny pixel decoder run beside them
    (a checkpoint folder as train-decoder writes it), copied: tests damage copies of these."""
    import torch
    from safetensors.torch import save_file

    from flatdino.models.pixel_decoder import PixelDecoder, pixel_decoder_preset

    root = tmp_path_factory.mktemp("runs")
    for name in ("vae", "dit", "features.zarr", "latents.zarr"):
        shutil.copytree(FIXTURE / name, root / name)
    ckpt = root / "decoder" / "checkpoints"
    ckpt.mkdir(parents=True)
    cfg = pixel_decoder_preset("tiny", in_dim=64)
    torch.manual_seed(0)
    save_file(PixelDecoder(cfg).state_dict(), str(ckpt / "model.safetensors"))
    (ckpt / "config.json").write_text(json.dumps(cfg.to_dict()))
    (root / "decoder" / "config.json").write_text(json.dumps({"train": {}, "model": cfg.to_dict()}))
    return root


def copy(runs: Path, name: str, tmp_path: Path) -> Path:
    shutil.copytree(runs / name, tmp_path / name, symlinks=True)
    return tmp_path / name


def damage(path: Path, how: str, other: Path | None = None) -> None:
    """empty: zero bytes; truncated: the first half; other: `other`'s bytes (another kind's)."""
    data = path.read_bytes()
    new = {"empty": b"", "truncated": data[: len(data) // 2]}
    path.write_bytes(new[how] if how in new else other.read_bytes())


FOUND = {"empty": "is empty", "truncated": "is truncated or corrupt (not JSON"}


# -- run folders of another kind, in every command that takes one -------------------------------


def _sample(runs: Path, tmp_path: Path, **given) -> list:
    options = {"dit": runs / "dit", "vae": runs / "vae", **given}
    args = [x for k, v in options.items() for x in (f"--{k.replace('_', '-')}", v)]
    out = ["--out", tmp_path / "s", "--n", "2", "--steps", "2", "--device", "cpu"]
    return ["sample", *args, *out, "--no-progress"]


def _sweep(runs: Path, tmp_path: Path, **given) -> list:
    options = {"dit": runs / "dit", "vae": runs / "vae", **given}
    args = [x for k, v in options.items() for x in (f"--{k}", v)]
    rest = ["--features", runs / "features.zarr", "--out", tmp_path / "sw", "--n", "4"]
    return ["sweep-cfg", *args, *rest, "--device", "cpu", "--no-progress"]


COMMANDS = {  # (command, option): the arguments with `run` as that option
    ("encode-latents", "vae"): lambda r, t, run: [
        "encode-latents",
        *("--features", r / "features.zarr", "--vae", run, "--out", t / "l.zarr"),
        *("--backend", "local", "--no-progress"),
    ],
    ("sample", "vae"): lambda r, t, run: _sample(r, t, vae=run),
    ("sample", "dit"): lambda r, t, run: _sample(r, t, dit=run),
    ("sample", "decoder"): lambda r, t, run: _sample(r, t, decoder=run),
    ("sample", "guide-dit"): lambda r, t, run: _sample(r, t, guide_dit=run),
    ("sweep-cfg", "dit"): lambda r, t, run: _sweep(r, t, dit=run),
    ("sweep-cfg", "vae"): lambda r, t, run: _sweep(r, t, vae=run),
    ("eval ablate", "vae"): lambda r, t, run: [
        *("eval", "ablate", "--features", r / "features.zarr", "--vae", run),
        *("--out", t / "a.png", "--images", "2", "--device", "cpu"),
    ],
    ("eval noise", "vae"): lambda r, t, run: [
        *("eval", "noise", "--features", r / "features.zarr", "--vae", run),
        *("--out", t / "n.json", "--images", "2", "--device", "cpu"),
    ],
    ("eval noise", "decoder"): lambda r, t, run: [
        *("eval", "noise", "--features", r / "features.zarr", "--vae", r / "vae"),
        *("--decoder", run, "--out", t / "n.json", "--images", "2", "--device", "cpu"),
    ],
    ("eval rfid", "vae"): lambda r, t, run: [
        *("eval", "rfid", "--features", r / "features.zarr", "--vae", run),
        *("--decoder", r / "decoder", "--out", t / "r.json", "--device", "cpu"),
    ],
    ("eval rfid", "decoder"): lambda r, t, run: [
        *("eval", "rfid", "--features", r / "features.zarr", "--vae", r / "vae"),
        *("--decoder", run, "--out", t / "r.json", "--device", "cpu"),
    ],
}
EXPECTED = {"vae": "vae", "dit": "dit", "guide-dit": "dit", "decoder": "decoder"}
CASES = [
    (command, option, wrong)
    for (command, option) in COMMANDS
    for wrong in ("vae", "dit", "decoder")
    if wrong != EXPECTED[option]
]


@pytest.mark.parametrize(("command", "option", "wrong"), CASES)
def test_a_run_of_another_kind_is_one_line(runs, tmp_path, command, option, wrong):
    """`encode-latents --vae RUN/dit` was a KeyError traceback, `sample --vae RUN/decoder` said
    the VAE "must be trained again": now the line says what the folder is and what to pass."""
    result = run(*COMMANDS[command, option](runs, tmp_path, runs / wrong))
    expected = EXPECTED[option]
    one_line_error(
        result,
        f"--{option} ",
        f"is a {NAMES[wrong]} checkpoint",
        f"not a {NAMES[expected]}'s",
        f"flatdino {TRAINERS[expected]}",
    )


@pytest.mark.parametrize("wrong", ["dit", "decoder"])
def test_library_loaders_tell_the_kind(runs, wrong):
    """train-dit's --sample-every monitor and import-official resolve --vae through
    `resolve_vae`; train-vae's and train-dit's --decoder through `load_pixel_decoder`."""
    with pytest.raises(MetadataError, match=f"is a {NAMES[wrong]} checkpoint.*not a VAE's"):
        resolve_vae(str(runs / wrong))
    with pytest.raises(MetadataError, match="is a VAE checkpoint .*not a pixel decoder's"):
        load_pixel_decoder(str(runs / "vae"))


@pytest.mark.parametrize("option", ["vae", "dit", "decoder"])
def test_a_missing_run_folder_says_so(runs, tmp_path, option):
    result = run(*_sample(runs, tmp_path, **{option: tmp_path / "nowhere"}))
    one_line_error(result, f"--{option} ", "does not exist")


# -- a run's config.json and flow.json: empty, truncated, another kind's -------------------------


@pytest.mark.parametrize("how", ["empty", "truncated", "other"])
@pytest.mark.parametrize("kind", ["vae", "dit", "decoder"])
def test_a_damaged_checkpoint_config_is_one_line(runs, tmp_path, kind, how):
    folder = copy(runs, kind, tmp_path)
    other = runs / ("vae" if kind != "vae" else "dit") / "checkpoints" / "config.json"
    damage(folder / "checkpoints" / "config.json", how, other)
    result = run(*_sample(runs, tmp_path, **{kind: folder}))
    found = FOUND.get(how) or "checkpoint (it has"
    one_line_error(result, "checkpoints/config.json", found, f"{NAMES[kind]}", TRAINERS[kind])


@pytest.mark.parametrize("how", ["empty", "truncated", "other"])
def test_a_damaged_flow_json_is_one_line(runs, tmp_path, how):
    dit = copy(runs, "dit", tmp_path)
    damage(dit / "checkpoints" / "flow.json", how, dit / "checkpoints" / "config.json")
    result = run(*_sample(runs, tmp_path, dit=dit))
    found = FOUND.get(how) or "is a DiT's config.json (it has rope_base"
    one_line_error(result, "flow.json", found, "DiT's flow.json", "flatdino train-dit")


@pytest.mark.parametrize("how", ["empty", "truncated", "other"])
def test_a_damaged_run_config_is_one_line_in_info_and_config(runs, tmp_path, how):
    vae = copy(runs, "vae", tmp_path)
    damage(vae / "config.json", how, runs / "dit" / "config.json")
    if how != "other":  # a DiT run's config.json is a readable run config: info shows a DiT
        one_line_error(run("info", vae), "vae/config.json", FOUND[how], "run's")
    args = ["train-vae", "--config", vae / "config.json", "--out", tmp_path / "new"]
    args += ["--features", runs / "features.zarr"]
    found = FOUND.get(how) or "is a DiT run's config.json"
    one_line_error(run(*args), "--config", found, "flatdino train-vae")


def test_a_checkpoint_config_is_not_a_run_config(runs, tmp_path):
    args = ["train-vae", "--config", runs / "vae" / "checkpoints" / "config.json"]
    args += ["--features", runs / "features.zarr", "--out", tmp_path / "x"]
    one_line_error(run(*args), "--config", "a checkpoint's", "no train")


# -- stores: zarr.json, an array's zarr.json (labels), the manifest ------------------------------


STORE_COMMANDS = {
    "features.zarr": lambda r, t, s: ["train-vae", "--features", s, "--out", t / "v"],
    "latents.zarr": lambda r, t, s: ["train-dit", "--latents", s, "--out", t / "d"],
}
OTHER_STORE = {"features.zarr": "latents.zarr", "latents.zarr": "features.zarr"}


@pytest.mark.parametrize("how", ["empty", "truncated", "array"])
@pytest.mark.parametrize("name", ["features.zarr", "latents.zarr"])
def test_a_damaged_store_zarr_json_is_one_line(runs, tmp_path, name, how):
    """Read as "no Zarr store there" before, which sent the user to build a store that exists."""
    store = copy(runs, name, tmp_path)
    damage(store / "zarr.json", "other" if how == "array" else how, store / "labels" / "zarr.json")
    found = FOUND.get(how) or "is a Zarr array's metadata"
    option = "--features" if name == "features.zarr" else "--latents"
    result = run(*STORE_COMMANDS[name](runs, tmp_path, store))
    one_line_error(result, f"{option} ", f"{name}/zarr.json", found, "store's zarr.json", "delete")
    one_line_error(run("info", store), f"{name}/zarr.json", found)


@pytest.mark.parametrize("name", ["features.zarr", "latents.zarr"])
def test_a_store_of_the_other_kind_is_named(runs, tmp_path, name):
    other = OTHER_STORE[name]
    result = run(*STORE_COMMANDS[name](runs, tmp_path, runs / other))
    maker = "extract-features" if other == "features.zarr" else "encode-latents"
    one_line_error(result, f"written by `flatdino {maker}`", "not a flatdino")


@pytest.mark.parametrize("how", ["empty", "truncated", "other"])
@pytest.mark.parametrize("name", ["features.zarr", "latents.zarr"])
def test_a_damaged_labels_zarr_json_is_one_line(runs, tmp_path, name, how):
    store = copy(runs, name, tmp_path)
    damage(store / "labels" / "zarr.json", how, store / "zarr.json")
    found = FOUND.get(how) or "is a Zarr group's metadata"
    one_line_error(run("info", store), "labels/zarr.json", found, "labels array", "delete")


@pytest.mark.parametrize("how", ["empty", "truncated", "other"])
def test_a_damaged_manifest_is_one_line(runs, tmp_path, how):
    import pyarrow as pa
    import pyarrow.parquet as pq

    store = copy(runs, "features.zarr", tmp_path)
    manifest = store / "manifest.parquet"
    if how == "other":  # another table: a Parquet file without the manifest's columns
        pq.write_table(pa.table({"x": [1, 2]}), manifest)
    else:
        damage(manifest, how)
    found = {"empty": "is empty", "truncated": "truncated or not Parquet"}.get(how, "no column")
    with pytest.raises(MetadataError, match=f"manifest.parquet.*{found}.*manifest") as e:
        FeatureStore(store).manifest()
    assert "\n" not in str(e.value)


def test_a_damaged_store_at_out_is_never_deleted(runs, tmp_path):
    store = copy(runs, "latents.zarr", tmp_path)
    damage(store / "zarr.json", "truncated")
    args = ["--features", runs / "features.zarr", "--vae", runs / "vae", "--out", store]
    result = run("encode-latents", *args, "--overwrite", "--backend", "local", "--no-progress")
    one_line_error(result, "--out", "zarr.json", "does not delete")
    assert (store / "mu" / "zarr.json").exists()


def test_info_on_a_missing_path_says_it_does_not_exist(tmp_path):
    one_line_error(run("info", tmp_path / "nothing"), "does not exist")
    with pytest.raises(FlatDinoError, match="does not exist"):
        FeatureStore(tmp_path / "nothing")
