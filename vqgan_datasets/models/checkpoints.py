"""Model directories: Hub/local resolution, msgpack and safetensors I/O, and the weights digest
used in dataset fingerprints.

On-disk layout (vqgan-jax's, plus safetensors): `config.json`, `flax_model.msgpack` (the bare
parameter tree) and/or `model.safetensors` (the same tree flattened with "." separators).

The file layer below `modeling`: it imports only `config`, `params` (tree helpers and the
checks a file must pass) and `storage`, so the parameter shapes a file must have are passed in
(`modeling.param_shapes(config)`, built only once the cheap checks passed). Converting the
published checkpoints of each family, which needs the model, lives in `conversion`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .. import storage
from .config import VQGANConfig
from .params import (  # re-exported: callers name them checkpoints.X
    CheckpointError,
    check_fits,
    check_params,
    flatten,
    float_tensor,
    unflatten,
)

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
MSGPACK_NAME = "flax_model.msgpack"
SAFETENSORS_NAME = "model.safetensors"
_WEIGHT_FILES = (SAFETENSORS_NAME, MSGPACK_NAME)  # preference order: safetensors runs no code

# Public checkpoints whose config.json predates our `value_range` key. The evidence for each
# range is cited in model/README.md.
KNOWN_VALUE_RANGES: dict[str, tuple[float, float]] = {
    "flax-community/vqgan_f16_16384": (-1.0, 1.0),
    "dalle-mini/vqgan_imagenet_f16_16384": (-1.0, 1.0),
    "boris/vqgan_f16_16384": (-1.0, 1.0),
}


@dataclasses.dataclass(frozen=True)
class CheckpointSource:
    """Where weights came from: enough to name them in dataset metadata and fingerprints."""

    name: str  # Hub repo id or local path as the user gave it
    revision: str | None  # resolved commit hash for Hub checkpoints
    weights_file: str | None  # absolute path of the file read
    weights_digest: str  # "sha256:<hex>" of the weights file (or of the params, in memory)


# ---------------------------------------------------------------------------------------------
# Resolution: Hub id or local directory → a local directory with config.json and weights.


def resolve(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool | None = None,
) -> tuple[Path, str | None]:
    """A local directory holding the checkpoint, and the Hub commit hash when it came from the Hub.

    Local directories win; anything else is a Hub repo id fetched through huggingface_hub, which
    honours HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE.
    """
    path = Path(os.fspath(name_or_path)).expanduser()
    if path.is_dir():
        return path, None
    name = os.fspath(name_or_path)
    if path.suffix in (".ckpt", ".pt", ".pth"):
        raise CheckpointError(
            f"{name!r} is neither a model directory nor a Hub repo id; for a taming .ckpt file, "
            "run vqgan_datasets.convert_taming_checkpoint(...) (CLI: vqgan-datasets convert) first"
        )
    if path.exists():
        raise CheckpointError(
            f"{name!r} is a file, not a model directory ({CONFIG_NAME} and {SAFETENSORS_NAME} or "
            f"{MSGPACK_NAME})"
        )
    if _path_like(name):
        raise CheckpointError(f"{name!r}: no such directory (nor a Hub repo id: NAME or ORG/NAME)")
    return _download(name, revision, cache_dir, token, local_files_only)


def _path_like(name: str) -> bool:
    """A name that no Hub repo id can be (absolute or ./ ../ ~ paths, Windows paths, more than
    one '/'), so that a missing directory is not looked up on the Hub."""
    return (name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1
            or name.endswith("/") or name[1:2] == ":")


# One bare HEAD request (no retries, no other request first) decides whether the Hub answers
# at all: without network a model missing from the cache then fails at once, not after a minute
# of huggingface_hub's retries. A Hub that answers, whatever it says, gets those retries.
_HUB_PROBE_TIMEOUT_S = 3.0


def _hub_unreachable(repo_id: str, revision: str | None) -> str | None:
    """Why the Hub gave no answer for `repo_id` (refused, no DNS, timed out, proxy), or None."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import get_session

    try:
        get_session().head(hf_hub_url(repo_id, CONFIG_NAME, revision=revision),
                           timeout=_HUB_PROBE_TIMEOUT_S)
    except Exception as err:  # noqa: BLE001 - the HTTP library's transport errors, all alike
        waited = f" after {_HUB_PROBE_TIMEOUT_S:g} s" if "timeout" in repr(err).lower() else ""
        return f"{err.__class__.__name__}{waited}: {err}"
    return None


def _download(repo_id, revision, cache_dir, token, local_files_only) -> tuple[Path, str | None]:
    import huggingface_hub
    from huggingface_hub import constants as hub_constants
    from huggingface_hub.utils import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = bool(hub_constants.HF_HUB_OFFLINE or local_files_only)
    unreachable = None if offline else _hub_unreachable(repo_id, revision)

    def fetch(filename: str) -> str:
        if offline or unreachable:  # the cache alone: no request at all, not even a header's
            cached = huggingface_hub.try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir,
                                                            revision=revision)
            if isinstance(cached, str):
                return cached
            raise LocalEntryNotFoundError(f"{repo_id}/{filename} is not in the local cache")
        return huggingface_hub.hf_hub_download(
            repo_id, filename, revision=revision, cache_dir=cache_dir, token=token,
        )

    try:
        config_file = Path(fetch(CONFIG_NAME))
        for weights in _WEIGHT_FILES:
            try:
                fetch(weights)
                break
            except (EntryNotFoundError, LocalEntryNotFoundError):
                continue
        else:
            raise CheckpointError(
                f"Hub repo {repo_id!r} (revision {revision or 'main'}) has {CONFIG_NAME} but neither "
                f"{SAFETENSORS_NAME} nor {MSGPACK_NAME}"
                + (" in the local cache" if offline or unreachable else "")
            )
    except CheckpointError:
        raise
    except LocalEntryNotFoundError:
        why = (" (HF_HUB_OFFLINE is set)" if hub_constants.HF_HUB_OFFLINE else
               " (local_files_only)" if offline else
               f" ({hub_constants.ENDPOINT}: {unreachable})" if unreachable else "")
        raise CheckpointError(
            f"model {repo_id!r} (revision {revision or 'main'}) is not in the local Hugging Face "
            f"cache ({cache_dir or hub_constants.HF_HUB_CACHE}) and the Hub cannot be "
            f"reached{why}. Download it once with network access (`hf download {repo_id}`), or "
            "pass a local model directory."
        ) from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as err:
        raise CheckpointError(
            f"Hub repo {repo_id!r} or revision {revision or 'main'!r} does not exist or needs a "
            f"token (HF_TOKEN): {err.__class__.__name__}"
        ) from err
    except (HfHubHTTPError, OSError) as err:
        raise CheckpointError(
            f"could not fetch {repo_id!r} from the Hub ({err.__class__.__name__}: {err}). Set "
            "HF_HUB_OFFLINE=1 to use the local cache, or pass a local model directory."
        ) from err
    snapshot = config_file.parent
    commit = snapshot.name if re.fullmatch(r"[0-9a-f]{40}", snapshot.name) else revision
    return snapshot, commit


def fetch_file(repo_id: str, filename: str, *, revision: str | None = None,
               cache_dir: str | os.PathLike | None = None, token: str | bool | None = None,
               local_files_only: bool | None = None) -> tuple[Path, str | None]:
    """One published file of a Hub repo (e.g. LlamaGen's "vq_ds16_c2i.pt") in the local Hub
    cache, and the commit it came from."""
    import huggingface_hub
    from huggingface_hub.utils import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{filename!r} of Hub repo {repo_id!r} (revision {revision or 'main'})"
    try:
        file = Path(huggingface_hub.hf_hub_download(
            repo_id, filename, revision=revision, cache_dir=cache_dir, token=token,
            local_files_only=bool(local_files_only)))
    except LocalEntryNotFoundError as err:
        raise CheckpointError(
            f"{where} is not in the local Hugging Face cache and the Hub cannot be reached. "
            f"Download it once with network access (`hf download {repo_id} {filename}`), or pass "
            "the local file's path."
        ) from err
    except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError) as err:
        raise CheckpointError(f"{where} does not exist or needs a token (HF_TOKEN): "
                              f"{err.__class__.__name__}") from err
    except (HfHubHTTPError, OSError) as err:
        raise CheckpointError(f"could not fetch {where} ({err.__class__.__name__}: {err})") from err
    snapshot = file.parent
    while snapshot.parent.name != "snapshots" and snapshot != snapshot.parent:
        snapshot = snapshot.parent
    commit = snapshot.name if re.fullmatch(r"[0-9a-f]{40}", snapshot.name) else revision
    return file, commit


# ---------------------------------------------------------------------------------------------
# Reading and writing a model directory.


_WARNED_NO_RANGE: set[str] = set()


def load_config(directory: Path, name: str | None = None) -> VQGANConfig:
    """config.json → VQGANConfig; a known public checkpoint without `value_range` gets its own."""
    file = directory / CONFIG_NAME
    if not file.is_file():
        raise CheckpointError(f"{directory}: no {CONFIG_NAME} (expected a model directory)")
    try:
        data = json.loads(file.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{file}: not valid UTF-8 JSON ({err})") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(data).__name__}")
    if "value_range" not in data:
        known = KNOWN_VALUE_RANGES.get(str(name)) if name else None
        if known is None:
            if str(file.resolve()) not in _WARNED_NO_RANGE:  # once per file and process
                _WARNED_NO_RANGE.add(str(file.resolve()))
                logger.warning(
                    "%s has no value_range; assuming taming's [-1, 1]. Record it in config.json "
                    "(\"value_range\": [0, 1] or [-1, 1]) to silence this.",
                    file,
                )
            known = (-1.0, 1.0)
        data["value_range"] = list(known)
    try:
        return VQGANConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{file}: {err}") from err


def weights_file(directory: Path) -> Path:
    for name in _WEIGHT_FILES:
        if (directory / name).is_file():
            return directory / name
    raise CheckpointError(
        f"{directory}: no weights ({SAFETENSORS_NAME} or {MSGPACK_NAME}) next to {CONFIG_NAME}"
    )


def read_params(file: Path, expected_shapes: Mapping | Callable[[], Mapping],
                config: VQGANConfig | None = None) -> dict:
    """Read a weights file into a nested dict of float32 numpy arrays, checked against
    `expected_shapes` (see check_params; a callable is called only after the cheap checks).

    With `config`, the tensors are first compared with what the config needs (`check_fits`),
    so that a config that does not fit its weights fails before any model is built or traced.
    """
    flat = {k: _upgrade_legacy(k, float_tensor(v, file, k)) for k, v in _read_flat(file).items()}
    if config is not None:
        check_fits(flat, config, origin=str(file))
    shapes = expected_shapes() if callable(expected_shapes) else expected_shapes
    check_params(flat, shapes, origin=str(file))
    return unflatten(flat)


def _read_flat(file: Path) -> dict[tuple[str, ...], Any]:
    # Any parse failure of a damaged or foreign file becomes one error naming the file and format;
    # OSError (permissions, I/O) passes through as the operating system reported it.
    safetensors = file.name.endswith(".safetensors")
    try:
        if safetensors:
            from safetensors.numpy import load_file

            return {tuple(k.split(".")): v for k, v in load_file(str(file)).items()}
        from flax.serialization import msgpack_restore

        tree = msgpack_restore(file.read_bytes())
    except OSError:
        raise
    except Exception as err:  # noqa: BLE001 - safetensors and msgpack raise many kinds
        expected = ("safetensors file (expected a JSON header and float tensors)" if safetensors
                    else "msgpack file (expected flax's serialized parameter tree)")
        raise CheckpointError(
            f"{file}: not a readable {expected}; {err.__class__.__name__}: {err}".rstrip(": ")
        ) from err
    if isinstance(tree, Mapping) and set(tree) == {"params"}:
        tree = tree["params"]
    if not isinstance(tree, Mapping):
        raise CheckpointError(f"{file}: expected a tree of named arrays, got {type(tree).__name__}")
    return flatten(tree)


def _upgrade_legacy(key: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    # Old vqgan-jax uploads stored GroupNorm scale/bias as (1, 1, 1, C) (vqgan-jax PR #4).
    if key[-1] in ("scale", "bias") and value.ndim == 4 and value.shape[:3] == (1, 1, 1):
        return value.reshape(-1)
    return value


def save(directory: str | os.PathLike, config: VQGANConfig, params: Mapping,
         expected_shapes: Mapping, *, formats: tuple[str, ...] = ("safetensors", "msgpack")) -> Path:
    """Write the weights, then config.json (both weight formats by default: vqgan-jax reads the
    msgpack). `params` must match `expected_shapes` (see check_params); each file is written
    atomically, so a reader never sees a partial one."""
    from flax.serialization import msgpack_serialize

    flat = {k: np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for k, v in flatten(params).items()}
    check_params(flat, expected_shapes, origin="save_pretrained")
    writers = {
        "safetensors": (SAFETENSORS_NAME, lambda: _safetensors_bytes(flat)),
        "msgpack": (MSGPACK_NAME, lambda: msgpack_serialize(unflatten(flat))),
    }
    unknown = set(formats) - writers.keys()
    if unknown or not formats:
        raise ValueError(f"formats must be a non-empty subset of {sorted(writers)}, got {formats}")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for fmt in formats:
        name, payload = writers[fmt]
        with storage.atomic_write(out / name) as f:
            f.write(payload())
    with storage.atomic_write(out / CONFIG_NAME) as f:
        f.write(config.to_json_string().encode())
    return out


def _safetensors_bytes(flat: Mapping[tuple[str, ...], np.ndarray]) -> bytes:
    from safetensors.numpy import save

    return save({".".join(k): v for k, v in sorted(flat.items())}, metadata={"format": "flax"})


# ---------------------------------------------------------------------------------------------
# Digests: computed once per file (or taken from the Hub cache's content address).

# A cached digest is reused only for the same file (device, inode) with the same size, mtime
# and ctime. Replacing a file (os.replace, as huggingface_hub, save() and most tools do) gives it
# a new inode; rewriting it in place changes its ctime, which os.utime cannot set back. The
# kernel stamps ctime at its clock tick, so a rewrite within one tick of an earlier write could
# keep it: files changed less than _RACY_MARGIN_NS before hashing began are not cached (git's
# "racy" rule), which also covers coarse or skewed file-system clocks.
_RACY_MARGIN_NS = 2_000_000_000
_DIGEST_CACHE: dict[tuple[int, ...], str] = {}


def _identity(stat: os.stat_result) -> tuple[int, ...]:
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


def file_digest(file: Path) -> str:
    """"sha256:<hex>" of a weights file, free for Hub cache files (their blob name is the sha256)."""
    resolved = file.resolve()
    if re.fullmatch(r"[0-9a-f]{64}", resolved.name) and resolved.parent.name == "blobs":
        return f"sha256:{resolved.name}"
    started = time.time_ns()
    cached = _DIGEST_CACHE.get(_identity(resolved.stat()))
    if cached is not None:
        return cached
    sha = hashlib.sha256()
    with open(resolved, "rb") as f:
        before = _identity(os.fstat(f.fileno()))
        for chunk in iter(lambda: f.read(1 << 24), b""):
            sha.update(chunk)
        unchanged = _identity(os.fstat(f.fileno())) == before
    digest = f"sha256:{sha.hexdigest()}"
    if unchanged and before[-1] < started - _RACY_MARGIN_NS:
        _DIGEST_CACHE[before] = digest
    return digest


def params_digest(params: Mapping) -> str:
    """"params-sha256:<hex>" over names, shapes and float32 bytes of an in-memory tree."""
    sha = hashlib.sha256()
    for key, value in sorted(flatten(params).items()):
        array = np.ascontiguousarray(np.asarray(value, dtype=np.float32))
        sha.update("/".join(key).encode() + str(array.shape).encode())
        sha.update(array.tobytes())
    return f"params-sha256:{sha.hexdigest()}"
