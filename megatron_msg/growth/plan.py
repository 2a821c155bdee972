"""What a growth schedule costs, before running it (``msg-plan``).

Per stage of ``cfg``'s schedule (the start shape, then each growth): its steps, shape,
layout, parameters, training FLOPs per token and in total, and the largest rank's share
of the model with the bytes its weights, gradients and optimizer state take.  The total is
compared with training the final shape for the whole run: the compute MSG saves.

FLOPs per token follow Megatron-LM's count (Narayanan et al., 2021, eq. 3, without
activation recomputation): ``6 x`` the parameters that take part in matrix products
(every 2-D weight except embedding lookups, plus the LM head when it is tied to the
token embedding) ``+ 12 x layers x seq_len x heads x head_dim`` for attention scores
and their weighted sum.  Masks during a ramp add memory passes, not FLOPs.

Per-rank sizes are exact: each rank's part of the model is built on the meta device
(no memory) with its TP split and pipeline stage.

Activations are an estimate (:func:`activation_bytes`): Korthikanti et al. 2022
("Reducing Activation Recomputation in Large Transformer Models", section 4) count
what a layer keeps for backward, per micro-batch, in 16-bit: ``34 s b h`` bytes,
plus ``5 a s^2 b`` for the attention matrices, which the fused attention kernels
``scaled_dot_product_attention`` picks on GPUs never store (left out here).  Split by
tensor: ``10 s b h`` on the residual-stream side (LayerNorm inputs, the two
projections' inputs, dropout masks) and ``8 s b inner + 4 s b ffn`` inside the TP
region (Q, K, V, attention output; fc1's output and the activation's), so heads x
head_dim and the FFN width enter separately.  The first pipeline stage is the
fullest under 1F1B: it keeps ``min(pp, micro-batches)`` micro-batches in flight.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from megatron_msg.config import ModelConfig, RunConfig
from megatron_msg.model import build_model
from megatron_msg.model.init import logical_num_parameters
from megatron_msg.model.placement import Placement
from megatron_msg.parallel.layers import TensorParallel

BYTES_FP32 = 4


@dataclass(frozen=True)
class StagePlan:
    name: str                     # "start" or "stage N"
    first_step: int
    last_step: int                # exclusive
    shape: str
    operator: str | None          # the growth operator that produced this shape
    layout: tuple[int, int, int]  # (tp, pp, dp)
    parameters: int
    flops_per_token: int
    tokens: int
    flops: int
    rank_parameters: int          # the largest rank's share of the parameters
    rank_bytes: int               # its weights + gradients + optimizer state (ZeRO-partitioned)
    activation_bytes: int         # estimated activations kept for backward on the first stage
    weight_bytes: int = 0         # rank_bytes, by component
    gradient_bytes: int = 0
    optimizer_bytes: int = 0
    logits_bytes: int = 0         # the last stage's fp32 logits and their gradient, one micro-batch
    micro_batch: int = 0          # samples per micro-batch
    global_batch: int = 0         # samples per step (micro-batch x micro-batches, all replicas)

    @property
    def gpus(self) -> int:
        return self.layout[0] * self.layout[1] * self.layout[2]

    @property
    def memory_bytes(self) -> dict[str, int]:
        """What the fullest rank holds, by component (the parts msg-plan's fit check adds up)."""
        return {"weights": self.weight_bytes, "gradients": self.gradient_bytes, "optimizer": self.optimizer_bytes,
                "activations": self.activation_bytes, "logits": self.logits_bytes}

    def as_dict(self) -> dict:
        return asdict(self)


def _meta_model(cfg: ModelConfig, placement: Placement | None = None):
    with torch.device("meta"):
        return build_model(cfg, placement or Placement(), initialize=False)


def flops_per_token(cfg: ModelConfig) -> int:
    """Training FLOPs per token (forward + backward), Megatron-LM's count (module docstring)."""
    model = _meta_model(cfg)
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and not n.startswith("embed."))
    if cfg.tie_embeddings:
        matmul += cfg.vocab_size * cfg.hidden  # the LM head reuses the token embedding
    return 6 * matmul + 12 * cfg.layers * cfg.seq_len * cfg.heads * cfg.head_dim


def largest_rank_parameters(cfg: ModelConfig, tp: int, pp: int) -> int:
    """Parameters held by the fullest rank of a TP x PP layout (tied embeddings counted on both ends)."""
    return max(sum(p.numel() for p in _meta_model(cfg, Placement(tp=TensorParallel(tp, r), stage=s,
                                                                   stages=pp)).parameters())
               for s in range(pp) for r in range(tp))


def state_bytes(parameters: int, dp: int, zero_stage: int, params_bytes: int = BYTES_FP32) -> int:
    """Weights + gradients + optimizer state of one rank holding ``parameters`` (``state_components``)."""
    return sum(state_components(parameters, dp, zero_stage, params_bytes))


def state_components(parameters: int, dp: int, zero_stage: int, params_bytes: int = BYTES_FP32
                     ) -> tuple[int, int, int]:
    """(weights, gradients, optimizer state) bytes of one rank holding ``parameters``.

    fp32 parameters (``params_bytes`` 4): fp32 weights and gradients, and two Adam
    moments.  16-bit parameters (2): 16-bit weights, fp32 gradient sums, and fp32
    master weights beside the moments (training/optimizer.py).  Under ZeRO the
    optimizer state (moments, and masters) is split over DP; ZeRO-2 frees the full
    gradients only after backward (docs/parallel.md), so its peak is stage 1's.
    Activations and communication buffers are not included.
    """
    optimizer = (2 if params_bytes == BYTES_FP32 else 3) * parameters * BYTES_FP32
    if zero_stage:
        optimizer = -(-optimizer // dp)
    return parameters * params_bytes, parameters * BYTES_FP32, optimizer


def logits_bytes(cfg: ModelConfig, micro_batch: int, tp: int) -> int:
    """The last pipeline stage's fp32 logits of one micro-batch and their gradient (vocab split by TP)."""
    return 2 * micro_batch * cfg.seq_len * -(-cfg.vocab_size // tp) * BYTES_FP32


def layer_activation_bytes(cfg: ModelConfig, micro_batch: int, tp: int, sequence_parallel: bool,
                           act_bytes: int = 2) -> int:
    """Bytes one layer keeps for backward for one micro-batch (module docstring).

    ``act_bytes``: the activations' element size (2 for bf16/fp16 compute, 4 for fp32);
    Korthikanti's counts are for 2, and scale with it (dropout masks included).
    """
    sb = cfg.seq_len * micro_batch
    stream = 10 * sb * cfg.hidden  # replicated on every TP rank unless SP splits it
    region = 8 * sb * cfg.heads * cfg.head_dim + 4 * sb * cfg.ffn
    return (stream // (tp if sequence_parallel else 1) + region // tp) * act_bytes // 2


def activation_bytes(cfg: ModelConfig, micro_batch: int, micro_batches: int, tp: int, pp: int,
                     sequence_parallel: bool, recompute: str = "none", recompute_layers: int = 0,
                     act_bytes: int = 2, virtual: int = 1) -> int:
    """Activations the first pipeline stage keeps at its 1F1B peak (an estimate: module docstring).

    ``micro_batches``: per DP replica and step.  A recomputed layer keeps only its input
    (``2 s b h`` in 16-bit, split by SP), and one layer's whole activations are live
    while it is recomputed in backward.  With ``virtual`` chunks per stage (interleaved 1F1B)
    the peak is the schedule's own count of chunk-forwards in flight on the first stage
    (parallel/schedule.py): ``1 + (p - 1) / (p v)`` times plain 1F1B's when ``m >= p``.
    """
    per_layer = layer_activation_bytes(cfg, micro_batch, tp, sequence_parallel, act_bytes)
    layer_input = cfg.seq_len * micro_batch * cfg.hidden // (tp if sequence_parallel else 1) * act_bytes
    virtual = virtual if pp > 1 else 1
    chunk_layers = cfg.layers // (pp * virtual)
    recomputed = 0 if recompute == "none" else (chunk_layers if recompute_layers == 0
                                                 else min(recompute_layers, chunk_layers))
    per_chunk = recomputed * layer_input + (chunk_layers - recomputed) * per_layer
    if virtual == 1:
        in_flight = min(pp, micro_batches)
    else:
        from megatron_msg.parallel.schedule import simulated
        in_flight = simulated(pp, virtual, micro_batches).peak_in_flight(0)
    return in_flight * per_chunk + (per_layer if recomputed else 0)


def plan_schedule(cfg: RunConfig, decided: dict[int, int] | None = None) -> list[StagePlan]:
    """Per stage of the schedule; ``decided``: the steps a run chose for its ``at_step: auto``
    stages (undecided ones are planned at their earliest check: growth/auto_timing.py)."""
    from megatron_msg.growth.auto_timing import planned_stages
    t = cfg.train
    stages = planned_stages(cfg, decided)
    starts = [0] + [s.at_step for s in stages]
    ends = starts[1:] + [t.steps]
    shapes = [cfg.model] + [cfg.model.with_shape(s.shape) for s in stages]
    layouts = [cfg.parallel.layout] + [s.layout for s in stages]
    operators = [None] + [s.operator for s in stages]
    # (micro-batch, micro-batches per step): the stage's own, as training/batches.py reads them
    batches = [(t.batch_size, t.grad_accum)] + [(s.batch_size, s.grad_accum) for s in stages]
    params_bytes = 2 if t.params_dtype in ("bf16", "fp16") else BYTES_FP32
    act_bytes = 2 if t.dtype in ("bf16", "fp16") else BYTES_FP32
    plans = []
    for i, (first, last, mcfg, (tp, pp, dp), op, (micro, accum)) in enumerate(
            zip(starts, ends, shapes, layouts, operators, batches)):
        per_token = flops_per_token(mcfg)
        tokens = (last - first) * micro * accum * mcfg.seq_len
        rank_params = largest_rank_parameters(mcfg, tp, pp)
        weights, grads, optimizer = state_components(rank_params, dp, cfg.parallel.zero_stage, params_bytes)
        plans.append(StagePlan(
            name="start" if i == 0 else f"stage {i - 1}", first_step=first, last_step=last, shape=str(mcfg.shape),
            operator=op, layout=(tp, pp, dp), parameters=logical_num_parameters(mcfg),
            flops_per_token=per_token, tokens=tokens, flops=per_token * tokens, rank_parameters=rank_params,
            rank_bytes=weights + grads + optimizer,
            activation_bytes=activation_bytes(mcfg, micro, accum // dp, tp, pp,
                                              cfg.parallel.sequence_parallel, t.recompute,
                                              t.recompute_layers, act_bytes, cfg.parallel.virtual_stages),
            weight_bytes=weights, gradient_bytes=grads, optimizer_bytes=optimizer,
            logits_bytes=logits_bytes(mcfg, micro, tp), micro_batch=micro, global_batch=micro * accum))
    return plans


def final_shape_flops(cfg: RunConfig, plans: list[StagePlan]) -> int:
    """FLOPs of the same steps and tokens spent on the final shape throughout (no growth)."""
    return plans[-1].flops_per_token * sum(p.tokens for p in plans)


def format_count(n: float, unit: str = "") -> str:
    for div, suffix in ((1e21, "Z"), (1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


def format_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def format_plan(cfg: RunConfig, plans: list[StagePlan]) -> str:
    head = ("| stage | steps | shape | operator | layout | batch | parameters | FLOPs/token | tokens | FLOPs "
            f"| largest rank | its weights+grads+Adam ({cfg.train.params_dtype} params, "
            f"ZeRO-{cfg.parallel.zero_stage}) | first stage's activations, est. (recompute "
            f"{cfg.train.recompute}) |")
    rows = [head, "|" + "---|" * 13]
    for p in plans:
        rows.append(f"| {p.name} | {p.first_step}-{p.last_step} | {p.shape} | {p.operator or '-'} "
                    f"| tp{p.layout[0]} x pp{p.layout[1]} x dp{p.layout[2]} | {p.micro_batch} x "
                    f"{p.global_batch // p.micro_batch} | {format_count(p.parameters)} "
                    f"| {format_count(p.flops_per_token)} | {format_count(p.tokens)} | {format_count(p.flops)} "
                    f"| {format_count(p.rank_parameters)} | {format_bytes(p.rank_bytes)} | {format_bytes(p.activation_bytes)} |")
    total, flat = sum(p.flops for p in plans), final_shape_flops(cfg, plans)
    rows.append("")
    if len(plans) == 1:
        rows.append(f"total {format_count(total, 'FLOP')} (no growth stages).")
    else:
        rows.append(f"total {format_count(total, 'FLOP')}; the final shape for all {cfg.train.steps} steps: "
                    f"{format_count(flat, 'FLOP')}; growth spends {total / flat:.1%} of it ({flat / total:.2f}x less "
                    f"compute).")
    if any(st.auto for st in cfg.resolved_stages()):
        rows.append("at_step auto stages are planned at their earliest check (the most compute the rule can "
                    "spend, lookaheads aside); the run decides later or at the same step.")
    rows.append("Memory columns: activations are Korthikanti et al.'s count (fused attention, no s^2 terms) "
                "for the stage's micro-batch; logits, workspace and communication buffers are not included "
                "here. batch: micro-batch size x micro-batches per step (all replicas).")
    return "\n".join(rows)
