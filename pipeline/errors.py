"""Project exceptions: the CLI prints their message as one line and exits 1."""


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
