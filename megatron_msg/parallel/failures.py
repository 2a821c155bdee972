"""Telling "another rank is hung or dead" apart from a bug, so msg-train can say which.

A collective whose peers never arrive fails after ``parallel.timeout_s`` (every group is made
with it, parallel/topology.py); one whose peer process died fails at once.  Neither is this
rank's fault, and a traceback from deep inside a gradient all-reduce hides that.  gloo raises
``RuntimeError`` with these phrases, NCCL ``torch.distributed.DistError`` subclasses (with
``TORCH_NCCL_ASYNC_ERROR_HANDLING=1``, examples/launch/env.sh, its watchdog may instead end the
process, which the launcher then reports).
"""
from __future__ import annotations

import torch.distributed as dist

_PEER_FAILURE_PHRASES = ("Timed out waiting", "timed out", "Connection closed by peer", "Connection reset by peer",
                         "Read error", "Broken pipe", "NCCL communicator was aborted", "Watchdog caught collective")


def is_peer_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed because another rank hung or died."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    return isinstance(exc, RuntimeError) and any(p in str(exc) for p in _PEER_FAILURE_PHRASES)


def describe_peer_failure(exc: BaseException, rank: int, timeout_s: float) -> str:
    """One line for the user: what happened, on which rank, and the setting that bounds it."""
    first = " ".join(str(exc).split())[:300]
    return (f"rank {rank}: a collective failed because another rank is hung or has died ({first}); "
            f"the wait is bounded by parallel.timeout_s={timeout_s:g}; look at the other ranks' output for "
            f"the first error")
