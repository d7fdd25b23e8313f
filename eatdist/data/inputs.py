"""Naming a set of shards on the command line: folders, globs, brace patterns, lists and URLs."""

from __future__ import annotations

import glob as local_glob
import re
from pathlib import Path

from braceexpand import braceexpand

from eatdist.data.remote import glob as remote_glob
from eatdist.data.remote import is_pipe, is_remote, local_path, name_of, redact
from eatdist.errors import DataError

_GLOB = re.compile(r"[*?\[]")
_BRACES = re.compile(r"\{[^{}]*(,|\.\.)[^{}]*\}")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def _resolve_one(pattern: str) -> list[str]:
    if is_pipe(pattern):
        return [pattern]
    if is_remote(pattern):
        base = pattern.split("?", 1)[0]
        if _GLOB.search(base):
            return remote_glob(pattern)
        if base.endswith(TAR_SUFFIXES):
            # Not checked here: a missing shard is named when it is read, without a request per shard now.
            return [pattern]
        return remote_glob(base.rstrip("/") + "/*.tar")
    path = Path(local_path(pattern))
    if path.is_dir():
        return sorted(str(p) for p in path.glob("*.tar"))
    if _GLOB.search(str(path)):
        return sorted(local_glob.glob(str(path)))
    if not path.is_file():
        raise DataError(f"input shard not found: {pattern}")
    return [str(path)]


def resolve_shards(pattern: str | list[str]) -> list[str]:
    """Return the sorted shard paths and URLs that ``pattern`` names.

    ``pattern`` is a local folder (its ``*.tar``), a glob, one file, a brace pattern
    (``shard-{000000..000999}.tar``, ``{a,b}``), a URL (``https://``, ``s3://``, ``gs://``; a URL
    not ending in ``.tar`` is a prefix whose ``*.tar`` are listed, as is a URL glob, where the
    store can list), a ``pipe:CMD``, or a list of any of these. Raises:
        DataError: when nothing matches, a listed local file is missing, or two shards have the same
            file name (their outputs would overwrite each other).
    """
    patterns = pattern if isinstance(pattern, list) else [pattern]
    found: set[str] = set()
    for item in patterns:
        expanded = list(braceexpand(item)) if _BRACES.search(item) and not is_pipe(item) else [item]
        matched = [p for each in expanded for p in _resolve_one(each)]
        if not matched:
            raise DataError(f"no input shards match '{redact(item)}'")
        found.update(matched)
    names: dict[str, str] = {}
    for p in sorted(found):
        name = name_of(p)
        if name in names:
            raise DataError(
                f"input shards {redact(names[name])} and {redact(p)} have the same name; explain them apart"
            )
        names[name] = p
    return sorted(found)
