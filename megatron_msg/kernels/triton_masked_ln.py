"""Masked LayerNorm (MSG eq. 16-19) forward and backward in Triton.

Definition (see ``masked_layer_norm_reference``): with mask ``c`` over the last dim,

    S = sum(c);  mu = sum(c x)/S;  var = sum(c (x-mu)^2)/S;  r = 1/sqrt(var+eps)
    xhat = (x - mu) r;  y = c (w xhat + b)

Backward, with ``g = c w dy`` (the gradient reaching xhat):

    dx = r (g - c (a + xhat b)),  a = sum(g)/S,  b = sum(g xhat)/S
    dw = sum_rows(c dy xhat),     db = sum_rows(c dy)

(the mean term of d var/dx vanishes because sum(c (x-mu)) = 0).  With c = 1 this
is the ordinary LayerNorm backward.  The mask is a schedule value, not a
parameter: it gets no gradient (dispatch falls back to the reference if it
requires one).

Kernel layout.  Forward: one program per tile of BLOCK_M rows x BLOCK_N
(= next power of two >= N) columns, so a whole row lives in registers and x is
read exactly once; S = sum(c) is reduced per program from the mask vector, so
it never leaves the device.  Backward: a fixed grid of G programs, each walking
its share of row tiles, accumulating dw/db partials in registers and writing
one [N] partial per program; two device-side torch sums (dw, db) reduce the G
partials.  All arithmetic is fp32 whatever the I/O dtype (bf16/fp16/fp32); under the CPU
interpreter (TRITON_INTERPRET=1) only fp32 I/O is reliable.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from megatron_msg.kernels.backend import MAX_FUSED_N  # noqa: F401  (re-exported)


@triton.jit
def _masked_ln_fwd_kernel(X, Y, W, B, C, MEAN, RSTD, DELTA, H, M, N, stride_x, stride_y, eps,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DELTA: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < N
    m2 = rmask[:, None] & cmask[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=m2, other=0.0)
    if HAS_DELTA:
        # fused residual add: h = x + delta, rounded to the I/O dtype exactly as
        # the unfused ``h = x + delta`` would be, then normalised.  DELTA and H
        # are contiguous [M, N].
        delta = tl.load(DELTA + rows64[:, None] * N + cols[None, :], mask=m2, other=0.0)
        x = (x.to(tl.float32) + delta.to(tl.float32)).to(H.dtype.element_ty)
        tl.store(H + rows64[:, None] * N + cols[None, :], x, mask=m2)
    x = x.to(tl.float32)
    c = tl.load(C + cols, mask=cmask, other=0.0).to(tl.float32)
    inv_s = 1.0 / tl.sum(c, axis=0)
    mean = tl.sum(x * c[None, :], axis=1) * inv_s
    d = x - mean[:, None]
    var = tl.sum(d * d * c[None, :], axis=1) * inv_s
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
    y = (d * rstd[:, None] * w[None, :] + b[None, :]) * c[None, :]
    tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=m2)
    tl.store(MEAN + rows, mean, mask=rmask)
    tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _masked_ln_fwd_wide_kernel(X, Y, W, B, C, MEAN, RSTD, DELTA, H, M, N, stride_x, stride_y, eps,
                               CHUNK: tl.constexpr, HAS_DELTA: tl.constexpr):
    """Forward for wide rows (N > 4096), one row per program, in CHUNK-wide pieces.

    A whole 10K row in registers leaves room for one row in flight per SM,
    too little to cover HBM latency; chunking keeps registers small so many rows
    are in flight.  Pass 1 merges per-chunk weighted mean / M2 (Chan et al.'s
    parallel update, numerically like the two-pass formula); pass 2 re-reads the
    row (from L2) and writes y.  HBM traffic: read x once, write y once.
    """
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, CHUNK)
    n_acc = 0.0
    mean = 0.0
    m2 = 0.0
    for c0 in range(0, N, CHUNK):
        cols = c0 + offs
        cm = cols < N
        x = tl.load(X + row * stride_x + cols, mask=cm, other=0.0)
        if HAS_DELTA:
            dl = tl.load(DELTA + row * N + cols, mask=cm, other=0.0)
            x = (x.to(tl.float32) + dl.to(tl.float32)).to(H.dtype.element_ty)
            tl.store(H + row * N + cols, x, mask=cm)
        x = x.to(tl.float32)
        c = tl.load(C + cols, mask=cm, other=0.0).to(tl.float32)
        n_b = tl.sum(c, axis=0)
        safe_n_b = tl.where(n_b > 0, n_b, 1.0)
        mean_b = tl.sum(c * x, axis=0) / safe_n_b
        d = x - mean_b
        m2_b = tl.sum(c * d * d, axis=0)
        tot = n_acc + n_b
        safe_tot = tl.where(tot > 0, tot, 1.0)
        delta = mean_b - mean
        mean = mean + delta * (n_b / safe_tot)
        m2 = m2 + m2_b + delta * delta * (n_acc * n_b / safe_tot)
        n_acc = tot
    var = m2 / n_acc
    rstd = 1.0 / tl.sqrt(var + eps)
    src = H if HAS_DELTA else X
    stride_src = N if HAS_DELTA else stride_x
    for c0 in range(0, N, CHUNK):
        cols = c0 + offs
        cm = cols < N
        x = tl.load(src + row * stride_src + cols, mask=cm, other=0.0).to(tl.float32)
        c = tl.load(C + cols, mask=cm, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=cm, other=0.0).to(tl.float32)
        b = tl.load(B + cols, mask=cm, other=0.0).to(tl.float32)
        y = ((x - mean) * rstd * w + b) * c
        tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=cm)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _masked_ln_bwd_kernel(X, DY, DX, W, C, MEAN, RSTD, DW_PART, DB_PART, DRES, M, N,
                          stride_x, stride_dy, stride_dx,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DRES: tl.constexpr):
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    c = tl.load(C + cols, mask=cmask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    inv_s = 1.0 / tl.sum(c, axis=0)
    cw = c * w
    dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(pid * BLOCK_M, M, n_prog * BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        rmask = rows < M
        m2 = rmask[:, None] & cmask[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=rmask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        xhat = (x - mean[:, None]) * rstd[:, None]
        g = dy * cw[None, :]
        a = tl.sum(g, axis=1) * inv_s
        bcoef = tl.sum(g * xhat, axis=1) * inv_s
        dx = rstd[:, None] * (g - c[None, :] * (a[:, None] + xhat * bcoef[:, None]))
        if HAS_DRES:  # gradient arriving at the residual h of a fused add (contiguous [M, N])
            dx += tl.load(DRES + rows64[:, None] * N + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=m2)
        dyc = dy * c[None, :]
        dw_acc += tl.sum(dyc * xhat, axis=0)
        db_acc += tl.sum(dyc, axis=0)
    tl.store(DW_PART + pid * N + cols, dw_acc, mask=cmask)
    tl.store(DB_PART + pid * N + cols, db_acc, mask=cmask)


@triton.jit
def _masked_ln_bwd_wide_kernel(X, DY, DX, W, C, MEAN, RSTD, DW_PART, DB_PART, DRES, M, N,
                               stride_x, stride_dy, stride_dx,
                               CHUNK: tl.constexpr, HAS_DRES: tl.constexpr):
    """Backward for wide rows (N > 4096): one row at a time, in column chunks.

    Holding a whole 10K-wide row plus dw/db accumulators in registers spills, so
    each row is walked twice in CHUNK-wide pieces: the first walk reduces
    sum(g) and sum(g xhat), the second (re-reading the row from L2, not HBM)
    writes dx and adds the row into this program's private fp32 dw/db partial
    row, which stays L2-resident.  HBM traffic is still read x, dy / write dx.
    """
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    offs = tl.arange(0, CHUNK)
    cs = tl.zeros([CHUNK], dtype=tl.float32)
    for c0 in range(0, N, CHUNK):
        cols = c0 + offs
        cs += tl.load(C + cols, mask=cols < N, other=0.0).to(tl.float32)
    inv_s = 1.0 / tl.sum(cs, axis=0)
    for c0 in range(0, N, CHUNK):  # zero this program's partial rows
        cols = c0 + offs
        tl.store(DW_PART + pid * N + cols, tl.zeros([CHUNK], dtype=tl.float32), mask=cols < N)
        tl.store(DB_PART + pid * N + cols, tl.zeros([CHUNK], dtype=tl.float32), mask=cols < N)
    for row in range(pid, M, n_prog):
        row64 = tl.cast(row, tl.int64)
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        sa = tl.zeros([CHUNK], dtype=tl.float32)
        sb = tl.zeros([CHUNK], dtype=tl.float32)
        for c0 in range(0, N, CHUNK):
            cols = c0 + offs
            cm = cols < N
            x = tl.load(X + row64 * stride_x + cols, mask=cm, other=0.0).to(tl.float32)
            dy = tl.load(DY + row64 * stride_dy + cols, mask=cm, other=0.0).to(tl.float32)
            cw = tl.load(C + cols, mask=cm, other=0.0).to(tl.float32) * tl.load(W + cols, mask=cm, other=0.0).to(tl.float32)
            g = dy * cw
            sa += g
            sb += g * (x - mean) * rstd
        a = tl.sum(sa, axis=0) * inv_s
        bcoef = tl.sum(sb, axis=0) * inv_s
        for c0 in range(0, N, CHUNK):
            cols = c0 + offs
            cm = cols < N
            x = tl.load(X + row64 * stride_x + cols, mask=cm, other=0.0).to(tl.float32)
            dy = tl.load(DY + row64 * stride_dy + cols, mask=cm, other=0.0).to(tl.float32)
            c = tl.load(C + cols, mask=cm, other=0.0).to(tl.float32)
            w = tl.load(W + cols, mask=cm, other=0.0).to(tl.float32)
            xhat = (x - mean) * rstd
            dyc = dy * c
            dx = rstd * (dyc * w - c * (a + xhat * bcoef))
            if HAS_DRES:
                dx += tl.load(DRES + row64 * N + cols, mask=cm, other=0.0).to(tl.float32)
            tl.store(DX + row64 * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=cm)
            pw = DW_PART + pid * N + cols
            pb = DB_PART + pid * N + cols
            tl.store(pw, tl.load(pw, mask=cm, other=0.0) + dyc * xhat, mask=cm)
            tl.store(pb, tl.load(pb, mask=cm, other=0.0) + dyc, mask=cm)


# ---------------------------------------------------------------------------
# launch heuristics (measured on an H100, docs/kernel_notes.md)

# Rows wider than these take the chunked kernels (_masked_ln_*_wide_kernel).
WIDE_FWD_N = 4096
WIDE_BWD_N = 4096


def fwd_config(n: int) -> tuple[int, int]:
    """(BLOCK_M, num_warps) for the forward.

    H100 sweep (docs/kernel_notes.md): 4 warps with 4 rows per program was best
    at hidden 768, 1024 and 4096 (4K-16K elements per program); wide rows get
    more warps so a row's registers do not spill.
    """
    block_n = triton.next_power_of_2(n)
    if block_n <= 1024:
        return max(1, 4096 // block_n), 4
    if block_n <= 4096:
        return max(1, 16384 // block_n), 4
    return 1, 8


def bwd_config(n: int) -> tuple[int, int]:
    """(BLOCK_M, num_warps) for the backward (H100 sweep: 4 warps, 2 programs per SM)."""
    block_n = triton.next_power_of_2(n)
    if block_n <= 1024:
        return max(1, 4096 // block_n), 4
    return 1, 4


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _bwd_programs(x: torch.Tensor, m: int, block_m: int, n: int) -> int:
    tiles = triton.cdiv(m, block_m)
    if not x.is_cuda:  # interpreter: a few programs still exercise the partial sums
        return max(1, min(tiles, 3))
    sms = _num_sms(x.device.index if x.device.index is not None else torch.cuda.current_device())
    # Two programs per SM filled the chip best in the H100 sweep; the fp32
    # partials (G x N x 8 bytes) stay small next to the activations.
    per_sm = 1 if n > WIDE_BWD_N else 2  # sweep: the chunked wide kernel prefers 1 x 16 warps
    return max(1, min(tiles, sms * per_sm))


def _as_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    t2 = t.reshape(-1, n)
    if t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2


def masked_ln_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor,
                  eps: float, *, delta: torch.Tensor | None = None, block_m: int | None = None,
                  num_warps: int | None = None, wide: bool | None = None, chunk: int | None = None):
    """Returns (y, mean, rstd, h); y has x's shape and dtype, mean/rstd are fp32 [rows].

    With ``delta`` the input is ``h = x + delta`` (returned, else h is None).
    """
    n = x.shape[-1]
    x2 = _as_rows(x, n)
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if delta is not None:
        delta2 = delta.reshape(m, n).contiguous()
        h = torch.empty((m, n), dtype=x.dtype, device=x.device)
    else:
        delta2 = h = y  # unused placeholders
    mean = torch.empty(m, dtype=torch.float32, device=x.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    bm, nw = fwd_config(n)
    bm = block_m or bm
    nw = num_warps or nw
    wide = n > WIDE_FWD_N if wide is None else wide
    if m > 0 and wide:
        _masked_ln_fwd_wide_kernel[(m,)](
            x2, y, weight, bias, mask, mean, rstd, delta2, h, m, n, x2.stride(0), y.stride(0), eps,
            CHUNK=chunk or 1024, HAS_DELTA=delta is not None, num_warps=num_warps or 4)
    elif m > 0:
        _masked_ln_fwd_kernel[(triton.cdiv(m, bm),)](
            x2, y, weight, bias, mask, mean, rstd, delta2, h, m, n, x2.stride(0), y.stride(0), eps,
            BLOCK_M=bm, BLOCK_N=triton.next_power_of_2(n), HAS_DELTA=delta is not None, num_warps=nw)
    return y.view(x.shape), mean, rstd, (h.view(x.shape) if delta is not None else None)


def masked_ln_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor,
                  mean: torch.Tensor, rstd: torch.Tensor, *, block_m: int | None = None,
                  num_warps: int | None = None, programs: int | None = None,
                  bias_dtype: torch.dtype | None = None, dres: torch.Tensor | None = None,
                  wide: bool | None = None, chunk: int | None = None):
    """Returns (dx, dweight, dbias) with the dtypes of x, weight and bias (default weight's).

    ``dres`` (same shape as x) is added to dx in the same pass: the gradient of
    a fused residual add's other consumer.
    """
    n = x.shape[-1]
    x2 = _as_rows(x, n)
    dy2 = _as_rows(dy, n)
    m = x2.shape[0]
    dx = torch.empty((m, n), dtype=x.dtype, device=x.device)
    bm, nw = bwd_config(n)
    bm = block_m or bm
    nw = num_warps or nw
    wide = n > WIDE_BWD_N if wide is None else wide
    g = programs or _bwd_programs(x, m, 1 if wide else bm, n)
    part = torch.empty((2, g, n), dtype=torch.float32, device=x.device)  # dw and db partials
    dw_part, db_part = part[0], part[1]
    block_n = triton.next_power_of_2(n)
    dres2 = dres.reshape(m, n).contiguous() if dres is not None else dx
    if m > 0 and wide:
        _masked_ln_bwd_wide_kernel[(g,)](
            x2, dy2, dx, weight, mask, mean, rstd, dw_part, db_part, dres2, m, n,
            x2.stride(0), dy2.stride(0), dx.stride(0),
            CHUNK=chunk or min(2048, block_n), HAS_DRES=dres is not None, num_warps=num_warps or 16)
    elif m > 0:
        _masked_ln_bwd_kernel[(g,)](
            x2, dy2, dx, weight, mask, mean, rstd, dw_part, db_part, dres2, m, n,
            x2.stride(0), dy2.stride(0), dx.stride(0),
            BLOCK_M=bm, BLOCK_N=block_n, HAS_DRES=dres is not None, num_warps=nw)
    if m == 0:
        part.zero_()
    # Device-side reductions of the partial stacks (no host round trip; a C++ op
    # has less launch overhead than another Triton launch).  Two sums, not one
    # over both stacks: dw and db must not share storage (outputs of a custom op,
    # ops.py, may not alias each other).
    dw = part[0].sum(0).to(weight.dtype)
    db = part[1].sum(0).to(bias_dtype or weight.dtype)
    return dx.view(x.shape), dw, db


# The autograd wiring (forward saves x, mean, rstd; backward calls masked_ln_bwd)
# lives in megatron_msg/kernels/ops.py as torch.library custom ops.
