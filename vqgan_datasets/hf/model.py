"""The model behind a Hugging Face map function: the default checkpoint, and loading it only
where JAX can run.

Models are `handle.ModelHandle`s (one rule for names, paths and in-memory models; one cache).
What is particular to `datasets`: a map function pickles to its identity alone (that pickle is
its fingerprint, so it never carries weights), hence a copy unpickled from a tokenizer built on
an in-memory VQModel has no handle and cannot load; and `map(num_proc=...)` forks workers, where
JAX hangs if the parent had started it (`forks`).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING

from ..pipeline import forks

if TYPE_CHECKING:
    from ..handle import ModelHandle
    from ..models.modeling import VQModel

__all__ = ["DEFAULT_MODEL", "check_fork_safety", "load_model", "sent_to_worker_pool"]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "flax-community/vqgan_f16_16384"

# A process whose pid differs from the one that imported this module is a forked child.
_IMPORT_PID = os.getpid()
_POOL_MODULES = ("multiprocess.pool", "multiprocessing.pool")
_warned_pool = False


def sent_to_worker_pool(what: str) -> bool:
    """Whether `what` is being pickled by a process pool for its workers (`datasets`'
    map(num_proc=...) sends the map function with every task); if so, warn once per process
    that the workers buy nothing. Called from `__reduce__`, where nothing else says why."""
    global _warned_pool
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__") not in _POOL_MODULES:
        frame = frame.f_back
    if frame is None:
        return False
    if not _warned_pool:
        _warned_pool = True
        logger.warning(
            "%s is being sent to worker processes (map(num_proc=...)?): they buy nothing here. "
            "The encoder already runs data-parallel on every local device and preprocesses "
            "images in its own worker processes; each worker would load its own copy of the "
            "model (on GPUs they also compete for device memory). Drop num_proc.", what,
        )
    return True


def check_fork_safety(what: str) -> None:
    """Raise at once in a process forked after JAX started in its parent (a num_proc worker),
    naming `what`, instead of hanging in the first device call."""
    if forks.forked_after_jax():
        raise RuntimeError(
            f"{what} is running in a process forked after JAX had started in its parent (e.g. a "
            "`datasets` map(num_proc=...) worker); JAX cannot run there and would hang. Drop "
            "num_proc: the encoder already runs data-parallel on every local device and "
            "preprocesses images in its own worker processes, so one process is as fast. (If "
            "you need worker processes, create the tokenizer from a model name or path and do "
            "not use JAX in the parent before map, or use the 'spawn' start method.)"
        )


def load_model(handle: ModelHandle | None, what: str, *, warn_fork: bool = True) -> VQModel:
    """`handle.load()` where JAX can run; `handle` None: a copy unpickled from a map function
    built on an in-memory VQModel, which has no weights to load. `warn_fork`: warn when loading
    in a forked worker (False when the parent has warned, see `sent_to_worker_pool`)."""
    check_fork_safety(what)
    if handle is None:
        raise RuntimeError(
            f"{what} was unpickled from one built on an in-memory VQModel with no checkpoint "
            "file, so it cannot load the weights here (e.g. in a map(num_proc=...) worker). Save "
            "the model with model.save_pretrained(dir) and pass the directory, or drop num_proc."
        )
    if warn_fork and not handle.loaded and os.getpid() != _IMPORT_PID:
        logger.warning(
            "loading %s in a forked worker process (map num_proc?): every worker holds its own "
            "copy and all of them share the same devices, so num_proc brings no speed-up (on "
            "GPUs they also compete for device memory)", handle.ref,
        )
    return handle.load()
