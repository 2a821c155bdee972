"""Which implementation runs a mask op: "reference", "triton" or "cuda".

The choice is made per call from, in order of precedence,

1. the ``backend=`` keyword of a dispatch function (tests, benchmarks),
2. the environment variable ``MSG_KERNEL_BACKEND`` (``auto`` when unset),
3. ``auto``: Triton for CUDA tensors when Triton imports, else the reference
   (also the reference while torch.compile traces: Inductor fuses it).

There is deliberately no module-level "current backend" setting: the choice is a
pure function of the arguments and the environment, so it is the same on every
rank and inside ``torch.compile``.
"""
from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("reference", "triton", "cuda")
ENV_VAR = "MSG_KERNEL_BACKEND"

# Rows longer than this are left to the reference by the fused LayerNorms (a whole
# row is kept in registers).  16384 covers every hidden size this project trains
# (FLM-101B: 10240).
MAX_FUSED_N = 16384


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when Triton imports (it may still lack a GPU: the interpreter runs on CPU)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # pragma: no cover - depends on the install
        return False
    return True


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
        # Under torch.compile the reference is traced and fused by Inductor; the
        # eager kernels are opaque Python there (and would break fullgraph).
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
