"""Commands generated from config dataclasses: each field's option, default and help come from the
field (pipeline/options.py), so the command line and the config never disagree.

`config_command(Config, body)` returns a function whose signature typer reads: one
`Annotated[T, typer.Option(...)]` keyword per field of Config (the fields of a nested config such
as the trainers' RunConfig flat among them), plus the CLI-only parameters a command adds. The body
gets the typed values as config keywords (choices as their strings, paths as `str`)."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from ..pipeline.errors import FlatDinoError
from ..pipeline.options import field_meta, field_types, is_internal, nested_fields
from .options import fail


@dataclasses.dataclass(frozen=True)
class Text:
    """An option typed as text on the command line, e.g. a tuple as "0.225,1.0": `show` writes
    the config default as that text, `parse` reads it back (in the command, so its errors are the
    command's)."""

    show: Callable[[Any], str]
    parse: Callable[[str], Any]


@dataclasses.dataclass(frozen=True)
class Opt:
    """One command-line option of a config field (a nested config's field included)."""

    name: str  # the field name, also the parameter name typer sees
    hint: Any  # the field's type
    default: Any  # dataclasses.MISSING: required
    meta: dict


def config_options(cls: type) -> list[Opt]:
    """The options of `cls`: its fields, a nested config's fields in its place (with this
    config's defaults and help overrides), without the internal ones."""
    hints, nested, out = field_types(cls), nested_fields(cls), []
    for f in dataclasses.fields(cls):
        if is_internal(f):
            continue
        meta = field_meta(f)
        if meta is None:
            raise TypeError(f"{cls.__name__}.{f.name} is neither option() nor internal()")
        if f.name not in nested:
            out.append(Opt(f.name, hints[f.name], _default(f), meta))
            continue
        inner_default, helps = f.default_factory(), meta["helps"]
        for o in config_options(nested[f.name]):
            meta2 = {**o.meta, "help": helps.get(o.name, o.meta["help"])}
            out.append(Opt(o.name, o.hint, getattr(inner_default, o.name), meta2))
    return out


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _optional(hint: Any) -> bool:
    return type(None) in typing.get_args(hint)


def _parameter(cls: type, o: Opt, text: Text | None) -> inspect.Parameter:
    """The typer parameter of one option."""
    m, hint, default = o.meta, o.hint, o.default
    if text is not None:
        hint, default = str, text.show(default)
    elif m["choices"] is not None:
        choices = Enum(f"{cls.__name__}_{o.name}", {c: c for c in m["choices"]}, type=str)
        hint = choices | None if _optional(o.hint) else choices
        default = choices(default) if isinstance(default, str) else default
    elif m["path"]:
        hint = Path | None if _optional(o.hint) else Path
    if m.get("argument"):
        info = typer.Argument(help=m["help"], metavar=m["metavar"])
    else:
        flags, bounds = m["flags"], {"min": m["min"], "max": m["max"]}
        info = typer.Option(*flags, help=m["help"], metavar=m["metavar"], **bounds)
    empty = default is dataclasses.MISSING
    return inspect.Parameter(
        o.name,
        inspect.Parameter.KEYWORD_ONLY,
        default=inspect.Parameter.empty if empty else default,
        annotation=Annotated[hint, info],
    )


def _value(value: Any) -> Any:
    """A typer value as the config stores it: a choice's string, a path's str."""
    if isinstance(value, Enum):
        return value.value
    return str(value) if isinstance(value, Path) else value


def config_command(
    cls: type,
    body: Callable[..., None],
    *,
    text: dict[str, Text] | None = None,
    extra: list[inspect.Parameter] = (),
    doc: str | None = None,
) -> Callable[..., None]:
    """A typer command built from `cls`: body(ctx, values, **extra values), where `values` are the
    config keywords the user's options give. A FlatDinoError from the body (or from a `text`
    parser) is one red line and exit 1."""
    text = text or {}
    opts = config_options(cls)
    ctx = inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)
    params = [ctx] + [_parameter(cls, o, text.get(o.name)) for o in opts] + list(extra)
    names = {o.name for o in opts}

    def command(**kw: Any) -> None:
        try:
            values = {k: _value(v) for k, v in kw.items() if k in names}
            for k, t in text.items():
                values[k] = t.parse(values[k])
            body(kw["ctx"], values, **{p.name: kw[p.name] for p in extra})
        except FlatDinoError as e:
            fail(str(e))

    command.__signature__ = inspect.Signature(params)  # what typer reads
    command.__doc__ = doc
    command.__name__ = f"{cls.__name__}_command"
    return command


def option_defaults(command: Callable[..., None]) -> dict[str, Any]:
    """The default of every option of a generated command, as its config would hold it (for the
    test that holds the CLI and the configs together)."""
    out = {}
    for p in inspect.signature(command).parameters.values():
        if p.default is not inspect.Parameter.empty:
            out[p.name] = _value(p.default)
    return out
