"""Config fields that are also command-line options: default, help and constraints written once.

A stage's frozen config dataclass is the one place an option is defined. Each field is either

    option(default, help="...", min=1)      an option of the command built from the config
    internal(default)                       a setting with no option (Python callers, tests)

and the CLI (cli/generate.py) builds each command's typer options from these fields, so a default
or a help text is never typed twice. A field whose type is itself a config (the trainers' shared
`RunConfig`) is nested: its fields are options of the same command, flat (`--batch-size`), with
per-command defaults from the field's `default_factory` and help overrides from `helps`.

This module imports neither torch nor typer: `flatdino --help` reads the configs without them.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Callable, Sequence
from typing import Any

META = "flatdino"  # the key of the field metadata this module writes

# Help texts of options that several configs share (one text per option).
STORE_URL = " A local path or an s3:// / gs:// / az:// URL (`flatdino[cloud]`)."
DEVICE_HELP = "auto (cuda when visible, else cpu), cpu, cuda or cuda:N."
PROGRESS_HELP = "Show the progress bar."
DIST_TIMEOUT_HELP = (
    "Under torchrun: seconds a rank waits for the others at a collective or barrier; a rank that "
    "does not answer by then (stopped, hung file system, lost node) ends the job with one line "
    "naming it."
)
BACKEND_HELP = (
    "ray: CPU tasks read/decode shards, actors run the model; local: one process, no Ray."
)
WORKERS_HELP = "Model actors (Ray backend)."
GPUS_HELP = "GPUs per actor; default 1 when the Ray cluster has GPUs, else 0."
RAY_ADDRESS_HELP = (
    "Ray cluster address ('auto' inside `ray job submit`); default: start Ray locally."
)
PRECISION_HELP = (
    "Network precision: auto (bf16 autocast and TF32 matmuls on CUDA, fp32 on CPU), "
    "bf16, or fp32 (full precision, no TF32)."
)
BACKENDS = ("ray", "local")


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str = "",
    flags: Sequence[str] = (),
    min: float | None = None,
    max: float | None = None,
    choices: Sequence[str] | None = None,
    metavar: str | None = None,
    path: bool = False,
    argument: bool = False,
    factory: Callable[[], Any] | None = None,
    helps: dict[str, str] | None = None,
) -> Any:
    """A config field that is a command-line option.

    Args:
        default: the default (omit it for a required option).
        help: the option's help text.
        flags: the option's names when they are not `--field-name` (e.g. ("--overwrite",) for a
            flag without `--no-overwrite`, or ("--seed",) for the field `view_seed`).
        min, max: typer's range check.
        choices: the allowed strings (a registry's keys); the CLI shows and checks them.
        metavar: the value's name in --help.
        path: typed as a path on the command line (stored as its str, as `str(Path(text))`).
        argument: a positional argument instead of an option.
        factory: a default_factory instead of `default` (a nested config with this command's
            defaults).
        helps: for a nested config, help texts of its fields for this command (field -> help).
    """
    meta = {
        "help": help,
        "flags": tuple(flags),
        "min": min,
        "max": max,
        "choices": tuple(choices) if choices is not None else None,
        "metavar": metavar,
        "path": path,
        "argument": argument,
        "helps": dict(helps or {}),
    }
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={META: meta})
    return dataclasses.field(default=default, metadata={META: meta})


def internal(default: Any = dataclasses.MISSING):
    """A config field with no command-line option (set from Python, or kept from --config)."""
    return dataclasses.field(default=default, metadata={META: {"internal": True}})


def field_meta(f: dataclasses.Field) -> dict | None:
    """The option metadata of a field; None when the field was declared without option()."""
    return f.metadata.get(META)


def is_internal(f: dataclasses.Field) -> bool:
    return bool((field_meta(f) or {}).get("internal"))


def field_types(cls: type) -> dict[str, Any]:
    """The resolved type of every field of `cls` (string annotations evaluated)."""
    return typing.get_type_hints(cls)


def nested_fields(cls: type) -> dict[str, type]:
    """The fields of `cls` that hold a nested config (name -> its class)."""
    types = field_types(cls)
    return {
        f.name: types[f.name]
        for f in dataclasses.fields(cls)
        if isinstance(types[f.name], type) and dataclasses.is_dataclass(types[f.name])
    }


def flat_keywords(cls: type):
    """Class decorator: the config also takes (and reads) its nested configs' fields as flat names,
    `TrainDiTConfig(latents=..., out=..., steps=6, batch_size=16)`, so callers (and
    `dataclasses.replace(cfg, steps=...)`) need not know which fields are shared."""
    init = cls.__init__
    nested = nested_fields(cls)
    names = {n: {f.name for f in dataclasses.fields(t)} for n, t in nested.items()}
    defaults = {f.name: f.default_factory for f in dataclasses.fields(cls) if f.name in nested}

    @functools.wraps(init)
    def __init__(self, *args, **kw):
        for name, inner in names.items():
            given = {k: kw.pop(k) for k in list(kw) if k in inner}
            if given:
                base = kw.pop(name, None)
                base = defaults[name]() if base is None else base
                kw[name] = dataclasses.replace(base, **given)
        init(self, *args, **kw)

    def __getattr__(self, name: str):  # only called for names that are not fields of cls
        for outer, inner in names.items():
            if name in inner:
                return getattr(object.__getattribute__(self, outer), name)
        raise AttributeError(f"{cls.__name__!r} object has no attribute {name!r}")

    cls.__init__ = __init__
    cls.__getattr__ = __getattr__
    return cls


def flat_dict(cfg: Any) -> dict:
    """asdict(cfg) with the nested configs' fields at the top level (config.json's "train")."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.update(flat_dict(value))
        else:
            out[f.name] = value
    return out


def flatten_saved(cls: type, saved: dict) -> dict:
    """A saved "train" section, flat (every config.json so far) or nested, as flat keywords of
    `cls` (unknown keys dropped; lists turned back into the tuples of tuple fields)."""
    flat = dict(saved)
    for name in nested_fields(cls):
        if isinstance(flat.get(name), dict):
            flat.update(flat.pop(name))
    types = {}
    for c in (cls, *nested_fields(cls).values()):
        types.update(field_types(c))
    known = {f.name for f in all_fields(cls)}
    return {
        k: tuple(v) if isinstance(v, list) and typing.get_origin(types[k]) is tuple else v
        for k, v in flat.items()
        if k in known
    }


def all_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of `cls` with its nested configs' fields in place of the nested field."""
    out = []
    nested = nested_fields(cls)
    for f in dataclasses.fields(cls):
        out += all_fields(nested[f.name]) if f.name in nested else [f]
    return out
