"""Per-tensor metadata of the logical training state.

Every parameter and mask has a stable name (the model's ``state_dict`` key) and
a :class:`TensorSpec` that says which growable axis each dimension is, whether
that dimension is a layer's *output* (rows: copied by net2net) or *input*
(columns: split by net2net), and how a fresh entry is initialised.  Growth,
optimizer-state transfer and (later) sharding read this table; none of them
looks inside modules.

Axes.  A dimension of size ``prefix * units * suffix`` grows in ``units``:

    hidden   units = hidden                    (embeddings, LN, residual outputs)
    ffn      units = ffn
    qkv      prefix 3 (q, k, v), units = heads, suffix = head_dim
    heads    units = heads, suffix = head_dim  (attention output projection input)
    headmask units = heads                     (the per-head mask)
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from megatron_msg.config import Shape

OUT, IN = "out", "in"


@dataclass(frozen=True)
class Axis:
    kind: str  # hidden | ffn | qkv | heads | headmask
    role: str  # out | in

    def factors(self, shape: Shape, head_dim: int) -> tuple[int, int, int]:
        """(prefix, units, suffix) of this dimension for a model of ``shape``."""
        if self.kind == "hidden":
            return 1, shape.hidden, 1
        if self.kind == "ffn":
            return 1, shape.ffn, 1
        if self.kind == "qkv":
            return 3, shape.heads, head_dim
        if self.kind == "heads":
            return 1, shape.heads, head_dim
        if self.kind == "headmask":
            return 1, shape.heads, 1
        raise ValueError(self.kind)

    @property
    def unit_dim(self) -> str:
        """Which Shape field this axis's units are."""
        return {"hidden": "hidden", "ffn": "ffn", "qkv": "heads", "heads": "heads",
                "headmask": "heads"}[self.kind]


H_OUT, H_IN = Axis("hidden", OUT), Axis("hidden", IN)
F_OUT, F_IN = Axis("ffn", OUT), Axis("ffn", IN)
QKV_OUT, HEADS_IN = Axis("qkv", OUT), Axis("heads", IN)
HEADMASK = Axis("headmask", OUT)

# Initialisers for fresh entries ("normal" growth init and new layers):
#   weight -> N(0, std); bias -> 0; ln_weight -> 1; mask -> 0 (new units start masked)
WEIGHT, BIAS, LN_WEIGHT, MASK = "weight", "bias", "ln_weight", "mask"


@dataclass(frozen=True)
class TensorSpec:
    axes: tuple[Axis | None, ...]
    init: str
    is_mask: bool = False
    no_weight_decay: bool = False
    # Dimension indexed by token id: split in blocks by vocab-parallel layers.
    vocab_dim: int | None = None

    def tp_split_dim(self) -> int | None:
        """The dimension tensor parallelism splits (units of ffn or heads, or vocab), if any.

        Hidden is never split (it is the replicated residual stream): Megatron's layout,
        column-parallel in (QKV, fc1), row-parallel out (proj, fc2).
        """
        if self.vocab_dim is not None:
            return self.vocab_dim
        for d, axis in enumerate(self.axes):
            if axis is not None and axis.kind in TP_SPLIT_KINDS:
                return d
        return None


# Axis kinds whose units are divided among tensor-parallel ranks.
TP_SPLIT_KINDS = ("ffn", "qkv", "heads", "headmask")


def _spec(axes, init, **kw) -> TensorSpec:
    return TensorSpec(tuple(axes), init, **kw)


# Patterns over names with the layer index replaced by "*".
_COMMON_LAYER = {
    "attn.qkv.weight": _spec([QKV_OUT, H_IN], WEIGHT),
    "attn.qkv.bias": _spec([QKV_OUT], BIAS, no_weight_decay=True),
    "attn.proj.weight": _spec([H_OUT, HEADS_IN], WEIGHT),
    "attn.proj.bias": _spec([H_OUT], BIAS, no_weight_decay=True),
    "ln1.weight": _spec([H_OUT], LN_WEIGHT, no_weight_decay=True),
    "ln1.bias": _spec([H_OUT], BIAS, no_weight_decay=True),
    "ln2.weight": _spec([H_OUT], LN_WEIGHT, no_weight_decay=True),
    "ln2.bias": _spec([H_OUT], BIAS, no_weight_decay=True),
    "mlp.fc1.weight": _spec([F_OUT, H_IN], WEIGHT),
    "mlp.fc1.bias": _spec([F_OUT], BIAS, no_weight_decay=True),
    "mlp.fc2.weight": _spec([H_OUT, F_IN], WEIGHT),
    "mlp.fc2.bias": _spec([H_OUT], BIAS, no_weight_decay=True),
    "ffn_mask": _spec([F_OUT], MASK, is_mask=True),
    "head_mask": _spec([HEADMASK], MASK, is_mask=True),
    "depth_mask": _spec([], MASK, is_mask=True),
}

_GLOBAL = {
    "embed.tok.weight": _spec([None, H_OUT], WEIGHT, vocab_dim=0),
    "embed.pos.weight": _spec([None, H_OUT], WEIGHT),
    "embed.token_type.weight": _spec([None, H_OUT], WEIGHT),
    "embed.ln.weight": _spec([H_OUT], LN_WEIGHT, no_weight_decay=True),
    "embed.ln.bias": _spec([H_OUT], BIAS, no_weight_decay=True),
    "final_ln.weight": _spec([H_OUT], LN_WEIGHT, no_weight_decay=True),
    "final_ln.bias": _spec([H_OUT], BIAS, no_weight_decay=True),
    "lm_head.weight": _spec([None, H_IN], WEIGHT, vocab_dim=0),
    "hidden_mask": _spec([H_OUT], MASK, is_mask=True),
    # BERT heads
    "mlm.dense.weight": _spec([H_OUT, H_IN], WEIGHT),
    "mlm.dense.bias": _spec([H_OUT], BIAS, no_weight_decay=True),
    "mlm.ln.weight": _spec([H_OUT], LN_WEIGHT, no_weight_decay=True),
    "mlm.ln.bias": _spec([H_OUT], BIAS, no_weight_decay=True),
    "mlm.bias": _spec([None], BIAS, no_weight_decay=True, vocab_dim=0),
    "pooler.dense.weight": _spec([H_OUT, H_IN], WEIGHT),
    "pooler.dense.bias": _spec([H_OUT], BIAS, no_weight_decay=True),
    "nsp.weight": _spec([None, H_IN], WEIGHT),
    "nsp.bias": _spec([None], BIAS, no_weight_decay=True),
}

_LAYER_NAME = re.compile(r"^layers\.(\d+)\.(.+)$")


def split_layer_name(name: str) -> tuple[int | None, str]:
    """``layers.3.mlp.fc1.weight`` -> (3, ``mlp.fc1.weight``); global names -> (None, name)."""
    m = _LAYER_NAME.match(name)
    if m:
        return int(m.group(1)), m.group(2)
    return None, name


def layer_name(index: int, local: str) -> str:
    return f"layers.{index}.{local}"


def tensor_spec(name: str) -> TensorSpec:
    layer, local = split_layer_name(name)
    table = _COMMON_LAYER if layer is not None else _GLOBAL
    try:
        return table[local]
    except KeyError:
        raise KeyError(f"no layout spec for tensor {name!r}: add it to megatron_msg/model/layout.py") from None
