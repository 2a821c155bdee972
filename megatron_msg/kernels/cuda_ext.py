"""Loader and launchers for the masked LayerNorm CUDA extension (csrc/).

The extension is compiled on first use with ``torch.utils.cpp_extension.load``
(JIT, ninja) into a cache directory, never at ``pip install`` time: setup.py
must not import torch (an isolated build would download a CUDA wheel), and a
JIT build always matches the torch/CUDA the user actually runs.

* sources: ``csrc/masked_layernorm_cuda.cu`` (kernels, no torch headers) and
  ``csrc/masked_layernorm_cuda.cpp`` (pybind11 binding); found next to the
  package in a source checkout, or in ``$MSG_CSRC_DIR``;
* cache: ``$MSG_KERNEL_BUILD_DIR``, default ``~/.cache/megatron_msg/torch_extensions``;
* arch: ``$TORCH_CUDA_ARCH_LIST`` if set, else the current device's capability.

``available()`` says whether the extension can be used (CUDA present and the
build succeeded); it never raises.  Without CUDA nothing is compiled.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

_NAME = "msg_masked_layernorm_cuda"
_SOURCES = ("masked_layernorm_cuda.cpp", "masked_layernorm_cuda.cu")


def csrc_dir() -> Path:
    env = os.environ.get("MSG_CSRC_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "csrc"


def build_dir() -> Path:
    d = Path(os.environ.get("MSG_KERNEL_BUILD_DIR",
                            Path.home() / ".cache" / "megatron_msg" / "torch_extensions"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@functools.lru_cache(maxsize=None)
def load(verbose: bool = False):
    """Compile (once, cached on disk) and import the extension; raises on failure."""
    if not torch.cuda.is_available():
        raise RuntimeError("the masked LayerNorm CUDA extension needs a CUDA device")
    from torch.utils.cpp_extension import load as _load
    srcs = [str(csrc_dir() / s) for s in _SOURCES]
    missing = [s for s in srcs if not os.path.exists(s)]
    if missing:
        raise RuntimeError(f"CUDA extension sources not found: {missing} (set MSG_CSRC_DIR)")
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        major, minor = torch.cuda.get_device_capability()
        os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    return _load(name=_NAME, sources=srcs, build_directory=str(build_dir()), verbose=verbose,
                 extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "--expt-relaxed-constexpr", "-lineinfo"])


@functools.lru_cache(maxsize=None)
def available() -> bool:
    try:
        load()
    except Exception:
        return False
    return True


# Forward kernels of the extension (csrc/masked_layernorm_cuda.cu): "registers" keeps
# a row per warp or block in registers; "staged" (sm_90+) streams rows into a ring of
# shared-memory buffers with the bulk-copy engine; "staged_bulk_y" also sends y out of
# that ring by bulk copy.  "auto" takes staged_bulk_y for rows of 8 KiB and more where
# it can run (fastest there on the H100, msg-bench kernel-sweep --cuda-only), else registers.
FWD_VARIANTS = {"auto": 0, "registers": 1, "staged": 2, "staged_bulk_y": 3}


def fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor, eps: float,
        variant: str = "auto", stages: int = 0, hold: bool | None = None, pdl: bool = True):
    """Forward launcher -> (y with x's shape, mean [rows], rstd [rows] fp32).

    ``stages``: row buffers of the staged kernels, 4..12 (0 = default, 6; fewer where they do not fit).
    ``hold``: whether the staged kernels keep x in registers between their passes (None: yes up
    to 8192 bf16 columns, where it pays; wider rows spill).  ``pdl``: launch the staged kernels
    with programmatic dependent launch, so that their blocks are scheduled while the previous
    kernel on the stream finishes (they read and write nothing before it has).
    """
    if variant not in FWD_VARIANTS:
        raise ValueError(f"CUDA masked LayerNorm forward variant must be one of {sorted(FWD_VARIANTS)}; "
                         f"got {variant!r}")
    if stages != 0 and not 4 <= stages <= 12:
        raise ValueError(f"stages (row buffers of the staged kernel) must be 0 (default) or 4..12; got {stages}")
    n = x.shape[-1]
    ext = load()
    if variant.startswith("staged"):
        supported, aligned = ext.staged_check(x.reshape(-1, n), weight, bias, mask, stages)
        if not supported:
            raise RuntimeError(
                "masked_ln_fwd: the staged kernel needs an sm_90+ GPU and an extension built for it, a 16-byte "
                "aligned x, 32-byte aligned fp32 weight/bias/mask, a row of a multiple of 16 bytes with at most "
                f"16384 columns, and room for 4+ rows in shared memory; got N={n}, dtype {x.dtype}, "
                f"aligned={int(aligned)}")
    y, mean, rstd = ext.fwd(x.reshape(-1, n), weight, bias, mask, float(eps), FWD_VARIANTS[variant], stages,
                            -1 if hold is None else int(bool(hold)), pdl)
    return y.view(x.shape), mean, rstd


def bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor,
        rstd: torch.Tensor, bias_dtype: torch.dtype):
    """Backward launcher -> (dx with x's shape, dweight, dbias in bias_dtype)."""
    n = x.shape[-1]
    dx, dw, db = load().bwd(dy.reshape(-1, n), x.reshape(-1, n), weight, mask, mean.reshape(-1),
                            rstd.reshape(-1), bias_dtype)
    return dx.view(x.shape), dw, db


# Autograd and torch.compile wiring: megatron_msg/kernels/ops.py (custom op megatron_msg::masked_layer_norm_fwd).
