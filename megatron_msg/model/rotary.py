"""Rotary position embeddings (RoPE, Su et al. 2021) on each head's queries and keys.

Convention: "rotate half" (GPT-NeoX, LLaMA): the pairs rotated together are
``(x[i], x[i + head_dim / 2])``, pair ``i`` at angle ``position * theta ** (-2 i / head_dim)``.
Position information then lives in no parameter at all, so growth has nothing
positional to grow: every head, old or new, rotates alike, which keeps MSG's
head growth exact (a new head's output is masked whatever its queries are).

The tables are recomputed in each attention call from the sequence length
(``t x head_dim / 2`` angles, negligible next to attention), so nothing has to be
kept in sync with a model's device, dtype or checkpoint.  Under sequence
parallelism attention sees the whole sequence (QKV gathers it), so positions
are always ``0 .. t-1``.
"""
from __future__ import annotations

import torch


def rotary_angles(t: int, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each ``[t, head_dim]`` fp32: pair i's angle repeated at i and i + head_dim / 2."""
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(t, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[..., t, head_dim]`` by the tables (computed in fp32, returned in x's dtype)."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)
