"""Project exceptions: the CLI prints their message as one line and exits 1. Also the one reader
of JSON metadata (zarr.json, config.json, flow.json) that says what is wrong with a damaged file."""

import json


class FlatDinoError(Exception):
    """A user-facing error: the message says what was expected, what was found and what fixes it."""


class InputError(FlatDinoError):
    """The image input (directory, manifest, built-in set) is missing, empty or malformed."""


class WeightsError(FlatDinoError):
    """Backbone weights are missing, unreadable or do not fit the chosen architecture."""


class StoreMismatchError(FlatDinoError):
    """An existing store was made with other settings than the ones asked for now."""


class TooManyFailuresError(FlatDinoError):
    """More images failed to decode than `--max-failed-fraction` allows (the store is still complete)."""


class MetadataError(FlatDinoError):
    """A metadata file (a store's zarr.json or manifest, a run's config.json or flow.json) is
    missing, empty, truncated or of another kind than expected."""


def json_object(raw: bytes | str | None, where: str, expected: str, fix: str) -> dict:
    """The JSON object in `raw` (the bytes of file `where`; None: absent), or one line naming the
    file, what it holds, `expected` (what it should be) and `fix`."""
    found = None
    if raw is None:
        found = "is missing"
    elif not raw.strip():
        found = "is empty"
    else:
        try:
            data = json.loads(raw)
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            found = f"is truncated or corrupt (not JSON: {str(e)[:80]})"
        else:
            if isinstance(data, dict):
                return data
            found = f"holds a JSON {type(data).__name__}"
    raise MetadataError(f"{where!r} {found}, not {expected}; {fix}")
