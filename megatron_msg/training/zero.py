"""ZeRO stages 1 and 2: AdamW state (stage 2: also the gradients) partitioned over data parallelism.

Layout.  A rank's parameters (its TP x PP block of the model; every rank of one
DP group holds the same set) are laid end to end, in ``named_parameters``
order, in one flat buffer, and the parameters become views into it.  The
buffer is cut into ``dp`` equal chunks (the last one padded); DP rank ``r``
owns chunk ``r``: it alone keeps the Adam moments of those entries and updates
them, then the chunks are all-gathered back into the buffer, which writes
straight into every parameter.  A parameter that straddles a chunk boundary is
updated in pieces (fragments) on two ranks; the AdamW update is elementwise and
the per-entry step bookkeeping depends on counts only (optimizer.py), so

* stage 1 (gradients all-reduced as at stage 0) gives bit for bit the
  parameters and moments of stage 0;
* stage 2 reduce-scatters the gradients instead, so each rank keeps only its
  chunk of the step's gradient through loss-scale unscaling, clipping and the
  update.  The global norm is then summed in another order than at stage 0,
  which moves the clip coefficient in its last bits (tests/test_zero.py).

What stage 2 does not do (docs/parallel.md, "ZeRO"): gradients are full size
during the backward passes and reduced once per step after them (as Megatron's
distributed optimizer), not bucket by bucket during backward as DeepSpeed's
stage 2; that keeps one reduction per step under gradient accumulation and
the 1F1B pipeline, at the price of the full gradient's memory while it runs.

Low-precision parameters (``params_dtype`` bf16/fp16): the flat buffer (so the
parameters) is 16-bit and each rank keeps the fp32 master weights of its chunk
only, beside the chunk's moments: 2 bytes per parameter on every rank plus 12
per parameter over the DP group (Megatron's distributed optimizer), instead of
4 + 4 x 2 / dp.  The update runs on the master chunk, which is rounded into the
buffer's chunk before the (now 16-bit) all-gather; gradients are fp32
(parallel/grads.py) and reduce-scattered in fp32.

Why not DeepSpeed's ZeRO optimizer: it owns the flat fp32 partitions from
engine construction on, MSG growth changes every tensor's shape (the partition
would be rebuilt and its state translated at each growth event), and its
state is not the per-entry-step AdamW the growth rule needs.  Here every
tensor's logical state (full Adam moments by name) is reassembled on demand,
tensor by tensor (:meth:`ZeroAdamW.block_state`), so checkpoints, growth and
resume on another layout or ZeRO stage are unchanged.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_msg.parallel.grads import accumulate_gradients_in_fp32, clear_gradients, counted_once, grad_of
from megatron_msg.parallel.topology import ParallelState
from megatron_msg.parallel.zero_layout import Fragment, partition  # noqa: F401 - partition: tests and tools
from megatron_msg.training.fused_adamw import FusedAdamWBatch
from megatron_msg.training.optimizer import adamw_update_, advance_step, offset_values, take_master_weights

# torch 2.13 renamed the flat-tensor collectives (the old names warn); older releases have only those.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class ZeroAdamW:
    """MSGAdamW's update with its state (and at stage 2 the gradients) partitioned over ``ps.dp_group``.

    Offers what the trainer and growth use of an optimizer: ``step``, ``zero_grad``,
    ``set_lr``, ``param_groups[0]["lr"]``, ``block_state`` and ``master_block`` (collective
    over DP), ``load_master`` and ``load_named_state``.  Count bookkeeping (``step``, offsets' ``max_offset``) is kept
    for every tensor on every rank, so only the tensors' values need moving.
    """

    def __init__(self, named_params, ps: ParallelState, stage: int, lr: float, betas=(0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, no_decay: set[str] | None = None,
                 params_dtype: torch.dtype = torch.float32, fused: bool = False):
        if stage not in (1, 2):
            raise ValueError(f"ZeroAdamW: stage must be 1 or 2, got {stage}")
        self.named = list(named_params)
        if not self.named:
            raise ValueError("ZeroAdamW: no parameters")
        dtypes = {p.dtype for _, p in self.named}
        if len(dtypes) > 1:
            raise ValueError(f"ZeroAdamW: parameters of several dtypes {sorted(map(str, dtypes))}; "
                             "the flat buffer needs one")
        self.ps, self.stage = ps, stage
        self.dp, self.dp_rank = ps.dp_size, ps.dp_rank
        self.betas, self.eps, self.fused = betas, eps, fused
        no_decay = no_decay or set()
        self.weight_decay = {n: (0.0 if n in no_decay else weight_decay) for n, _ in self.named}
        self.param_groups = [{"lr": lr}]
        self.params = dict(self.named)
        self.chunk, fragments = partition([(n, p.numel()) for n, p in self.named], self.dp)
        self.fragments: dict[str, list[Fragment]] = {}
        for f in fragments:
            self.fragments.setdefault(f.name, []).append(f)
        self.mine = {f.name: f for f in fragments if f.owner == self.dp_rank}
        # Low-precision parameters: my chunk's fp32 master is cut from the (fp32) parameters
        # before they become views into the 16-bit buffer (no fp32 copy of the whole buffer).
        # of the moments (and the master): fp32 with 16-bit parameters, else the parameters'
        self.state_dtype = torch.float32 if params_dtype != torch.float32 else dtypes.pop()
        self.master: torch.Tensor | None = None
        if params_dtype != torch.float32:
            take_master_weights(self.named, params_dtype)
            self.master = self._my_chunk_of_parameters()
            accumulate_gradients_in_fp32(self.params.values())
        self.flat = self._flatten_parameters(params_dtype if self.master is not None else self.state_dtype)
        # What my update of each fragment writes: its slice of the master, else of the flat buffer
        # (both fixed from here on: loads copy into them), cut once rather than every step.
        self._targets = {name: (self.flat[f.flat_start:f.flat_start + f.numel] if self.master is None
                                else self.master[self._my_slice(f)]) for name, f in self.mine.items()}
        # name -> {step, max_offset, step_offset}, on every rank; step_offset is only a flag here
        # (True while the tensor has per-entry offsets: advance_step clears it when they settle).
        self.counts: dict[str, dict] = {}
        self.moments: dict[str, dict] = {}  # name -> {exp_avg, exp_avg_sq, step_offset} of my fragment
        self.grad_chunk: torch.Tensor | None = None  # stage 2: my chunk of the step's gradient
        self.stepped: set[str] = set()  # stage 2: names that had a gradient this step

    def _flatten_parameters(self, dtype: torch.dtype) -> torch.Tensor:
        """One ``dtype`` buffer holding every parameter; the parameters become views into it."""
        first = self.named[0][1]
        flat = torch.zeros(self.chunk * self.dp, dtype=dtype, device=first.device)
        offset = 0
        with torch.no_grad():
            for _, p in self.named:
                n = p.numel()
                view = flat[offset:offset + n].view_as(p)
                view.copy_(p)
                p.data = view
                offset += n
        return flat

    @torch.no_grad()
    def _my_chunk_of_parameters(self) -> torch.Tensor:
        """My chunk of the flat layout, copied (in fp32) from the parameters as they are now."""
        first = self.named[0][1]
        chunk = torch.zeros(self.chunk, dtype=self.state_dtype, device=first.device)
        for name, f in self.mine.items():
            chunk[self._my_slice(f)].copy_(self.params[name].reshape(-1)[f.start:f.end])
        return chunk

    @property
    def keeps_master_weights(self) -> bool:
        return self.master is not None

    def _my_slice(self, f: Fragment) -> slice:
        """Where fragment ``f`` (one of mine) sits in my chunk."""
        start = f.flat_start - self.dp_rank * self.chunk
        return slice(start, start + f.numel)

    # ------------------------------------------------------------------ step

    def set_lr(self, lr: float) -> None:
        self.param_groups[0]["lr"] = lr

    def zero_grad(self, set_to_none: bool = True) -> None:
        clear_gradients(self.params.values())
        self.grad_chunk = None

    def _chunk_range(self) -> slice:
        return slice(self.dp_rank * self.chunk, (self.dp_rank + 1) * self.chunk)

    @torch.no_grad()
    def reduce_scatter_gradients(self) -> None:
        """Stage 2: sum the gradients over DP, keep my chunk, free the full gradients."""
        grads = torch.zeros(self.flat.numel(), dtype=self.state_dtype, device=self.flat.device)
        offset, self.stepped = 0, set()
        for name, p in self.named:
            n = p.numel()
            if (g := grad_of(p)) is not None:
                grads[offset:offset + n].copy_(g.reshape(-1))
                self.stepped.add(name)
            clear_gradients([p])
            offset += n
        self.grad_chunk = torch.empty(self.chunk, dtype=grads.dtype, device=grads.device)
        if self.dp > 1:
            _reduce_scatter_flat(self.grad_chunk, grads, group=self.ps.dp_group)
        else:
            self.grad_chunk.copy_(grads)

    def _my_gradient(self, name: str) -> torch.Tensor | None:
        f = self.mine[name]
        if self.stage == 2:
            if name not in self.stepped:
                return None
            return self.grad_chunk[self._my_slice(f)]
        g = grad_of(self.params[name])
        return None if g is None else g.reshape(-1)[f.start:f.end]

    @torch.no_grad()
    def unscale_(self, inv_scale: float) -> None:
        """Stage 2: divide my gradient chunk by the loss scale."""
        self.grad_chunk.mul_(inv_scale)

    @torch.no_grad()
    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Stage 2: the global gradient norm from every rank's chunk; clips my chunk to ``max_norm``."""
        sq = torch.zeros((), dtype=torch.float32, device=self.flat.device)
        for name in self.mine:
            g = self._my_gradient(name)
            if g is not None and counted_once(name, self.ps):
                sq += g.float().pow(2).sum()
        ps = self.ps
        if ps.dp_size > 1:
            dist.all_reduce(sq, group=ps.dp_group)
        if ps.tp_size * ps.pp_size > 1:
            dist.all_reduce(sq, group=ps.mp_group)
        norm = sq.sqrt()
        if max_norm > 0 and max_norm != float("inf"):
            self.grad_chunk.mul_((max_norm / (norm + 1e-6)).clamp(max=1.0).to(self.grad_chunk.dtype))
        return norm

    @torch.no_grad()
    def step(self) -> None:
        """Update my fragments, then all-gather every rank's chunk into the parameters."""
        lr = self.param_groups[0]["lr"]
        had_gradient = (self.stepped if self.stage == 2 else
                        {n for n, p in self.named if grad_of(p) is not None})
        for name in had_gradient:  # counts move on every rank, for every tensor
            counts = self.counts.setdefault(name, dict(step=0, max_offset=0, step_offset=None))
            advance_step(counts, self.betas)
        batches: dict[float, FusedAdamWBatch] = {}  # weight decay -> the fragments of one fused call
        for name in self.mine:
            g = self._my_gradient(name)
            if g is None:
                continue
            m = self.moments.get(name)
            if m is None:
                m = self.moments[name] = dict(exp_avg=torch.zeros_like(g), exp_avg_sq=torch.zeros_like(g),
                                              step_offset=None)
            counts = self.counts[name]
            if counts["step_offset"] is None:
                m["step_offset"] = None  # settled: dropped on every rank at once
            p = self._targets[name]
            wd = self.weight_decay[name]
            if self.fused and m["step_offset"] is None:
                batches.setdefault(wd, FusedAdamWBatch()).add(p, g, m["exp_avg"], m["exp_avg_sq"], counts["step"])
            else:
                adamw_update_(p, g, m["exp_avg"], m["exp_avg_sq"], counts["step"], m["step_offset"], lr,
                              self.betas, self.eps, wd, m.get("offset_values", ()))
        for wd, batch in batches.items():
            batch.run(lr, self.betas, self.eps, wd)
        if self.master is not None:
            self.flat[self._chunk_range()].copy_(self.master)  # round the updated master into the buffer
        if self.dp > 1:
            mine = self.flat[self._chunk_range()].clone()
            _all_gather_flat(self.flat, mine, group=self.ps.dp_group)

    # ------------------------------------------------------------------ logical (named) state

    def block_state(self, name: str) -> dict | None:
        """This rank's whole block of ``name``'s AdamW state (collective over the DP group).

        Every rank of the DP group must call it for the same names in the same order.
        Returns None (on every rank) for a tensor that has no state yet.
        """
        counts = self.counts.get(name)
        if counts is None:
            return None
        has_offset = counts["step_offset"] is not None
        keys = ("exp_avg", "exp_avg_sq") + (("step_offset",) if has_offset else ())
        mine = self.moments.get(name) if name in self.mine else None
        out = {"step": counts["step"], "max_offset": counts["max_offset"], "step_offset": None}
        for key in keys:
            dtype = torch.float32 if key == "step_offset" else self.state_dtype
            out[key] = self._assemble(name, dtype, lambda f: mine[key])
        return out

    def _assemble(self, name: str, dtype: torch.dtype, my_piece) -> torch.Tensor:
        """Parameter ``name``'s whole block from every owner's fragment (``my_piece(f)`` for mine)."""
        p = self.params[name]
        full = torch.zeros(p.numel(), dtype=dtype, device=p.device)
        for f in self.fragments[name]:
            piece = full[f.start:f.end]
            if f.owner == self.dp_rank:
                piece.copy_(my_piece(f))
            if self.dp > 1:
                src = self.ps.topology.rank_of(self.ps.tp_rank, self.ps.pp_rank, f.owner)
                dist.broadcast(piece, src=src, group=self.ps.dp_group)
        return full.view_as(p)

    def master_block(self, name: str) -> torch.Tensor | None:
        """This rank's whole fp32 master block of ``name`` (collective over DP; None without masters)."""
        if self.master is None:
            return None
        return self._assemble(name, self.state_dtype, lambda f: self.master[self._my_slice(f)])

    @torch.no_grad()
    def load_master(self, name: str, block: torch.Tensor) -> None:
        """Take my fragment of this rank's block of ``name``'s logical value as its master."""
        f = self.mine.get(name)
        if f is not None:
            self.master[self._my_slice(f)].copy_(block.reshape(-1)[f.start:f.end])

    def named_state(self) -> dict[str, dict]:
        """Every tensor's block state (collective over the DP group)."""
        return {n: st for n, _ in self.named if (st := self.block_state(n)) is not None}

    def load_named_state(self, named: dict[str, dict]) -> None:
        """Take my fragments of the blocks in ``named`` (a piece of the state is fine, as in growth)."""
        unknown = sorted(set(named) - set(self.params))
        if unknown:
            raise KeyError(f"optimizer state for unknown parameters: {unknown[:5]}")
        for name, st in named.items():
            p = self.params[name]
            for key in ("exp_avg", "exp_avg_sq"):
                if st[key].shape != p.shape:
                    raise ValueError(f"optimizer state {name}.{key} has shape {tuple(st[key].shape)}, "
                                     f"parameter has {tuple(p.shape)}")
            f = self.mine.get(name)
            self._set_state(name, st, lambda t: t.reshape(-1)[f.start:f.end])

    def _set_state(self, name: str, st: dict, my_piece) -> None:
        """Counts of ``st`` (every rank), and ``my_piece(tensor)`` of its tensors as my fragment's moments."""
        p, offset = self.params[name], st.get("step_offset")
        self.counts[name] = dict(step=int(st["step"]), max_offset=int(st.get("max_offset", 0)),
                                 step_offset=None if offset is None else True)
        if name not in self.mine:
            return
        cut = lambda t, dtype: my_piece(t).to(p.device, dtype).clone()  # noqa: E731
        offsets = None if offset is None else cut(offset, torch.float32)
        self.moments[name] = dict(exp_avg=cut(st["exp_avg"], self.state_dtype),
                                  exp_avg_sq=cut(st["exp_avg_sq"], self.state_dtype),
                                  step_offset=offsets, offset_values=() if offsets is None else offset_values(offsets))

    # ------------------------------------------------------------------ pieces (sharded checkpoints)

    def held_range(self, name: str) -> tuple[int, int]:
        """The entries ``[start, end)`` of ``name``'s block whose AdamW state (and master) this rank keeps."""
        f = self.mine.get(name)
        return (f.start, f.end) if f is not None else (0, 0)

    def state_piece(self, name: str) -> tuple[dict, dict[str, torch.Tensor]] | None:
        """(counts, {key: flat tensor over held_range}) of ``name``'s AdamW state, no communication.

        The counts (``step``, ``max_offset``, ``keys``) are known on every rank; the tensors
        are my fragment's (empty dict on a rank that keeps none of ``name``).  None before
        the tensor's first step.
        """
        counts = self.counts.get(name)
        if counts is None:
            return None
        keys = ["exp_avg", "exp_avg_sq"] + (["step_offset"] if counts["step_offset"] is not None else [])
        mine = self.moments.get(name) if name in self.mine else None
        tensors = {} if mine is None else {k: mine[k] for k in keys}
        return {"step": counts["step"], "max_offset": counts["max_offset"], "keys": keys}, tensors

    def master_piece(self, name: str) -> torch.Tensor | None:
        """My fragment of ``name``'s fp32 master (over held_range); None without master weights."""
        if self.master is None:
            return None
        f = self.mine.get(name)
        return self.master[self._my_slice(f)] if f is not None else self.master[:0]

    def load_state_piece(self, name: str, counts: dict, tensors: dict[str, torch.Tensor]) -> None:
        """Set ``name``'s counts and my fragment's moments (``tensors``: flat, over held_range)."""
        st = {"step": counts["step"], "max_offset": counts["max_offset"], "step_offset": tensors.get("step_offset"),
              "exp_avg": tensors.get("exp_avg"), "exp_avg_sq": tensors.get("exp_avg_sq")}
        if "step_offset" in counts["keys"] and st["step_offset"] is None:
            st["step_offset"] = True  # a flag on ranks that keep no entries of the tensor
        self._set_state(name, st, lambda t: t)

    def local_numel(self) -> int:
        """Entries whose Adam moments this rank keeps (about 1/dp of its parameters)."""
        return sum(f.numel for f in self.mine.values())
