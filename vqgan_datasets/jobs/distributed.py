"""Beyond one machine with JAX alone: multi-host runs (TPU pods, GPU clusters under SLURM).

Tokenizing is data parallel per host: each process encodes its own share of the data on its
local devices and no array ever crosses hosts. So the only cross-process steps are starting
JAX's distributed runtime (`initialize`), choosing a share (`process_split`, `split_dataset`,
`assign` for shard runs, which also splits over torch DataLoader workers) and waiting for the
others (`barrier`). The one rule of multi-host JAX applies to them: every
process must run the same cross-process steps in the same order, or the run hangs.

For Ray clusters, see `vqgan_datasets.ray` instead; it needs none of this.
"""

from __future__ import annotations

import itertools
import logging
import sys
import threading
from collections.abc import Iterable
from typing import Any, TypeVar

__all__ = ["assign", "barrier", "check_split", "initialize", "process_count", "process_index",
           "process_split", "split_dataset", "torch_worker"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

# jax's message when neither the arguments, JAX_COORDINATOR_ADDRESS nor any cluster it knows
# (Cloud TPU, SLURM, Open MPI, Kubernetes...) gave it a coordinator: not a multi-host run.
_NO_CLUSTER = "coordinator_address should be defined"

_barrier_counts: dict[str, itertools.count] = {}
_barrier_lock = threading.Lock()


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool = False,
    **kwargs: Any,
) -> bool:
    """Start JAX's distributed runtime when asked; True when it is running afterwards.

    Call it first, before anything uses a JAX device (loading a model does not; encoding
    does). Explicit arguments (e.g. `initialize("10.0.0.1:1234", 16, rank)`) always start it.
    `auto=True` lets JAX's own detection decide: on a Cloud TPU pod slice, under SLURM
    (`srun`), Open MPI (`mpirun`) or a Kubernetes JobSet, or with JAX_COORDINATOR_ADDRESS and
    friends set, JAX finds the coordinator, the process count and this process's id and starts;
    anywhere else it finds nothing and this returns False: one process, nothing started. With
    neither, nothing happens (a library never joins a cluster by surprise). Other keywords go
    to `jax.distributed.initialize` (e.g. `heartbeat_timeout_seconds`, `local_device_ids`). A
    second call is a no-op.
    """
    import jax

    if jax.distributed.is_initialized():
        logger.debug("jax.distributed is already initialized; nothing to do")
        return True
    explicit = (coordinator_address, num_processes, process_id) != (None, None, None)
    if not explicit and not auto:
        return False
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id, **kwargs)
    except ValueError as e:
        if explicit or _NO_CLUSTER not in str(e):
            raise
        logger.info("no multi-host environment detected (%s); running as one process", e)
        return False
    logger.info("jax.distributed initialized: process %d of %d, %d local devices",
                jax.process_index(), jax.process_count(), jax.local_device_count())
    return True


def process_index() -> int:
    import jax

    return jax.process_index()


def process_count() -> int:
    import jax

    return jax.process_count()


def process_split(items: Iterable[T], index: int | None = None,
                  count: int | None = None) -> list[T]:
    """This process's share: the items at positions i with i % count == index (round robin,
    so that every process gets a similar mix of the early and late items). Defaults: JAX's
    process index and count."""
    index = process_index() if index is None else index
    count = process_count() if count is None else count
    if isinstance(index, bool) or isinstance(count, bool) or count < 1 or not 0 <= index < count:
        raise ValueError(f"process index must be in [0, count); got {index} of {count}")
    return list(itertools.islice(items, index, None, count))


def assign(count: int, process: tuple[int, int], worker: tuple[int, int]) -> list[int]:
    """The items of a shard run this (process, worker) converts: item i goes to process
    i % P; within a process, its j-th item to worker j % W."""
    mine = process_split(range(count), *process)
    return mine[worker[0]::worker[1]]


def check_split(name: str, index: int, count: int) -> tuple[int, int]:
    """(index, count) as ints, checked: `name`_index in [0, `name`_count)."""
    if isinstance(index, bool) or isinstance(count, bool) or count < 1 or not 0 <= index < count:
        raise ValueError(f"{name}_index must be in [0, {name}_count); got {index} of {count}")
    return int(index), int(count)


def torch_worker() -> tuple[int, int]:
    """(id, count) inside a torch DataLoader worker, else (0, 1). Only looks if torch is already
    imported: a process that never imported torch is not one of its workers."""
    data = sys.modules.get("torch.utils.data")
    info = data.get_worker_info() if data is not None else None
    return (int(info.id), int(info.num_workers)) if info is not None else (0, 1)


def split_dataset(dataset: Any) -> Any:
    """This process's share of a Hugging Face `Dataset` or `IterableDataset`:
    `datasets.distributed.split_dataset_by_node` with JAX's process index and count.

    Map-style datasets get a contiguous block of rows; iterable ones get whole shards when the
    shard count divides evenly, else every count-th example. Tokenize the share (e.g.
    `share.map(VQGANTokenizer(...), batched=True)`) and save it under a per-process name.
    """
    from datasets.distributed import split_dataset_by_node

    return split_dataset_by_node(dataset, rank=process_index(), world_size=process_count())


def barrier(name: str, *, timeout_s: float | None = None) -> None:
    """Wait until every JAX process has reached `barrier(name)`; a no-op for one process.

    Every process must pass the same name, in the same order. Without `timeout_s` this is
    `jax.experimental.multihost_utils.sync_global_devices`: it waits as long as the others are
    alive, and if one dies, JAX's coordination service ends the survivors once its heartbeats
    stop (`heartbeat_timeout_seconds`, 100 s by default), so it never waits for ever on a dead
    peer. With `timeout_s` it waits on the coordination service's own barrier instead (no
    device work) and raises after that many seconds, e.g. when a live peer is stuck.
    """
    import jax

    if jax.process_count() == 1:
        return
    if timeout_s is None:
        from jax.experimental.multihost_utils import sync_global_devices

        sync_global_devices(name)
        return
    client = _coordination_client()
    if client is None:
        raise RuntimeError(
            "barrier(timeout_s=...) needs the JAX coordination service, which this JAX does "
            "not expose; call barrier(name) without a timeout"
        )
    with _barrier_lock:
        # A barrier id can be used once; the n-th barrier of a name gets the same id on every
        # process because every process makes the same calls in the same order.
        n = next(_barrier_counts.setdefault(name, itertools.count()))
    client.wait_at_barrier(f"vqgan_datasets:{name}:{n}", int(timeout_s * 1000))


def _coordination_client():
    """JAX's coordination service client (not public API; orbax uses it the same way)."""
    try:
        from jax._src import distributed as jax_distributed
    except ImportError:
        return None
    client = getattr(getattr(jax_distributed, "global_state", None), "client", None)
    return client if hasattr(client, "wait_at_barrier") else None
