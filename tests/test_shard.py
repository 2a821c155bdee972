"""shard / merge: pure per-tensor functions over the logical state."""
from __future__ import annotations

import pytest
import torch

from megatron_msg.checkpoint.shard import merge_tensor, shard_tensor
from megatron_msg.config import Shape
from megatron_msg.model import build_model
from megatron_msg.model.layout import tensor_spec
from tests.helpers import tiny_cfg


@pytest.mark.parametrize("arch", ["gpt", "bert"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_merge_inverts_shard_for_every_tensor(arch, tp):
    cfg = tiny_cfg(arch, Shape(24, 40, 4, 2), vocab_size=61, tie_embeddings=arch == "bert")
    for name, full in build_model(cfg, seed=1).state_dict().items():
        parts = [shard_tensor(name, full, cfg, tp, r) for r in range(tp)]
        assert len({tuple(p.shape) for p in parts}) == 1, name  # equal blocks on every rank
        torch.testing.assert_close(merge_tensor(name, parts, cfg), full, rtol=0, atol=0)
        if tp > 1 and tensor_spec(name).tp_split_dim() is not None:
            assert parts[0].numel() * tp >= full.numel() and parts[0].numel() < full.numel(), name


def test_qkv_is_packed_per_rank_as_3_local_heads_head_dim():
    cfg = tiny_cfg("gpt", Shape(8, 8, 4, 1), head_dim=2)
    # Entry value = its (q/k/v, head, dim) coordinates, so the block contents are checkable.
    full = torch.arange(3 * 4 * 2).float().view(24, 1).expand(24, 8).contiguous()
    block = shard_tensor("layers.0.attn.qkv.weight", full, cfg, tp_size=2, tp_rank=1)
    want = torch.tensor([qkv * 8 + head * 2 + d for qkv in range(3) for head in (2, 3) for d in range(2)]).float()
    torch.testing.assert_close(block[:, 0], want)


def test_vocab_blocks_are_padded_with_zero_rows():
    cfg = tiny_cfg("gpt", Shape(8, 8, 2, 1), vocab_size=61)
    full = torch.randn(61, 8)
    last = shard_tensor("embed.tok.weight", full, cfg, tp_size=2, tp_rank=1)
    assert last.shape == (31, 8)
    torch.testing.assert_close(last[:30], full[31:])
    assert torch.all(last[30] == 0)
