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

Kernel layouts ("variants"; fwd_config / bwd_config pick one per width from H100
sweeps, ``msg-bench kernel-sweep`` re-measures them):

* "rows": one program per tile of BLOCK_M rows x BLOCK_N (= next power of two >= N)
  columns, so whole rows live in registers and x is read exactly once; up to 4096.
* "split": a row as two power-of-two tiles (8192 + 2048 = 10240 exactly, where one
  16384 tile wasted 37.5% of the registers); wider rows.
* "chunked": one row per program walked twice in CHUNK pieces (Chan's merge of chunk
  statistics, second walk from L2); selectable, as fast as "split" at 10240.

S = sum(c) is reduced per program from the mask vector, so it never leaves the
device.  Backward: a fixed grid of G programs, each walking its share of row tiles,
accumulating dw/db partials in registers and writing one [N] partial per program;
two device-side torch sums (dw, db) reduce the G partials.  All arithmetic is fp32
whatever the I/O dtype (bf16/fp16/fp32); under the CPU
interpreter (TRITON_INTERPRET=1) only fp32 I/O is reliable.
"""
from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _load_rows(X, rows64, stride, cols, m2, DELTA, H, N, HAS_DELTA: tl.constexpr):
    """x (or h = x + delta, stored to H) as fp32 for one tile.

    The fused residual add rounds h to the I/O dtype exactly as the unfused
    ``h = x + delta`` would, then normalises it.  DELTA and H are contiguous [M, N].
    """
    x = tl.load(X + rows64[:, None] * stride + cols[None, :], mask=m2, other=0.0)
    if HAS_DELTA:
        delta = tl.load(DELTA + rows64[:, None] * N + cols[None, :], mask=m2, other=0.0)
        x = (x.to(tl.float32) + delta.to(tl.float32)).to(H.dtype.element_ty)
        tl.store(H + rows64[:, None] * N + cols[None, :], x, mask=m2)
    return x.to(tl.float32)


@triton.jit
def _store_normalized(Y, W, B, rows64, stride_y, cols, cmask, m2, d, rstd, c):
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
    y = (d * rstd[:, None] * w[None, :] + b[None, :]) * c[None, :]
    tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=m2)


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
    x = _load_rows(X, rows64, stride_x, cols, m2, DELTA, H, N, HAS_DELTA)
    c = tl.load(C + cols, mask=cmask, other=0.0).to(tl.float32)
    inv_s = 1.0 / tl.sum(c, axis=0)
    mean = tl.sum(x * c[None, :], axis=1) * inv_s
    d = x - mean[:, None]
    var = tl.sum(d * d * c[None, :], axis=1) * inv_s
    rstd = 1.0 / tl.sqrt(var + eps)
    _store_normalized(Y, W, B, rows64, stride_y, cols, cmask, m2, d, rstd, c)
    tl.store(MEAN + rows, mean, mask=rmask)
    tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _masked_ln_fwd_wide_kernel(X, Y, W, B, C, MEAN, RSTD, DELTA, H, M, N, stride_x, stride_y, eps,
                               CHUNK: tl.constexpr, HAS_DELTA: tl.constexpr):
    """Forward of one row per program in CHUNK-wide pieces (variant "chunked").

    Chunking keeps registers small, so many rows are in flight; at 10240 it measured
    the same as the "split" kernel (docs/kernel_notes.md), which the heuristic uses.  Pass 1 merges per-chunk weighted mean / M2 (Chan et al.'s
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
    """Backward of one row at a time in column chunks (variant "chunked"; slower than "split" at 10240).

    Each row is walked twice in CHUNK-wide pieces: the first walk reduces
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
# "split" kernels: a row of N = A + (N - A) columns, A = the largest power of two
# <= N, held in registers as two power-of-two tiles (A and BLOCK_B >= N - A, masked).
# Triton tiles are powers of two; one tile of next_pow2(N) columns wastes 37.5% of
# the registers at N = 10240 (16384 - 10240), which capped residency at one row per
# SM.  Two tiles hold 8192 + 2048 = exactly 10240 (likewise 5120, 6144, 12288).


@triton.jit
def _masked_ln_fwd_split_kernel(X, Y, W, B, C, MEAN, RSTD, DELTA, H, M, N, stride_x, stride_y, eps,
                                BLOCK_M: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
                                HAS_DELTA: tl.constexpr):
    """Forward with the row as a BLOCK_A tile (columns [0, BLOCK_A), all < N) plus a
    BLOCK_B tail tile (columns [BLOCK_A, N)); x is read once, as in _masked_ln_fwd_kernel."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    cols_a = tl.arange(0, BLOCK_A)
    cols_b = BLOCK_A + tl.arange(0, BLOCK_B)
    cm_a = cols_a < N
    cm_b = cols_b < N
    m2_a = rmask[:, None] & cm_a[None, :]
    m2_b = rmask[:, None] & cm_b[None, :]
    xa = _load_rows(X, rows64, stride_x, cols_a, m2_a, DELTA, H, N, HAS_DELTA)
    xb = _load_rows(X, rows64, stride_x, cols_b, m2_b, DELTA, H, N, HAS_DELTA)
    ca = tl.load(C + cols_a, mask=cm_a, other=0.0).to(tl.float32)
    cb = tl.load(C + cols_b, mask=cm_b, other=0.0).to(tl.float32)
    inv_s = 1.0 / (tl.sum(ca, axis=0) + tl.sum(cb, axis=0))
    mean = (tl.sum(xa * ca[None, :], axis=1) + tl.sum(xb * cb[None, :], axis=1)) * inv_s
    da = xa - mean[:, None]
    db = xb - mean[:, None]
    var = (tl.sum(da * da * ca[None, :], axis=1) + tl.sum(db * db * cb[None, :], axis=1)) * inv_s
    rstd = 1.0 / tl.sqrt(var + eps)
    _store_normalized(Y, W, B, rows64, stride_y, cols_a, cm_a, m2_a, da, rstd, ca)
    _store_normalized(Y, W, B, rows64, stride_y, cols_b, cm_b, m2_b, db, rstd, cb)
    tl.store(MEAN + rows, mean, mask=rmask)
    tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _tile_load(P, rows64, stride, cols, m2):
    """One [rows, cols] tile of P in its own dtype (no conversion: a prefetched tile stays narrow)."""
    return tl.load(P + rows64[:, None] * stride + cols[None, :], mask=m2, other=0.0)


@triton.jit
def _bwd_tile_sums(x, dy, cols, cmask, mean, rstd, C, W):
    """From one tile of x, dy: (xhat, dy c, c w dy) in fp32 and (sum(g), sum(g xhat)) per row."""
    c = tl.load(C + cols, mask=cmask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    xhat = (x.to(tl.float32) - mean[:, None]) * rstd[:, None]
    dyc = dy.to(tl.float32) * c[None, :]
    g = dyc * w[None, :]
    return xhat, dyc, g, tl.sum(g, axis=1), tl.sum(g * xhat, axis=1)


@triton.jit
def _bwd_tile_store(DX, DRES, rows64, stride_dx, N, cols, cmask, m2, C, xhat, g, a, bcoef, rstd,
                    HAS_DRES: tl.constexpr):
    c = tl.load(C + cols, mask=cmask, other=0.0).to(tl.float32)
    dx = rstd[:, None] * (g - c[None, :] * (a[:, None] + xhat * bcoef[:, None]))
    if HAS_DRES:
        dx += tl.load(DRES + rows64[:, None] * N + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=m2)


@triton.jit
def _masked_ln_bwd_split_kernel(X, DY, DX, W, C, MEAN, RSTD, DW_PART, DB_PART, DRES, M, N,
                                stride_x, stride_dy, stride_dx,
                                BLOCK_M: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
                                HAS_DRES: tl.constexpr):
    """Backward of _masked_ln_bwd_kernel with the row as two tiles (see the split forward):
    persistent programs, dw/db partials in registers, x and dy read once."""
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    cols_a = tl.arange(0, BLOCK_A)
    cols_b = BLOCK_A + tl.arange(0, BLOCK_B)
    cm_a = cols_a < N
    cm_b = cols_b < N
    inv_s = 1.0 / (tl.sum(tl.load(C + cols_a, mask=cm_a, other=0.0).to(tl.float32), axis=0)
                   + tl.sum(tl.load(C + cols_b, mask=cm_b, other=0.0).to(tl.float32), axis=0))
    dw_a = tl.zeros([BLOCK_A], dtype=tl.float32)
    db_a = tl.zeros([BLOCK_A], dtype=tl.float32)
    dw_b = tl.zeros([BLOCK_B], dtype=tl.float32)
    db_b = tl.zeros([BLOCK_B], dtype=tl.float32)
    for start in range(pid * BLOCK_M, M, n_prog * BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        rmask = rows < M
        rows64 = rows.to(tl.int64)
        m2_a = rmask[:, None] & cm_a[None, :]
        m2_b = rmask[:, None] & cm_b[None, :]
        mean = tl.load(MEAN + rows, mask=rmask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        xh_a, dyc_a, g_a, sg_a, sgx_a = _bwd_tile_sums(
            _tile_load(X, rows64, stride_x, cols_a, m2_a), _tile_load(DY, rows64, stride_dy, cols_a, m2_a),
            cols_a, cm_a, mean, rstd, C, W)
        xh_b, dyc_b, g_b, sg_b, sgx_b = _bwd_tile_sums(
            _tile_load(X, rows64, stride_x, cols_b, m2_b), _tile_load(DY, rows64, stride_dy, cols_b, m2_b),
            cols_b, cm_b, mean, rstd, C, W)
        a = (sg_a + sg_b) * inv_s
        bcoef = (sgx_a + sgx_b) * inv_s
        _bwd_tile_store(DX, DRES, rows64, stride_dx, N, cols_a, cm_a, m2_a, C, xh_a, g_a, a, bcoef, rstd, HAS_DRES)
        _bwd_tile_store(DX, DRES, rows64, stride_dx, N, cols_b, cm_b, m2_b, C, xh_b, g_b, a, bcoef, rstd, HAS_DRES)
        dw_a += tl.sum(dyc_a * xh_a, axis=0)
        db_a += tl.sum(dyc_a, axis=0)
        dw_b += tl.sum(dyc_b * xh_b, axis=0)
        db_b += tl.sum(dyc_b, axis=0)
    tl.store(DW_PART + pid * N + cols_a, dw_a, mask=cm_a)
    tl.store(DB_PART + pid * N + cols_a, db_a, mask=cm_a)
    tl.store(DW_PART + pid * N + cols_b, dw_b, mask=cm_b)
    tl.store(DB_PART + pid * N + cols_b, db_b, mask=cm_b)



# ---------------------------------------------------------------------------
# launch heuristics (measured on an H100, docs/kernel_notes.md)

@dataclasses.dataclass(frozen=True)
class Launch:
    """How one pass is launched.

    variant: "rows" (tiles of block_m whole rows, one power-of-two tile per row),
    "split" (a row as two power-of-two tiles, see _masked_ln_fwd_split_kernel) or
    "chunked" (one row at a time in `chunk`-wide pieces, two walks per row).
    per_sm: backward programs per SM (a persistent grid); unused by the forward.
    """
    variant: str
    block_m: int
    num_warps: int
    chunk: int = 0
    per_sm: int = 2


VARIANTS = ("rows", "split", "chunked")


def split_tiles(n: int) -> tuple[int, int]:
    """(BLOCK_A, BLOCK_B): the largest power of two <= n and the tail tile covering the rest."""
    block_a = 1 << (n.bit_length() - 1)
    return block_a, triton.next_power_of_2(max(1, n - block_a))


def fwd_config(n: int) -> Launch:
    """Forward launch for rows of n columns (H100 sweeps, device time; docs/kernel_notes.md).

    Up to 4096 columns: tiles of whole rows, 4 warps, 4K-16K elements per program
    (4 rows at 1024-4096): 2,630-2,795 GB/s.  Wider: the row as two tiles ("split"),
    2 rows per program at ~80 elements per thread (4 warps to 6144 columns, 8 beyond):
    2,130 GB/s at 5120, 1,810 at 10240, where every variant tried landed within 3%.
    """
    block_n = triton.next_power_of_2(n)
    if block_n <= 1024:
        return Launch("rows", max(1, 4096 // block_n), 4)
    if block_n <= 4096:
        return Launch("rows", max(1, 16384 // block_n), 4)
    return Launch("split", 2, 4 if sum(split_tiles(n)) <= 6144 else 8)


def bwd_config(n: int) -> Launch:
    """Backward launch: a persistent grid of per_sm programs per SM (H100 sweeps).

    Up to 1024 columns 4 rows per tile, to 4096 one row, 4 warps, 2 programs/SM
    (1,950-2,100 GB/s counting x, dy, dx); wider rows as two tiles, one row per
    tile (1,700 GB/s at 5120 with 4 warps x 2/SM, 1,550 at 10240 with 8 warps x 1/SM).
    """
    block_n = triton.next_power_of_2(n)
    if block_n <= 1024:
        return Launch("rows", max(1, 4096 // block_n), 4)
    if block_n <= 4096:
        return Launch("rows", 1, 4)
    if sum(split_tiles(n)) <= 6144:
        return Launch("split", 1, 4, per_sm=2)
    return Launch("split", 1, 8, per_sm=1)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _persistent_programs(x: torch.Tensor, m: int, block_m: int, per_sm: int) -> int:
    tiles = triton.cdiv(m, block_m)
    if not x.is_cuda:  # interpreter: a few programs still exercise the partial sums
        return max(1, min(tiles, 3))
    sms = _num_sms(x.device.index if x.device.index is not None else torch.cuda.current_device())
    # A persistent grid: each program keeps fp32 dw/db partials of a whole row, so
    # the G x N x 8 bytes of partials stay small next to the activations.
    return max(1, min(tiles, sms * per_sm))


def _as_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    t2 = t.reshape(-1, n)
    if t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2


def _pick(default: Launch, variant, block_m, num_warps, chunk, per_sm=None) -> Launch:
    """The heuristic launch with any explicitly given field replaced (tests, sweeps)."""
    v = variant or default.variant
    if v not in VARIANTS:
        raise ValueError(f"unknown kernel variant {v!r}; expected one of {VARIANTS}")
    same = v == default.variant
    return Launch(v, block_m or (default.block_m if same else 1), num_warps or default.num_warps,
                  chunk or default.chunk, per_sm or default.per_sm)


def masked_ln_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor,
                  eps: float, *, delta: torch.Tensor | None = None, block_m: int | None = None,
                  num_warps: int | None = None, variant: str | None = None, chunk: int | None = None):
    """Returns (y, mean, rstd, h); y has x's shape and dtype, mean/rstd are fp32 [rows].

    With ``delta`` the input is ``h = x + delta`` (returned, else h is None).  The
    keyword launch arguments override fwd_config (tests and ``msg-bench --sweep``).
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
    launch = _pick(fwd_config(n), variant, block_m, num_warps, chunk)
    args = (x2, y, weight, bias, mask, mean, rstd, delta2, h, m, n, x2.stride(0), y.stride(0), eps)
    has_delta = delta is not None
    if m == 0:
        pass
    elif launch.variant == "chunked":
        _masked_ln_fwd_wide_kernel[(m,)](*args, CHUNK=launch.chunk or 1024, HAS_DELTA=has_delta,
                                         num_warps=launch.num_warps)
    elif launch.variant == "split":
        block_a, block_b = split_tiles(n)
        _masked_ln_fwd_split_kernel[(triton.cdiv(m, launch.block_m),)](
            *args, BLOCK_M=launch.block_m, BLOCK_A=block_a, BLOCK_B=block_b, HAS_DELTA=has_delta,
            num_warps=launch.num_warps)
    else:
        _masked_ln_fwd_kernel[(triton.cdiv(m, launch.block_m),)](
            *args, BLOCK_M=launch.block_m, BLOCK_N=triton.next_power_of_2(n), HAS_DELTA=has_delta,
            num_warps=launch.num_warps)
    return y.view(x.shape), mean, rstd, (h.view(x.shape) if delta is not None else None)


def masked_ln_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor,
                  mean: torch.Tensor, rstd: torch.Tensor, *, block_m: int | None = None,
                  num_warps: int | None = None, programs: int | None = None,
                  bias_dtype: torch.dtype | None = None, dres: torch.Tensor | None = None,
                  variant: str | None = None, chunk: int | None = None, per_sm: int | None = None):
    """Returns (dx, dweight, dbias) with the dtypes of x, weight and bias (default weight's).

    ``dres`` (same shape as x) is added to dx in the same pass: the gradient of
    a fused residual add's other consumer.  Keyword launch arguments override bwd_config.
    """
    n = x.shape[-1]
    x2 = _as_rows(x, n)
    dy2 = _as_rows(dy, n)
    m = x2.shape[0]
    dx = torch.empty((m, n), dtype=x.dtype, device=x.device)
    launch = _pick(bwd_config(n), variant, block_m, num_warps, chunk, per_sm)
    rows_per_tile = 1 if launch.variant == "chunked" else launch.block_m
    g = programs or _persistent_programs(x, m, rows_per_tile, launch.per_sm)
    part = torch.empty((2, g, n), dtype=torch.float32, device=x.device)  # dw and db partials
    dw_part, db_part = part[0], part[1]
    dres2 = dres.reshape(m, n).contiguous() if dres is not None else dx
    args = (x2, dy2, dx, weight, mask, mean, rstd, dw_part, db_part, dres2, m, n,
            x2.stride(0), dy2.stride(0), dx.stride(0))
    has_dres = dres is not None
    if m == 0:
        part.zero_()
    elif launch.variant == "chunked":
        _masked_ln_bwd_wide_kernel[(g,)](*args, CHUNK=launch.chunk or min(2048, triton.next_power_of_2(n)),
                                         HAS_DRES=has_dres, num_warps=launch.num_warps)
    elif launch.variant == "split":
        block_a, block_b = split_tiles(n)
        _masked_ln_bwd_split_kernel[(g,)](*args, BLOCK_M=launch.block_m, BLOCK_A=block_a, BLOCK_B=block_b,
                                          HAS_DRES=has_dres, num_warps=launch.num_warps)
    else:
        _masked_ln_bwd_kernel[(g,)](*args, BLOCK_M=launch.block_m, BLOCK_N=triton.next_power_of_2(n),
                                    HAS_DRES=has_dres, num_warps=launch.num_warps)
    # Device-side reductions of the partial stacks (no host round trip; a C++ op
    # has less launch overhead than another Triton launch).  Two sums, not one
    # over both stacks: dw and db must not share storage (outputs of a custom op,
    # ops.py, may not alias each other).
    dw = part[0].sum(0).to(weight.dtype)
    db = part[1].sum(0).to(bias_dtype or weight.dtype)
    return dx.view(x.shape), dw, db


# The autograd wiring (forward saves x, mean, rstd; backward calls masked_ln_bwd)
# lives in megatron_msg/kernels/ops.py as torch.library custom ops.
