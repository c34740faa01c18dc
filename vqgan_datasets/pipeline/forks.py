"""Processes beside JAX: never run JAX in a fork of a process where it runs, never fork one.

JAX's runtime threads do not survive `os.fork()`; the first device call in such a child can
block for ever (a torch DataLoader or webdataset WebLoader worker, a `datasets`
``map(num_proc=...)`` worker). `check_fork_safety` turns that hang into an immediate error.
Bookkeeping: an `os.register_at_fork` hook records, in the parent just before each fork,
whether JAX had started there; the child keeps that answer. A child forked before JAX started,
which then starts JAX itself, stays free to use it. The hooks see only forks made after this
module was imported, so every module that runs JAX imports it.

Our own preprocessing workers never fork: they are fresh interpreters started by exec
(`workerproc`).
"""

from __future__ import annotations

import os
import sys

__all__ = ["check_fork_safety", "forked_after_jax", "jax_started"]

# "parent_jax": set in the parent just before a fork, read by the child right after it.
# "forked_after_jax": True in (and only in) processes forked while JAX ran in their parent.
_STATE = {"parent_jax": False, "forked_after_jax": False}


def jax_started() -> bool:
    """Whether this process has initialised a JAX backend (imports alone do not count)."""
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover - JAX moved its internals: assume the worst
        return True
    backends = getattr(xla_bridge, "_backends", None)
    return bool(backends) if backends is not None else True


def forked_after_jax() -> bool:
    """Whether this process was forked from a parent in which JAX had started."""
    return _STATE["forked_after_jax"]


def _before_fork() -> None:
    # Runs in the parent, where reading JAX's state is safe; the child inherits the answer.
    _STATE["parent_jax"] = jax_started()


def _after_fork_in_child() -> None:
    if _STATE["parent_jax"]:
        _STATE["forked_after_jax"] = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


def check_fork_safety(what: str) -> None:
    """Raise RuntimeError at once if JAX cannot run here (forked after JAX started in the parent)."""
    if _STATE["forked_after_jax"]:
        raise RuntimeError(
            f"{what} is running in a process forked after JAX had started in its parent (e.g. "
            "a torch DataLoader or webdataset WebLoader worker with num_workers > 0, or a "
            "`datasets` map(num_proc=...) worker); JAX cannot run there and would hang. Encode "
            "in the main process instead (num_workers=0, no num_proc: the engine already "
            "preprocesses images in its own worker processes and runs on every local device), "
            "or start the workers with the 'spawn' start method (e.g. DataLoader(..., "
            "multiprocessing_context='spawn')), or make sure the parent does not use JAX (no "
            "model loaded, nothing encoded) before it forks."
        )
