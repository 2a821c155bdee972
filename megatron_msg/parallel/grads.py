"""Gradient synchronisation and global-norm clipping for a TP x PP x DP replica set.

After the pipeline's backward passes:

1. the two copies of a tied token embedding (first and last pipeline stage)
   sum their gradients, so both copies take the same update;
2. under sequence parallelism, replicated parameters used on the sequence slice
   (``model.sequence_parallel_grad_names()``) sum their gradients over the TP
   group: each rank saw only its own tokens; afterwards every TP rank holds the
   full, identical gradient, so the norm below still counts them once;
3. data-parallel replicas sum their gradients (each replica's loss is already
   scaled by 1 / (all micro-batches of the step), so the sum is the step's
   gradient; flattened into one buffer per dtype for few, large all-reduces);
4. the global norm counts every logical entry once: TP-split tensors on every
   TP rank, replicated tensors on TP rank 0 only, the tied embedding on the
   first stage only; the squares are summed over the model-parallel group.

Parameters kept in bf16/fp16 (``train.params_dtype``, training/optimizer.py)
accumulate their gradients in fp32 instead, like Megatron's ``main_grad``:
a hook adds each micro-batch's low-precision gradient into ``p.main_grad`` and
frees ``p.grad``, so sums over micro-batches and replicas, the norm and the
update all see fp32.  ``grad_of`` is the gradient either way.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from megatron_msg.model.layout import tensor_spec
from megatron_msg.parallel.topology import ParallelState

TIED = "embed.tok.weight"


def grad_of(p: torch.Tensor) -> torch.Tensor | None:
    """The gradient the step uses: the fp32 accumulator of a low-precision parameter, else ``.grad``."""
    return p.main_grad if hasattr(p, "main_grad") else p.grad


def _accumulate_in_fp32(p: torch.Tensor) -> None:
    if p.main_grad is None:
        p.main_grad = p.grad.float()
    else:
        p.main_grad.add_(p.grad)
    p.grad = None


def accumulate_gradients_in_fp32(params) -> None:
    """Give each parameter an fp32 ``main_grad`` that its gradients accumulate into (see above)."""
    for p in params:
        if not hasattr(p, "main_grad"):
            p.main_grad = None
            p.register_post_accumulate_grad_hook(_accumulate_in_fp32)


def clear_gradients(params) -> None:
    for p in params:
        p.grad = None
        if hasattr(p, "main_grad"):
            p.main_grad = None


def _all_reduce_flat(grads: list[torch.Tensor], group) -> None:
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for same in by_dtype.values():
        flat = _flatten_dense_tensors(same)
        dist.all_reduce(flat, group=group)
        for g, synced in zip(same, _unflatten_dense_tensors(flat, same)):
            g.copy_(synced)


@torch.no_grad()
def sync_gradients(model: torch.nn.Module, ps: ParallelState, data_parallel: bool = True,
                   reduced: frozenset[str] = frozenset()) -> None:
    """Steps 1-3 above; ``data_parallel=False`` leaves out step 3 (ZeRO-2 reduce-scatters instead);
    ``reduced``: names whose step 3 is done (summed in buckets during backward: grad_buckets.py)."""
    grads = {n: g for n, p in model.named_parameters() if (g := grad_of(p)) is not None}
    if ps.pp_size > 1 and TIED in grads:
        dist.all_reduce(grads[TIED], group=ps.embed_group)
    partial = getattr(model, "sequence_parallel_grad_names", None)
    if ps.tp_size > 1 and partial is not None:
        sliced = [grads[n] for n in partial() if n in grads]
        if sliced:
            _all_reduce_flat(sliced, ps.tp_group)
    if data_parallel and ps.dp_size > 1:
        rest = [g for n, g in grads.items() if n not in reduced]
        if rest:
            _all_reduce_flat(rest, ps.dp_group)


def reduced_after_backward(model: torch.nn.Module, ps: ParallelState) -> set[str]:
    """Names whose data-parallel sum must follow their other sums (steps 1-2), so it is not
    done during backward: the tied embedding on a pipeline, sequence-parallel parameters."""
    names = {TIED} if ps.pp_size > 1 else set()
    partial = getattr(model, "sequence_parallel_grad_names", None)
    if ps.tp_size > 1 and partial is not None:
        names |= set(partial())
    return names


def counted_once(name: str, ps: ParallelState) -> bool:
    if name == TIED and not ps.is_first_stage:
        return False  # the last stage's copy of the tied embedding
    return ps.tp_rank == 0 or tensor_spec(name).tp_split_dim() is not None


@torch.no_grad()
def clip_grad_norm(model: torch.nn.Module, max_norm: float, ps: ParallelState) -> torch.Tensor:
    """Clip to ``max_norm`` (0 or inf: only measure); returns the global gradient norm."""
    named = [(n, g) for n, p in model.named_parameters() if (g := grad_of(p)) is not None]
    grads = [g for _, g in named]
    if ps.topology.tp * ps.topology.pp == 1:
        # What torch.nn.utils.clip_grad_norm_ computes, on gradients that may not live in .grad.
        norm = torch.nn.utils.get_total_norm(grads)
        if max_norm > 0 and max_norm != float("inf") and grads:
            torch._foreach_mul_(grads, (max_norm / (norm + 1e-6)).clamp(max=1.0))
        return norm
    device = grads[0].device if grads else ps.device
    sq = torch.zeros((), device=device, dtype=torch.float32)
    for name, g in named:
        if counted_once(name, ps):
            sq += g.float().pow(2).sum()
    dist.all_reduce(sq, group=ps.mp_group)
    norm = sq.sqrt()
    if max_norm > 0 and max_norm != float("inf"):
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
    return norm
