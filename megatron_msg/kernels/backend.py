"""Which implementation runs a mask op: "reference", "triton" or "cuda".

The choice is made per call from, in order of precedence,

1. the ``backend=`` keyword of a dispatch function (tests, benchmarks),
2. the environment variable ``MSG_KERNEL_BACKEND`` (``auto`` when unset),
3. ``auto``: Triton for CUDA tensors when Triton imports, else the reference
   (also the reference while torch.compile traces: Inductor fuses it with its
   neighbours; an explicit "triton"/"cuda" puts the fused kernels in the
   compiled graph as custom ops, see ops.py).

There is deliberately no module-level "current backend" setting: the choice is a
pure function of the arguments and the environment, so it is the same on every
rank and inside ``torch.compile``.
"""
from __future__ import annotations

import os

import torch

BACKENDS = ("reference", "triton", "cuda")
ENV_VAR = "MSG_KERNEL_BACKEND"

# Rows longer than this are left to the reference by the fused LayerNorms (a whole
# row is kept in registers).  16384 covers every hidden size this project trains
# (FLM-101B: 10240).
MAX_FUSED_N = 16384


_TRITON_OK: bool | None = None


def triton_available() -> bool:
    """True when Triton imports (it may still lack a GPU: the interpreter runs on CPU).

    Cached in a module global, not functools.lru_cache: Dynamo traces this
    function (resolve runs inside torch.compile) and warns on lru_cache wrappers.
    """
    global _TRITON_OK
    if _TRITON_OK is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
            _TRITON_OK = True
        except Exception:  # pragma: no cover - depends on the install
            _TRITON_OK = False
    return _TRITON_OK


def triton_interpreting() -> bool:
    """True when Triton kernels run on the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _compiling() -> bool:
    try:
        return bool(torch.compiler.is_compiling())
    except AttributeError:  # torch < 2.3
        return False


def resolve(x: torch.Tensor, backend: str | None = None) -> str:
    """Pick the backend for an op whose main input is ``x``.

    An explicit "triton" on a CPU tensor is honoured only under the Triton
    interpreter, and "cuda" only for CUDA tensors; anything else raises, so a
    misconfigured benchmark cannot silently time the reference.
    """
    name = (backend or os.environ.get(ENV_VAR) or "auto").lower()
    if name == "auto":
        # Under torch.compile the reference is traced and fused by Inductor with
        # the surrounding ops.  The fused kernels are custom ops (ops.py) that
        # compile fine too, but Inductor cannot fuse across them; choose them
        # explicitly (backend= / MSG_KERNEL_BACKEND) to compile with them.
        if _compiling():
            return "reference"
        if x.is_cuda and triton_available():
            return "triton"
        return "reference"
    if name not in BACKENDS:
        raise ValueError(f"{ENV_VAR}/backend must be one of auto, {', '.join(BACKENDS)}; got {name!r}")
    if name == "triton":
        if not triton_available():
            raise RuntimeError("backend 'triton' requested but triton is not importable")
        if not x.is_cuda and not triton_interpreting():
            raise RuntimeError("backend 'triton' on CPU tensors needs TRITON_INTERPRET=1")
    if name == "cuda" and not x.is_cuda:
        raise RuntimeError("backend 'cuda' needs CUDA tensors")
    return name
