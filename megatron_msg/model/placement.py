"""Which part of the logical model a rank builds: its TP split and its pipeline stage.

``Placement()`` is the whole model on one device.  Under pipeline parallelism a
stage holds an equal contiguous block of layers (``Placement.layer_indices``); the
first stage also holds the embeddings, the last the final LayerNorm and output
heads, and with tied embeddings the last stage holds its own copy of the token
embedding (gradients summed across the two copies by the trainer).

With ``virtual = v`` chunks per stage (interleaved 1F1B, parallel/schedule.py) the layers
are cut into ``stages * v`` equal blocks and stage ``r`` holds blocks ``r, r + stages, ...``
(chunk ``c`` is block ``c * stages + r``). Layers keep their global indices either way, so a
depth growth that rebuilds the model on the grown config puts every new layer on the stage
and chunk its index says, and checkpoints (logical names) do not depend on ``v``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from megatron_msg.parallel.layers import TensorParallel
from megatron_msg.parallel.random import RNGTracker
from megatron_msg.parallel.recompute import RecomputePolicy


@dataclass(frozen=True)
class Placement:
    tp: TensorParallel = field(default_factory=TensorParallel)
    stage: int = 0
    stages: int = 1
    virtual: int = 1  # model chunks per stage (interleaved 1F1B); 1: one contiguous block
    # Generator for dropout inside the TP region (attention probabilities); None: the default one.
    rng: RNGTracker | None = field(default=None, compare=False)
    # Which of this stage's layers recompute their activations in backward (memory, not function).
    recompute: RecomputePolicy = field(default_factory=RecomputePolicy, compare=False)

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.stages - 1

    @property
    def whole(self) -> bool:
        return self.stages == 1 and self.tp.size == 1

    def chunk_layer_indices(self, layers: int, chunk: int) -> range:
        """Global indices of the layers of this stage's ``chunk``."""
        blocks = self.stages * self.virtual
        if layers % blocks:
            what = (f"the {self.stages} pipeline stages" if self.virtual == 1 else
                    f"{self.stages} pipeline stages x {self.virtual} virtual stages = {blocks} chunks")
            raise ValueError(f"layers={layers} is not divisible by {what}")
        per, block = layers // blocks, chunk * self.stages + self.stage
        return range(block * per, (block + 1) * per)

    def layer_indices(self, layers: int) -> list[int]:
        """Global indices of every layer this stage holds, in increasing order."""
        return [i for c in range(self.virtual) for i in self.chunk_layer_indices(layers, c)]

    def first_chunk(self, chunk: int) -> bool:
        """Whether ``chunk`` of this stage is the model's first block (it embeds the tokens)."""
        return self.first and chunk == 0

    def last_chunk(self, chunk: int) -> bool:
        """Whether ``chunk`` of this stage is the model's last block (it computes the loss)."""
        return self.last and chunk == self.virtual - 1


def holds_global(name: str, placement: Placement, tied: bool) -> bool:
    """Whether a rank with ``placement`` holds the non-layer tensor ``name``."""
    if name == "hidden_mask":
        return True
    if name == "embed.tok.weight":
        return placement.first or (placement.last and tied)
    if name.startswith("embed."):
        return placement.first
    return placement.last  # final_ln, lm_head, mlm, pooler, nsp


def owner_stage(name: str, layers: int, stages: int, virtual: int = 1) -> int:
    """The stage whose copy of ``name`` is the canonical one (for merging)."""
    from megatron_msg.model.layout import split_layer_name
    layer, _ = split_layer_name(name)
    if layer is not None:
        return layer // (layers // (stages * virtual)) % stages
    if name.startswith("embed.") or name == "hidden_mask":
        return 0
    return stages - 1


def placement_for(ps, rng: RNGTracker | None = None, sequence_parallel: bool = False,
                  recompute: RecomputePolicy = RecomputePolicy()) -> Placement:
    """The placement of rank ``ps.rank`` in a :class:`~megatron_msg.parallel.topology.ParallelState`."""
    tp = TensorParallel(ps.tp_size, ps.tp_rank, ps.tp_group, sequence_parallel)
    return Placement(tp=tp, stage=ps.pp_rank, stages=ps.pp_size, virtual=ps.vpp_size, rng=rng, recompute=recompute)
