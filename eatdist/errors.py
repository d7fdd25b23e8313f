"""Errors a user can act on. The CLI prints them as one line and exits non-zero."""

from __future__ import annotations

import difflib


class EatdistError(Exception):
    """A mistake in the input (config, paths, data, model package), explained in one line."""


class ConfigError(EatdistError):
    """An unknown key, a wrong type or a malformed override in a configuration."""


class DataError(EatdistError):
    """A corpus, shard or sample that cannot be used."""


class BackboneError(EatdistError):
    """An unknown backbone, or a plugin that breaks the backbone contract."""


class ModelPackageError(EatdistError):
    """A path that is not a usable eatdist model package."""


def close_matches(word: str, candidates: list[str], n: int = 3) -> str:
    """Return ' (did you mean: a, b?)' for the closest candidates, or '' when none is close."""
    found = difflib.get_close_matches(word, candidates, n=n, cutoff=0.6)
    return f" (did you mean: {', '.join(found)}?)" if found else ""
