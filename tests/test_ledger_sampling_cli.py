"""The refusals and rare outcomes of sampling/ and cli/ that no other test ran (the coverage ledger,
docs/coverage.md): a bundle whose parts do not fit, a damaged or stale output folder, ranks that
loaded other checkpoints, bad option text, and the CLI's less travelled messages. Every model here
is a tiny one saved by hand, so the whole file runs in seconds."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from conftest import fake_feature_store
from flatdino.cli import main as cli_main
from flatdino.cli.main import app
from flatdino.models.configs import dit_preset, vae_preset
from flatdino.models.dit import LightningDiT
from flatdino.models.vae import FlatDinoVAE
from flatdino.pipeline.checkpoints import FlowRecord, read_flow
from flatdino.pipeline.errors import FlatDinoError, MetadataError
from flatdino.sampling import bundle, outdir
from flatdino.sampling import sample as sample_mod
from flatdino.sampling.configs import SampleConfig
from flatdino.trainers.runner import Dist

runner = CliRunner(env={"COLUMNS": "250", "NO_COLOR": "1"})


def one_line_error(*args: str, **kw) -> str:
    """The CLI's output for `args`, checked to be one red line and exit 1."""
    result = runner.invoke(app, [str(a) for a in args], **kw)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> SimpleNamespace:
    """A tiny VAE (C = 8) and an untrained tiny DiT on its latents, saved as the trainers save
    them: what `load_bundle` and `sample` read."""
    root = tmp_path_factory.mktemp("tiny")
    vae, dit = root / "vae", root / "dit"
    vae_cfg = vae_preset("tiny", in_dim=8)
    vae.mkdir()
    save_file(FlatDinoVAE(vae_cfg).state_dict(), str(vae / "model.safetensors"))
    (vae / "config.json").write_text(json.dumps(vae_cfg.to_dict()))
    sha = hashlib.sha256((vae / "model.safetensors").read_bytes()).hexdigest()
    dit_cfg = dit_preset("tiny", tokens=vae_cfg.tokens, latent_dim=vae_cfg.latent_dim)
    dit.mkdir()
    state = LightningDiT(dit_cfg).state_dict()
    for name in ("model", "ema"):
        save_file(state, str(dit / f"{name}.safetensors"))
    stats = {"mean": torch.zeros(8, 16), "std": torch.ones(8, 16)}
    save_file(stats, str(dit / "latent_stats.safetensors"))
    (dit / "config.json").write_text(json.dumps(dit_cfg.to_dict()))
    flow = FlowRecord(kappa=1.0, vae_checkpoint=str(vae), latents_fingerprint={"vae_sha256": sha})
    (dit / "flow.json").write_text(json.dumps(flow.to_json()))
    return SimpleNamespace(vae=vae, dit=dit, flow=flow)


# sampling/bundle.py


def test_a_dit_that_names_no_vae_asks_for_vae():
    with pytest.raises(
        FlatDinoError, match=r"^the DiT checkpoint names no VAE; pass --vae RUN_DIR$"
    ):
        bundle._load_vae(None, FlowRecord(kappa=1.0))


def test_the_vae_the_dit_names_is_gone(tmp_path):
    flow = FlowRecord(kappa=1.0, vae_checkpoint=str(tmp_path / "moved"))
    with pytest.raises(FlatDinoError, match=r"--vae '.*moved' does not exist; .*train-vae`") as e:
        bundle._load_vae(None, flow)
    assert str(e.value).endswith(" (the VAE the DiT's latents came from; pass --vae)")


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("vae_checkpoint", 5, "a JSON string or null"),
        ("latents_fingerprint", [1], "a JSON object or null"),
        ("kappa", None, "a JSON number"),
        ("views", 2.5, "a JSON whole number or null"),
    ],
)
def test_a_hand_edited_flow_json_names_the_field(tmp_path, field, value, expected):
    """A flow.json field of the wrong JSON type: one line naming the file and the field, not a
    traceback later (an AttributeError) or a --vae nobody typed."""
    path = tmp_path / "flow.json"
    path.write_text(json.dumps({"kappa": 1.0, field: value}))
    with pytest.raises(MetadataError) as e:
        read_flow(path, "fix")
    message = str(e.value)
    assert message.startswith(f"{str(path)!r} has {field} {json.dumps(value)}, where {expected}")
    assert "\n" not in message


def test_a_decoder_for_other_features_than_the_vae_makes():
    decoder = SimpleNamespace(cfg=SimpleNamespace(num_patches=256, in_dim=768))
    vae = SimpleNamespace(cfg=SimpleNamespace(num_patches=256, in_dim=1024))
    with pytest.raises(
        FlatDinoError,
        match=r"^--decoder expects \(256, 768\) features but the VAE produces \(256, 1024\); use a "
        r"decoder for this backbone$",
    ):
        bundle._check_pair(decoder, vae)
    bundle._check_pair(decoder, SimpleNamespace(cfg=decoder.cfg))  # the same shape: accepted


def test_a_guide_without_flow_json(tiny, tmp_path):
    guide = tmp_path / "guide"
    guide.mkdir()
    for name in ("config.json", "model.safetensors"):
        (guide / name).write_bytes((tiny.dit / name).read_bytes())
    with pytest.raises(
        FlatDinoError,
        match=r"^--guide-dit '.*guide' is not a train-dit checkpoint \(no flow.json\); pass a "
        r"train-dit run folder or one of its RUN/steps/NNNNNNN$",
    ):
        bundle._load_guide(str(guide), True, None, tiny.flow)


# sampling/outdir.py


def test_out_that_is_a_file(tmp_path):
    (tmp_path / "out").write_text("mine")
    with pytest.raises(FlatDinoError, match=r"^--out '.*out' is a file; choose a folder$"):
        outdir.check_out(tmp_path / "out")


def test_folder_bytes_counts_the_files_below(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "x").write_bytes(b"12345")
    (tmp_path / "a" / "b" / "y").write_bytes(b"123")
    assert outdir.folder_bytes(tmp_path) == 8


def test_open_work_removes_other_configs_folders_and_half_written_batches(tmp_path, caplog):
    out = tmp_path / "samples"
    stale = outdir.work_folder(out, "otherconfig")
    (stale / "batches").mkdir(parents=True)
    for b in range(2):
        outdir.batch_file(stale, b).write_bytes(b"")
    mine = outdir.work_folder(out, "thisconfig")
    (mine / "batches").mkdir(parents=True)
    half = mine / "batches" / "000000.npz.tmp"
    half.write_bytes(b"half")
    with caplog.at_level(logging.WARNING, logger="flatdino.sampling.outdir"):
        work, done = outdir.open_work(out, "thisconfig", {"latents"})
    assert work == mine and done == set()
    assert not stale.exists() and not half.exists()
    assert f"removing {stale} (2 batch files): an unfinished sample run" in caplog.text


# sampling/sample.py


def test_classes_that_are_not_integers():
    cfg = SampleConfig(dit="", out="", classes="cat,dog")
    with pytest.raises(
        FlatDinoError, match=r"^--classes must be 'all' or integers like 207,360; got 'cat,dog'$"
    ):
        sample_mod.class_labels(cfg, 10)


def _cfg(tiny, out: Path) -> SampleConfig:
    return SampleConfig(
        dit=str(tiny.dit), out=str(out), n=2, steps=1, cfg=1.0, device="cpu", progress=False
    )


def test_a_rank_that_loaded_other_checkpoint_files_than_rank_0(tiny, tmp_path, monkeypatch):
    """Rank 1 of 2 (the waits replaced by rank 0's answer) sees another run key than its own."""

    def agree(d, group, error, payload=None):
        if error is not None:
            raise error
        return set(), 1, "0123456789ab"  # rank 0's (batches done, batches, run key)

    monkeypatch.setattr(sample_mod, "agree", agree)
    with pytest.raises(
        FlatDinoError,
        match=r"^rank 1 loaded other checkpoint files than rank 0 \(run key [0-9a-f]{12}, rank 0 "
        r"0123456789ab\); sample from a checkpoint that is not being written, e.g. RUN/steps/NNNNNNN$",
    ):
        sample_mod._sample(_cfg(tiny, tmp_path / "s"), Dist(rank=1, world=2), None)
    assert list(tmp_path.iterdir()) == []  # rank 1 writes nothing


def test_a_failure_while_generating_is_shared_and_keeps_the_work_folder(
    tiny, tmp_path, monkeypatch
):
    """The error goes through `agree` (so the other ranks raise too, instead of waiting)."""
    shared, real_agree = [], sample_mod.agree

    def generate(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    def agree(d, group, error, payload=None):
        shared.append(error)
        return real_agree(d, group, error, payload)

    monkeypatch.setattr(sample_mod, "generate", generate)
    monkeypatch.setattr(sample_mod, "agree", agree)
    with pytest.raises(RuntimeError, match="^CUDA out of memory$") as raised:
        sample_mod.sample(_cfg(tiny, tmp_path / "s"))
    assert shared[-1] is raised.value
    (work,) = tmp_path.iterdir()  # no --out; the work folder the rerun continues in
    assert work.name.startswith(".s.partial-") and (work / "batches").is_dir()


# cli/main.py


def test_extract_features_lists_the_images_that_failed(tmp_path):
    data = tmp_path / "data" / "a"
    data.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(data / f"{i}.png")
    (data / "broken.png").write_bytes(b"not a png")
    args = ["extract-features", "--data", data.parent, "--out", tmp_path / "f.zarr"]
    args += ["--backbone", "tiny", "--backend", "local", "--max-failed-fraction", "0.5"]
    result = runner.invoke(app, [str(a) for a in (*args, "--no-progress")])
    assert result.exit_code == 0, result.output
    assert "1 failed" in result.output
    assert "\n  failed: a/broken.png: UnidentifiedImageError: cannot identify" in result.output


def test_encode_latents_again_has_nothing_to_do(tiny, tmp_path):
    store = fake_feature_store(tmp_path / "f.zarr", channels=8)
    args = ["encode-latents", "--features", store, "--vae", tiny.vae, "--out", tmp_path / "l.zarr"]
    args = [str(a) for a in (*args, "--backend", "local", "--no-progress")]
    first = runner.invoke(app, args)
    assert first.exit_code == 0 and "encoded 4 images" in first.output, first.output
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert f"{tmp_path / 'l.zarr'}: complete already (4 images); nothing to do" in again.output


def test_flops_as_json(monkeypatch):
    import flatdino.eval.flops as flops

    row = {"module": "tiny", "latent": "32x128", "seq": 32, "params_M": 1.0, "forward_G": 2.0}
    monkeypatch.setattr(flops, "project_table", lambda: [row])  # counting the real ones: seconds
    result = runner.invoke(app, ["flops", "--json"])
    assert result.exit_code == 0, result.output
    table = json.loads(result.output)
    assert table["project"] == [row]
    assert [r["model"] for r in table["paper"]] == [r.model for r in flops.paper_table()]
    assert "Paper, Appendix H" not in result.output  # the JSON alone


def test_an_os_error_other_than_a_full_disk_is_not_hidden(monkeypatch):
    def app():
        raise PermissionError(errno.EACCES, "Permission denied", "/data")

    monkeypatch.setattr(cli_main, "app", app)
    with pytest.raises(PermissionError) as raised:
        cli_main.main()
    assert raised.value.errno == errno.EACCES


# cli/evals.py


def test_eval_knn_of_a_missing_store_is_one_line():
    line = one_line_error("eval", "knn", "--train", "/no/such.zarr", "--val", "/no/such.zarr")
    assert "/no/such.zarr" in line


def test_eval_redundancy_of_a_missing_store_is_one_line(tmp_path):
    line = one_line_error(
        "eval", "redundancy", "--features", "/no/such.zarr", "--out", tmp_path / "r"
    )
    assert "/no/such.zarr" in line and not (tmp_path / "r").exists()


# cli/options.py


def test_not_standalone_leaves_usage_errors_to_the_caller():
    result = runner.invoke(app, ["no-such-command"], standalone_mode=False)
    assert type(result.exception).__name__ == "UsageError"
    assert "No such command 'no-such-command'" in str(result.exception)
    assert result.output == ""


def test_an_abort_is_one_line(monkeypatch):
    """typer.Abort, which typer also raises for an EOFError (a prompt on a closed stdin)."""
    import flatdino.eval.flops as flops

    def aborted():
        raise EOFError

    monkeypatch.setattr(flops, "paper_table", aborted)
    result = runner.invoke(app, ["flops"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == ["error: aborted"]


# cli/sample.py


@pytest.mark.parametrize(
    "text, message",
    [
        ("0.2", r"expected two numbers like 0.225,1.0; got '0.2'"),
        ("low,1", r"expected two numbers like 0.225,1.0; got 'low,1'"),
        ("0.8,0.2", r"expected 0 <= low <= high <= 1; got '0.8,0.2'"),
        ("0.5,1.5", r"expected 0 <= low <= high <= 1; got '0.5,1.5'"),
    ],
)
def test_a_bad_cfg_interval_is_one_line(text, message, tmp_path):
    line = one_line_error(
        "sample", "--dit", tmp_path, "--out", tmp_path / "s", "--cfg-interval", text
    )
    assert line.startswith("error: flatdino sample: Invalid value: ") and message in line


# cli/generate.py


def test_a_config_field_without_option_is_a_programming_error():
    from flatdino.cli.generate import config_options

    @dataclasses.dataclass
    class Bad:
        plain: int = 1

    with pytest.raises(TypeError, match=r"^Bad.plain is neither option\(\) nor internal\(\)$"):
        config_options(Bad)


def test_an_option_with_a_default_factory():
    from flatdino.cli.generate import config_command, option_defaults
    from flatdino.pipeline.options import option

    @dataclasses.dataclass
    class WithList:
        sizes: str = option(factory=lambda: "1,2", help="Sizes.")

    command = config_command(WithList, lambda ctx, values: None)
    assert option_defaults(command) == {"sizes": "1,2"}


# cli/demo_run.py


def test_a_demo_state_whose_stages_are_not_a_mapping(tmp_path):
    from flatdino.cli.demo_run import _prepare
    from flatdino.cli.demo_stages import DemoConfig
    from flatdino.pipeline.errors import InputError

    cfg = DemoConfig(out=str(tmp_path))
    state = tmp_path / "demo-state.json"
    state.write_text(json.dumps({"recipe": cfg.recipe(), "stages": []}))
    with pytest.raises(
        InputError,
        match=r"^'.*demo-state.json' is unreadable \('stages' is not a mapping\); pass --fresh to "
        r"start over$",
    ):
        _prepare(cfg)
