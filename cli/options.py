"""Option types and helpers shared by the commands: one help text per option, one error path."""

from __future__ import annotations

import logging
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

from ..pipeline.errors import FlatDinoError
from ..pipeline.options import (
    BACKEND_HELP,
    DEVICE_HELP,
    PROGRESS_HELP,
    flatten_saved,
)


class Backend(str, Enum):
    ray = "ray"
    local = "local"


# Options of the commands not built from a config (demo, eval): the configs' help texts.
DeviceOpt = Annotated[str, typer.Option(help=DEVICE_HELP)]
BackendOpt = Annotated[Backend, typer.Option(help=BACKEND_HELP)]
ProgressOpt = Annotated[bool, typer.Option(help=PROGRESS_HELP)]
ConfigOpt = Annotated[
    Path | None, typer.Option(help="A saved RUN/config.json; options given here override it.")
]


class OneLineErrors(TyperGroup):
    """The command group of every `flatdino` app: a bad option or value (click's usage errors)
    is one red line and exit 1, like every other user error, instead of a boxed message and 2."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except typer.TyperException as e:  # click's usage errors (typer vendors click)
            where = f"{e.ctx.command_path}: " if getattr(e, "ctx", None) else ""
            hint = f" (see `{e.ctx.command_path} --help`)" if getattr(e, "ctx", None) else ""
            typer.secho(f"error: {where}{e.format_message()}{hint}", fg="red", err=True)
            sys.exit(1)
        except typer.Abort:
            typer.secho("error: aborted", fg="red", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


# Every typer app of the CLI: plain help (rich markup would eat `flatdino[cloud]`'s brackets and
# label each option with its type), one-line usage errors, no completion commands.
APP_SETTINGS = dict(rich_markup_mode=None, cls=OneLineErrors, no_args_is_help=True)


def fail(message: str) -> None:
    """Print one red line to stderr and exit 1 (user errors never show a traceback)."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def setup_logging() -> None:
    """flatdino's log lines (INFO) and every library's warnings to stdout, as bare messages; under
    torchrun, ranks other than 0 print warnings only."""
    main = os.environ.get("RANK", "0") == "0" or int(os.environ.get("WORLD_SIZE", "1")) <= 1
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stdout, force=True)
    logging.getLogger("flatdino").setLevel(logging.INFO if main else logging.WARNING)


def config_with_overrides(
    cls, config: Path | None, given: dict, ctx: typer.Context, command: str = ""
) -> object:
    """cls(**saved config, **options the user typed): a saved config.json with CLI overrides.

    The saved "train" section may be flat (every config.json so far) or nested (`run`); fields
    it holds that have no option (e.g. betas) are kept too. A config.json that is damaged, a
    checkpoint's or another trainer's than `command` is refused in one line."""
    if config is None:
        return cls(**given)
    from ..pipeline.checkpoints import RUN_KINDS, config_kind, describe_json, read_json

    fix = f"pass the config.json of a `flatdino {command}` run folder (RUN/config.json)"
    try:
        data = read_json(Path(config), fix, "a run's config.json")
    except FlatDinoError as e:
        raise FlatDinoError(f"--config {e}") from None
    kind, keys = config_kind(data)
    if not isinstance(data.get("train"), dict):
        found = describe_json(data) + (", a checkpoint's" if kind else "")
        raise FlatDinoError(f"--config {str(config)!r} is {found}, not a run's (no train); {fix}")
    if command and kind is not None and RUN_KINDS[kind][1] != command:
        raise FlatDinoError(
            f"--config {str(config)!r} is a {RUN_KINDS[kind][0]} run's config.json (it has "
            f"{keys}), not the config of a `flatdino {command}` run; {fix}"
        )
    saved = data["train"]
    typed = {
        k: v
        for k, v in given.items()
        if getattr(ctx.get_parameter_source(k), "name", "") == "COMMANDLINE"
    }
    return cls(**{**given, **flatten_saved(cls, saved), **typed})
