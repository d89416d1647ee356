"""Each option once: the commands built from a config agree with it, and --help needs no torch."""

from __future__ import annotations

import dataclasses
import inspect
import json
import subprocess
import sys
from typing import Annotated

import click
import pytest
import typer

from flatdino.cli.generate import config_command, option_defaults
from flatdino.cli.main import app
from flatdino.cli.options import config_with_overrides
from flatdino.eval.configs import SweepConfig
from flatdino.models import configs as mc
from flatdino.pipeline.configs import EncodeConfig, ExtractConfig, ImportConfig
from flatdino.pipeline.options import (
    all_fields,
    field_meta,
    flat_dict,
    internal,
    is_internal,
    option,
)
from flatdino.sampling.configs import SampleConfig
from flatdino.trainers.configs import RunConfig, TrainDecoderConfig, TrainDiTConfig, TrainVAEConfig

COMMANDS = {
    "extract-features": ExtractConfig,
    "encode-latents": EncodeConfig,
    "import-official": ImportConfig,
    "train-vae": TrainVAEConfig,
    "train-dit": TrainDiTConfig,
    "train-decoder": TrainDecoderConfig,
    "sample": SampleConfig,
    "sweep-cfg": SweepConfig,
}
TEXT = {"cfg_interval", "scales", "interval_starts"}  # typed as text, parsed in the command


def config_defaults(cls: type) -> dict:
    """Every field's default as a config of `cls` holds it (nested defaults from the factory)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
            out.update(flat_dict(value) if dataclasses.is_dataclass(value) else {f.name: value})
        elif f.default is not dataclasses.MISSING:
            out[f.name] = f.default
    return out


def mismatches(command, cls: type, parsers: dict | None = None) -> list[str]:
    """What disagrees between a command and its config: a default that differs, a field with no
    option that is not internal, an option with no field."""
    parsers = parsers or {}
    options, problems = option_defaults(command), []
    params = set(command.__signature__.parameters) - {"ctx", "config"}
    defaults = config_defaults(cls)
    for f in all_fields(cls):
        if is_internal(f):
            continue
        if f.name not in params:
            problems.append(f"{cls.__name__}.{f.name}: no option and not internal")
            continue
        cli = options.get(f.name, dataclasses.MISSING)
        if f.name in parsers and cli is not dataclasses.MISSING:
            cli = parsers[f.name](cli)
        if cli != defaults.get(f.name, dataclasses.MISSING):
            problems.append(f"--{f.name}: CLI {cli!r} != config {defaults.get(f.name)!r}")
    fields = {f.name for f in all_fields(cls)}
    problems += [f"--{p}: no config field" for p in sorted(params - fields)]
    return problems


def _registered(name: str):
    return next(c.callback for c in app.registered_commands if c.name == name)


def _parse(text: str):
    return tuple(float(v) for v in text.split(","))


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_agrees_with_its_config(name):
    command, cls = _registered(name), COMMANDS[name]
    assert mismatches(command, cls, {k: _parse for k in TEXT}) == []
    for f in all_fields(cls):  # every field declared through option() or internal()
        assert field_meta(f) is not None, f"{cls.__name__}.{f.name}"


def test_the_check_catches_a_stray_default_and_a_field_without_option():
    """Today's (before) shape: a command typing its own default, a config field it forgot."""

    @dataclasses.dataclass(frozen=True)
    class Fake:
        steps: int = option(10, help="Steps.")
        seed: int = option(0, help="Seed.")
        forgotten: int = option(3, help="No option on the command.")
        hidden: int = internal(5)

    def command(
        ctx: typer.Context,
        steps: Annotated[int, typer.Option(help="Steps.")] = 20,  # typed again, and not 10
        seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    ) -> None: ...

    command.__signature__ = inspect.signature(command)
    assert mismatches(command, Fake) == [
        "--steps: CLI 20 != config 10",
        "Fake.forgotten: no option and not internal",
    ]
    generated = config_command(Fake, lambda ctx, values: None)
    assert mismatches(generated, Fake) == []  # built from the config: nothing to disagree


def test_nested_run_fields_are_flat_options_with_each_trainers_defaults():
    vae, dit = option_defaults(_registered("train-vae")), option_defaults(_registered("train-dit"))
    assert (vae["batch_size"], vae["lr"], vae["weight_decay"]) == (512, 1e-4, 0.02)
    assert (dit["batch_size"], dit["log_every"], dit["ckpt_every"]) == (1024, 100, 5000)
    assert "run" not in vae and "betas" not in vae  # flat; betas has no option
    cfg = TrainDiTConfig(latents="l", out="o", steps=6, batch_size=16)  # flat keywords
    assert isinstance(cfg.run, RunConfig) and (cfg.run.steps, cfg.batch_size) == (6, 16)
    assert dataclasses.replace(cfg, resume=True).run.resume and cfg.run.betas == (0.9, 0.95)
    assert flat_dict(cfg)["batch_size"] == 16 and "run" not in flat_dict(cfg)


class _Ctx:
    """A typer context whose every parameter came from the command line or the default."""

    def __init__(self, typed: set[str]):
        self.typed = typed

    def get_parameter_source(self, name):
        return click.core.ParameterSource.COMMANDLINE if name in self.typed else None


def test_config_files_written_before_the_nested_run_still_load(tmp_path):
    """An old-style flat "train" section (as every run folder so far has) and a nested one."""
    old = {
        "features": "f.zarr",
        "out": "runs/vae",
        "preset": "tiny",
        "steps": 100,
        "batch_size": 8,
        "lr": 3e-4,
        "betas": [0.9, 0.99],
        "num_workers": 0,
        "shuffle_buffer": 16,
        "removed_option": 1,  # a field of an older version: ignored
    }
    given = {**option_defaults(_registered("train-vae")), "out": "runs/other", "steps": 5}
    given = {k: v for k, v in given.items() if k != "config"}
    for train in (old, {**{k: v for k, v in old.items() if k != "lr"}, "run": {"lr": 3e-4}}):
        path = tmp_path / "config.json"
        path.write_text(json.dumps({"train": train, "model": {}}))
        cfg = config_with_overrides(TrainVAEConfig, path, given, _Ctx({"out", "steps"}))
        assert (cfg.preset, cfg.run.batch_size, cfg.run.lr, cfg.shuffle_buffer) == (
            "tiny",
            8,
            3e-4,
            16,
        )
        assert cfg.run.betas == (0.9, 0.99) and (cfg.run.steps, cfg.out) == (5, "runs/other")


def test_parameter_counts_without_torch_match_the_built_modules():
    """The preset help lists counts from the configs alone; they equal the built modules'."""
    from flatdino.models.dit import count_dit_parameters
    from flatdino.models.pixel_decoder import count_pixel_decoder_parameters
    from flatdino.models.vae import count_parameters

    for name, cfg in mc.VAE_PRESETS.items():
        assert mc.vae_parameters(cfg) == count_parameters(cfg), name
    for name, cfg in mc.DIT_PRESETS.items():
        assert mc.dit_parameters(cfg) == count_dit_parameters(cfg), name
    for name, cfg in mc.PIXEL_DECODER_PRESETS.items():
        assert mc.pixel_decoder_parameters(cfg) == count_pixel_decoder_parameters(cfg), name


def test_text_options_show_the_config_default():
    sample = option_defaults(_registered("sample"))
    sweep = option_defaults(_registered("sweep-cfg"))
    assert sample["cfg_interval"] == "0.225,1.0"
    assert (sweep["scales"], sweep["interval_starts"]) == ("1,2,3,4.5,6", "0,0.1,0.225,0.35")


def test_help_imports_no_torch():
    """`flatdino --help` and a command's --help answer without torch, timm or a stage module."""
    probe = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from flatdino.cli.main import app\n"
        "r = CliRunner()\n"
        "for args in (['--help'], ['train-dit', '--help'], ['sample', '--help']):\n"
        "    assert r.invoke(app, args).exit_code == 0, args\n"
        "heavy = [m for m in ('torch', 'timm', 'zarr', 'ray', 'flatdino.trainers.train_dit')\n"
        "         if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
