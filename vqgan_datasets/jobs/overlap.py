"""Outputs never overwrite inputs: every job checks its outputs against its inputs before it
reads anything, however the paths are spelled (relative or absolute, `..`, symlinks, hard
links, `file://`).

An output file must not be an input file; an output folder (one the job writes files into)
must not be an input file nor hold one. Paths of other schemes (s3://...) are compared as
normalised URLs; `pipe:` commands are not paths and are not compared.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["OutputIsInputError", "check_outputs", "check_shard_outputs"]


class OutputIsInputError(ValueError):
    """An output of a job would overwrite an input, or be written into a folder holding one."""


@dataclass(frozen=True)
class _Place:
    given: str  # as the user spelled it
    resolved: str  # absolute, symlinks resolved
    names: frozenset[str]  # normalised spellings: absolute, resolved (symlinks)
    inode: tuple[int, int] | None  # (device, inode) of an existing local file or folder

    def same(self, other: _Place) -> bool:
        return bool(self.names & other.names) or (self.inode is not None
                                                   and self.inode == other.inode)

    def holds(self, other: _Place) -> bool:
        """`other` lies inside this folder, by any of their spellings."""
        return any(name.startswith(folder.rstrip("/\\") + sep)
                   for folder in self.names for name in other.names
                   for sep in {os.sep, "/"})


def _place(path: str | os.PathLike) -> _Place | None:
    given = os.fspath(path)
    if given.startswith("pipe:") or given == "-":
        return None
    text = re.sub(r"^file://", "", given)
    match = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://(.*)$", text)
    if match:
        url = f"{match.group(1).lower()}://{posixpath.normpath('/' + match.group(2)).lstrip('/')}"
        return _Place(given, url, frozenset({url}), None)
    resolved = os.path.realpath(text)
    names = {os.path.normcase(os.path.abspath(text)), os.path.normcase(resolved)}
    try:
        stat = os.stat(text)
        inode = (stat.st_dev, stat.st_ino)
    except OSError:
        inode = None
    return _Place(given, resolved, frozenset(names), inode)


def _shown(place: _Place) -> str:
    return place.given if place.given == place.resolved else f"{place.given} (= {place.resolved})"


def check_outputs(inputs: Iterable[str | os.PathLike], *, files: Iterable[str | os.PathLike] = (),
                  folders: Iterable[str | os.PathLike] = ()) -> None:
    """Raise OutputIsInputError, naming both paths, when one of the output `files` is one of
    the `inputs` or when one of the output `folders` is an input or holds one."""
    sources = [p for p in map(_place, inputs) if p is not None]
    if not sources:
        return
    by_name = {name: source for source in sources for name in source.names}
    by_inode = {source.inode: source for source in sources if source.inode is not None}
    for target in filter(None, map(_place, files)):
        source = next((by_name[n] for n in target.names if n in by_name), None)
        if source is None and target.inode is not None:  # a hard link, or case-insensitive
            source = by_inode.get(target.inode)
        if source is not None:
            raise OutputIsInputError(
                f"the output {_shown(target)} is the input "
                f"{_shown(source)}: writing it would destroy the input; "
                "choose another output"
            )
    for folder in filter(None, map(_place, folders)):
        for source in sources:
            if folder.same(source) or folder.holds(source):
                raise OutputIsInputError(
                    f"the output folder {_shown(folder)} "
                    f"{'is' if folder.same(source) else 'holds'} the input "
                    f"{_shown(source)}: files written there could overwrite "
                    "or mix with the input; choose another output folder"
                )


def check_shard_outputs(inputs: str | os.PathLike | Sequence[str], output: str | os.PathLike,
                        ) -> None:
    """The check for a shard run: its output tars, their stats files and the manifest."""
    from .. import storage
    from .manifest import MANIFEST_NAME, normalize_output, output_dir, output_paths, stats_path

    urls = storage.expand_urls(inputs)
    outputs = output_paths(urls, output)
    manifest = storage.join(output_dir(normalize_output(output)), MANIFEST_NAME)
    check_outputs(urls, files=[*outputs, *map(stats_path, outputs), manifest])
