"""What a shard run produced: output names, per-shard reports, and the manifest merged from
the stats files on disk (the truth: a shard is done when its tar and stats file both exist).

Output naming: one output tar per input shard, `output/<input name>.tar` or a pattern with
`{shard}` / `{index}`; next to each, `<name>.stats.json`, written last (the completion marker);
one `manifest.json` per run in the output folder.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import posixpath
import re
from collections.abc import Callable, Sequence
from typing import Any

from .. import storage
from ..metadata import METADATA_KEY, TokenizerSpec

__all__ = [
    "MANIFEST_NAME",
    "STATS_SUFFIX",
    "Manifest",
    "ShardReport",
    "TokenSpecNotFound",
    "collect",
    "log_summary",
    "normalize_output",
    "output_dir",
    "output_paths",
    "read_token_spec",
    "report_from_stats",
    "stats_path",
    "token_shard_urls",
    "write_manifest",
]

logger = logging.getLogger(__name__)

STATS_SUFFIX = ".stats.json"
MANIFEST_NAME = "manifest.json"


# ------------------------------------------------------------------------------ reports


@dataclasses.dataclass
class ShardReport:
    """One input shard: where it went and what happened to its samples."""

    url: str
    output: str
    stats_path: str
    # "written" (this run), "finished" (by an earlier run or another writer), "failed", or
    # "claimed" (another live writer holds it; only from convert_shard(wait=False))
    status: str
    samples_in: int = 0
    encoded: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    errors: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    error: str | None = None  # why the whole shard failed (status "failed")
    # tar members that became no sample, by reason (tarsamples.SKIP_REASONS)
    members_skipped: dict[str, int] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShardReport:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclasses.dataclass
class Manifest:
    """The result of a run: every shard it covers, and totals.

    From `tokenize_shards` on one process, or on JAX process 0 of a multi-host run (every shard
    of every process, merged from the stats files), or from `vqgan_datasets.ray.tokenize`.
    Other processes of a multi-host run get their own shards only; `path` still names the one
    merged manifest.
    """

    output: str
    shards: list[ShardReport]
    spec: dict[str, Any]
    process_index: int = 0
    process_count: int = 1
    worker_index: int = 0
    worker_count: int = 1
    seconds: float = 0.0
    path: str | None = None  # where the manifest JSON was written

    @property
    def written(self) -> list[ShardReport]:
        return [s for s in self.shards if s.status == "written"]

    @property
    def finished(self) -> list[ShardReport]:
        """Shards an earlier run completed; left as they were."""
        return [s for s in self.shards if s.status == "finished"]

    @property
    def failed_shards(self) -> list[ShardReport]:
        """Shards not converted (unreadable, truncated or corrupt, a sample that raised, or
        still held by another writer): a run with any is not complete."""
        return [s for s in self.shards if s.status in ("failed", "claimed")]

    @property
    def totals(self) -> dict[str, int]:
        """Sample counts over every completed shard (written now or before)."""
        done = [s for s in self.shards if s.status in ("written", "finished")]
        return {name: sum(getattr(s, name) for s in done)
                for name in ("samples_in", "encoded", "skipped", "failed")}

    @property
    def members_skipped(self) -> dict[str, int]:
        """Tar members that became no sample, by reason, over every shard (failed included:
        its members were read, and these are why some were not samples)."""
        counts: collections.Counter = collections.Counter()
        for shard in self.shards:
            counts.update(shard.members_skipped)
        return dict(sorted(counts.items()))

    @property
    def images_per_second(self) -> float:
        encoded = sum(s.encoded for s in self.written)
        return encoded / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": self.output,
            "process_index": self.process_index,
            "process_count": self.process_count,
            "worker_index": self.worker_index,
            "worker_count": self.worker_count,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 2),
            "shards_written": len(self.written),
            "shards_finished_before": len(self.finished),
            "shards_failed": len(self.failed_shards),
            "totals": self.totals,
            "members_skipped": self.members_skipped,
            METADATA_KEY: self.spec,
            "shards": [s.to_dict() for s in self.shards],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: str | None = None) -> Manifest:
        return cls(
            output=data["output"], shards=[ShardReport.from_dict(s) for s in data["shards"]],
            spec=data.get(METADATA_KEY, {}), process_index=data.get("process_index", 0),
            process_count=data.get("process_count", 1), worker_index=data.get("worker_index", 0),
            worker_count=data.get("worker_count", 1), seconds=data.get("seconds", 0.0), path=path,
        )


def log_summary(manifest: Manifest, what: str = "tokenize_shards") -> None:
    totals = manifest.totals
    members = manifest.members_skipped
    if members:
        logger.warning("%s: %d tar members were not samples (%s); the stats files list them",
                       what, sum(members.values()),
                       ", ".join(f"{reason}: {n}" for reason, n in members.items()))
    logger.info(
        "%s: %d shards written, %d finished before, %d failed; %d samples, "
        "%d encoded, %d skipped, %d failed; %.1f images/s over %.1f s; manifest %s",
        what, len(manifest.written), len(manifest.finished), len(manifest.failed_shards),
        totals["samples_in"], totals["encoded"], totals["skipped"], totals["failed"],
        manifest.images_per_second, manifest.seconds, manifest.path,
    )
    for report in manifest.failed_shards[:20]:
        logger.error("shard not converted: %s", report.error)
    if len(manifest.failed_shards) > 20:
        logger.error("... and %d more; the manifest lists them", len(manifest.failed_shards) - 20)



def report_from_stats(url: str, target: str, stats_file: str, stats: dict[str, Any],
                      status: str) -> ShardReport:
    """A shard's report from its stats file."""
    return ShardReport(
        url=url, output=target, stats_path=stats_file, status=status,
        samples_in=int(stats.get("samples_in", 0)), encoded=int(stats.get("encoded", 0)),
        skipped=int(stats.get("skipped", 0)), failed=int(stats.get("failed", 0)),
        seconds=float(stats.get("seconds", 0.0)), errors=list(stats.get("errors", [])),
        members_skipped={str(k): int(v) for k, v in stats.get("members_skipped", {}).items()},
    )


# ------------------------------------------------------------------------------ output names


def _shard_stem(url: str, index: int) -> str:
    """The input's file name without .tar/.tgz/.tar.gz; for pipe: commands, the last tar name."""
    names = re.findall(r"([^\s/|<>;'\"]+)\.(?:tar\.gz|tgz|tar)(?=$|[\s'\";|?#])", url)
    if names:
        return names[-1]
    base = posixpath.basename(url.split("?")[0].rstrip("/"))
    stem = re.sub(r"\.(tar\.gz|tgz|tar)$", "", base)
    return stem if stem and not url.startswith("pipe:") else f"{index:05d}"


def _output_path(output: str, url: str, index: int) -> str:
    stem = _shard_stem(url, index)
    if "{shard" in output or "{index" in output:
        return output.format(shard=stem, index=index)
    return storage.join(output, stem + ".tar")


def normalize_output(output: str | os.PathLike) -> str:
    return re.sub(r"^file://", "", os.fspath(output))


def output_paths(urls: Sequence[str], output: str | os.PathLike) -> list[str]:
    """The output tar of every input shard: `output/<input name>.tar`, or `output` formatted
    with `{shard}` (the input's name without .tar) and `{index}` (its position). Two inputs
    that would share an output raise."""
    output = normalize_output(output)
    outputs = [_output_path(output, url, i) for i, url in enumerate(urls)]
    clashes = [o for o, n in collections.Counter(outputs).items() if n > 1]
    if clashes:
        raise ValueError(
            f"several input shards map to the output {clashes[0]!r}; use a pattern with "
            "{index} (e.g. 'out/{index:05d}.tar') or inputs with distinct file names"
        )
    return outputs


def stats_path(output_file: str) -> str:
    return re.sub(r"\.tar$", "", output_file) + STATS_SUFFIX


def output_dir(output: str) -> str:
    """Where the manifest goes: the directory, or a pattern's directory before any field."""
    fields = [i for i in (output.find("{shard"), output.find("{index")) if i >= 0]
    return storage.split(output[: min(fields)])[0] if fields else output  # "{" may be a name's



# ------------------------------------------------------------------------------ merging


def collect(urls: list[str], output: str, statuses: dict[str, ShardReport],
            process_error: Callable[[int], str | None] = lambda i: None) -> Manifest:
    """Every shard's report from its stats file on disk; `statuses` (by output path) says
    written or finished, and why a shard failed. A shard with no stats file is not done,
    whatever anyone reported. The spec is the first stats file's."""
    outputs = output_paths(urls, output)

    def report(i: int) -> tuple[ShardReport, dict | None]:
        target, known = outputs[i], statuses.get(outputs[i])
        stats_file = stats_path(target)
        stats = storage.read_json(stats_file) if storage.exists(target) else None
        if stats is not None:
            status = known.status if known is not None and known.status != "failed" else "finished"
            return (report_from_stats(urls[i], target, stats_file, stats, status),
                    stats.get(METADATA_KEY))
        if known is not None and known.status == "failed":
            return known, None
        why = process_error(i) or "no stats file"
        return ShardReport(url=urls[i], output=target, stats_path=stats_file, status="failed",
                           error=f"{urls[i]} not finished ({why}); a rerun converts it"), None

    found = storage.parallel(report, range(len(urls)))
    spec = next((s for _, s in found if s), {})
    return Manifest(output=output, shards=[r for r, _ in found], spec=spec)


def write_manifest(inputs: str | Sequence[str], output: str | os.PathLike) -> Manifest:
    """Write `manifest.json` for an output from the stats files on disk, e.g. after processes
    that JAX did not coordinate each converted their share. Shards without a stats file are
    listed as failed (a rerun converts them)."""
    output = normalize_output(output)
    manifest = collect(storage.expand_urls(inputs), output, {})
    manifest.path = storage.join(output_dir(output), MANIFEST_NAME)
    storage.write_json(manifest.path, manifest.to_dict())
    log_summary(manifest, "write_manifest")
    return manifest


# ------------------------------------------------------------------------------ token records

Source = str | os.PathLike | Sequence[str | os.PathLike]


class TokenSpecNotFound(ValueError):
    """Token shards whose tokenizer record is nowhere to be found (the message says where we
    looked and what to pass instead)."""


def read_token_spec(source: Source) -> TokenizerSpec:
    """The TokenizerSpec of token shards: `source` is a folder of them, a brace pattern, a
    "::"-joined list or a list of shard URLs, or one shard.

    Per folder involved: the stats file of its first shard (`<name>.stats.json`), else its
    `manifest.json`. Raises TokenSpecNotFound naming the files looked at, or ValueError when
    two folders record different tokenizers.
    """
    looked: list[str] = []
    found: list[tuple[str, TokenizerSpec]] = []
    for candidates in _record_places(source):
        for path in candidates:
            looked.append(path)
            data = storage.read_json(path)
            record = data.get(METADATA_KEY) if isinstance(data, dict) else None
            try:
                spec = TokenizerSpec.from_dict(record) if record else None
            except (KeyError, TypeError, ValueError):
                spec = None
            if spec is not None:
                found.append((path, spec))
                break
    if not found:
        where = ", ".join(looked) if looked else "no file (pipe: URLs carry none)"
        shown = (os.fspath(source) if isinstance(source, (str, os.PathLike))
                 else [os.fspath(s) for s in source])
        raise TokenSpecNotFound(
            f"no tokenizer record for the token shards {shown!r}: looked at {where}; pass the "
            "model that made them (--model / model=)"
        )
    first, spec = found[0]
    for path, other in found[1:]:
        if other.fingerprint() != spec.fingerprint():
            raise ValueError(f"{first} and {path} record different tokenizers "
                             f"({spec.mismatch(other) or 'settings differ'}); decode them apart")
    return spec


def token_shard_urls(source: Source) -> list[str]:
    """The token shards of `source`: for a folder, its `*.tar` files that have a stats file
    (all its `*.tar` when none has: shards written by other tools), sorted; otherwise the
    expanded URLs."""
    folder = _folder(source)
    if folder is None:
        return storage.expand_urls(source)
    names = storage.list_names(folder)
    tars = sorted(n for n in names if n.endswith(".tar") and not n.startswith("."))
    done = [n for n in tars if n[: -len(".tar")] + STATS_SUFFIX in names]
    return [storage.join(folder, n) for n in (done or tars)]


def _folder(source: Source) -> str | None:
    if not isinstance(source, (str, os.PathLike)):
        return None
    path = normalize_output(source)
    if "::" in path or path.startswith("pipe:"):
        return None
    return path if storage.isdir(path) else None  # by what it is: "{" may be in a folder name


def _record_places(source: Source) -> list[list[str]]:
    """Per folder of `source`: the files that may hold its record, best first."""
    folder = _folder(source)
    if folder is not None:
        names = storage.list_names(folder)
        stats = sorted(n for n in names if n.endswith(STATS_SUFFIX) and not n.startswith("."))
        return [[storage.join(folder, n) for n in stats[:1] + [MANIFEST_NAME]]]
    places: dict[str, list[str]] = {}
    for url in storage.expand_urls(source):
        url = normalize_output(url)
        if url.startswith("pipe:") or url == "-" or url.endswith("/"):
            continue
        directory = storage.split(url)[0]
        if directory not in places:
            places[directory] = [stats_path(url), storage.join(directory, MANIFEST_NAME)]
    return list(places.values())
