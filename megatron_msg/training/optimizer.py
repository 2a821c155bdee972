"""AdamW whose bias correction can differ between entries of one tensor.

After a growth a parameter may mix old entries (with ``t`` updates behind them)
and entries created at the growth (with none).  Standard Adam keeps one step
count per tensor, which forces a choice (docs/growth.md):

* ``per_entry`` (default): each entry keeps its own count, i.e. new entries get
  a textbook first Adam step and old entries continue undisturbed;
* ``inherit``: new entries take the old count (the official MSG code and most
  growth work): bias correction is ~1 for them, so their first update is
  ``(1 - beta1) / sqrt(1 - beta2)`` times a normal first step (3.16x for
  beta2 = 0.999, 0.45x for beta2 = 0.95);
* ``reset``: the whole tensor restarts at 0, re-inflating old entries' updates.

Per-entry counts are stored as ``step`` (the count of the tensor's oldest
entries, a Python int: no host sync) plus an optional float tensor
``step_offset`` (how many steps later each entry was born).  Once the youngest
entries' bias corrections round to 1.0 in fp32 the offsets no longer change any
result and are dropped.

Offsets take one value per growth event, so the per-entry bias corrections are
filled in per distinct value (``offset_values``, found once when the state is
loaded) from Python-computed constants rather than by an elementwise
``torch.pow``: the result of an entry then never depends on where it sits in
the tensor (vectorised and scalar ``pow`` differ in the last bit, and ZeRO
updates tensors in pieces), and it costs a few selects instead of two pows.
"""
from __future__ import annotations

import math

import torch

from megatron_msg.parallel.grads import accumulate_gradients_in_fp32, clear_gradients, grad_of
from megatron_msg.training.fused_adamw import FusedAdamWBatch


def _bias_corrections_settled(beta1: float, beta2: float, steps: int) -> bool:
    f32 = lambda v: torch.tensor(v, dtype=torch.float32).item()  # noqa: E731
    return f32(1 - beta1 ** steps) == 1.0 and f32(1 - beta2 ** steps) == 1.0


def advance_step(st: dict, betas: tuple[float, float]) -> None:
    """Count one step in ``st`` and drop its per-entry offsets once they change no result.

    Depends only on the counts, never on tensor values, so every rank holding a piece
    of one tensor (ZeRO, training/zero.py) takes the same decision.
    """
    st["step"] += 1
    if st["step_offset"] is not None and _bias_corrections_settled(*betas, st["step"] - st["max_offset"]):
        st["step_offset"], st["max_offset"] = None, 0


def offset_values(step_offset: torch.Tensor) -> tuple[float, ...]:
    """The distinct per-entry offsets (one host sync: call when loading state, not per step)."""
    return tuple(torch.unique(step_offset).tolist())


def per_entry_bias_corrections(step: int, step_offset: torch.Tensor, values: tuple[float, ...],
                               betas: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(1 - beta1^t, 1 - beta2^t) per entry, t = step - offset, from one constant per offset value."""
    bc1, bc2 = torch.empty_like(step_offset), torch.empty_like(step_offset)
    b1, b2 = betas
    for value in values:
        born = step_offset == value
        bc1.masked_fill_(born, 1 - b1 ** (step - value))
        bc2.masked_fill_(born, 1 - b2 ** (step - value))
    return bc1, bc2


@torch.no_grad()
def adamw_update_(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: int,
                  step_offset: torch.Tensor | None, lr: float, betas: tuple[float, float], eps: float,
                  wd: float, values: tuple[float, ...] = ()) -> None:
    """One AdamW update of ``p`` and its moments, in place; ``step`` already counts this one.

    Purely elementwise, so applying it to matching slices of p, g, m, v and the offsets
    gives bit for bit the entries of a whole-tensor update (what ZeRO relies on).
    ``values``: :func:`offset_values` of ``step_offset`` (or of a superset of its entries).
    """
    b1, b2 = betas
    if wd:
        p.mul_(1 - lr * wd)
    m.lerp_(g, 1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    if step_offset is None:
        denom = (v.sqrt() / math.sqrt(1 - b2 ** step)).add_(eps)
        p.addcdiv_(m, denom, value=-lr / (1 - b1 ** step))
    else:
        bc1, bc2 = per_entry_bias_corrections(step, step_offset, values, betas)
        denom = (v.sqrt() / bc2.sqrt()).add_(eps)
        p.sub_(lr * (m / bc1) / denom)


def take_master_weights(named_params, params_dtype: torch.dtype) -> None:
    """Check the parameters the fp32 masters are taken from.

    fp32 parameters (a freshly initialised model) give exact masters; parameters already
    in ``params_dtype`` (a model built in 16 bits to be loaded, model/__init__.py) give
    placeholders that the load then overwrites (``load_model(..., optimizer=)``).
    """
    if params_dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"params_dtype must be float32, bfloat16 or float16, got {params_dtype}")
    for name, p in named_params:
        if p.dtype not in (torch.float32, params_dtype):
            raise ValueError(f"master weights are taken from fp32 (or {params_dtype}) parameters; "
                             f"{name} is {p.dtype}")


class MSGAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) over named parameters with per-entry step support.

    ``params_dtype`` bf16/fp16: the parameters are lowered to it and the optimizer keeps
    their fp32 master weights (module docstring).  ``fused``: tensors without per-entry
    offsets take one fused kernel call per parameter group (training/fused_adamw.py);
    the tensors that carry offsets always take :func:`adamw_update_`.
    """

    def __init__(self, named_params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, no_decay: set[str] | None = None,
                 params_dtype: torch.dtype = torch.float32, fused: bool = False):
        named_params = list(named_params)
        self.fused = fused
        no_decay = no_decay or set()
        decay = [p for n, p in named_params if n not in no_decay]
        plain = [p for n, p in named_params if n in no_decay]
        groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                              {"params": plain, "weight_decay": 0.0}) if g["params"]]
        super().__init__(groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.names = {p: n for n, p in named_params}
        self.by_name = dict(named_params)
        self.masters: dict[torch.Tensor, torch.Tensor] = {}
        if params_dtype != torch.float32:
            take_master_weights(named_params, params_dtype)
            with torch.no_grad():
                for _, p in named_params:
                    self.masters[p] = p.detach().to(torch.float32, copy=True)
                    p.data = p.data.to(params_dtype)
            accumulate_gradients_in_fp32(p for _, p in named_params)

    @property
    def keeps_master_weights(self) -> bool:
        return bool(self.masters)

    def zero_grad(self, set_to_none: bool = True) -> None:
        clear_gradients(self.by_name.values())

    def set_lr(self, lr: float) -> None:
        for g in self.param_groups:
            g["lr"] = lr

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, betas, eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            batch = FusedAdamWBatch() if self.fused else None
            lowered, masters = [], []  # parameters with an fp32 master, rounded from it after the update
            for p in group["params"]:
                g = grad_of(p)
                if g is None:
                    continue
                target = self.masters.get(p, p)  # the fp32 master, if the parameter has one
                st = self.state[p]
                if not st:
                    st.update(step=0, exp_avg=torch.zeros_like(target), exp_avg_sq=torch.zeros_like(target),
                              step_offset=None, max_offset=0)
                advance_step(st, betas)
                if batch is not None and st["step_offset"] is None:
                    batch.add(target, g, st["exp_avg"], st["exp_avg_sq"], st["step"])
                else:
                    adamw_update_(target, g, st["exp_avg"], st["exp_avg_sq"], st["step"], st["step_offset"],
                                  lr, betas, eps, wd, st.get("offset_values", ()))
                if target is not p:
                    lowered.append(p)
                    masters.append(target)
            if batch is not None:
                batch.run(lr, betas, eps, wd)
            if lowered:
                torch._foreach_copy_(lowered, masters)
        return None

    # ------------------------------------------------------------------ logical (named) state

    def named_state(self) -> dict[str, dict]:
        """Optimizer state keyed by parameter name (the logical form checkpoints store)."""
        out = {}
        for p, name in self.names.items():
            st = self.state.get(p)
            if st:
                out[name] = dict(st)
        return out

    def block_state(self, name: str) -> dict | None:
        """This rank's state of parameter ``name`` (None before its first step); see ZeroAdamW."""
        st = self.state.get(self.by_name[name])
        return dict(st) if st else None

    def master_block(self, name: str) -> torch.Tensor | None:
        """This rank's fp32 master of parameter ``name`` (None without master weights)."""
        return self.masters.get(self.by_name[name])

    @torch.no_grad()
    def load_master(self, name: str, block: torch.Tensor) -> None:
        """Set the master of ``name`` to this rank's block of its logical value."""
        self.masters[self.by_name[name]].copy_(block)

    def load_named_state(self, named: dict[str, dict]) -> None:
        by_name = self.by_name
        unknown = sorted(set(named) - set(by_name))
        if unknown:
            raise KeyError(f"optimizer state for unknown parameters: {unknown[:5]}")
        for name, st in named.items():
            p = by_name[name]
            for key in ("exp_avg", "exp_avg_sq"):
                if st[key].shape != p.shape:
                    raise ValueError(f"optimizer state {name}.{key} has shape {tuple(st[key].shape)}, "
                                     f"parameter has {tuple(p.shape)}")
            off = st.get("step_offset")
            dtype = self.masters.get(p, p).dtype  # the moments live in the master's precision
            self.state[p] = dict(step=int(st["step"]), exp_avg=st["exp_avg"].to(p.device, dtype),
                                 exp_avg_sq=st["exp_avg_sq"].to(p.device, dtype),
                                 step_offset=None if off is None else off.to(p.device),
                                 max_offset=int(st.get("max_offset", 0)),
                                 offset_values=() if off is None else offset_values(off))

    # ------------------------------------------------------------------ pieces (sharded checkpoints)
    # The same interface as ZeroAdamW's; here a rank keeps the whole block of each of its parameters.

    def held_range(self, name: str) -> tuple[int, int]:
        return 0, self.by_name[name].numel()

    def state_piece(self, name: str) -> tuple[dict, dict[str, torch.Tensor]] | None:
        """(counts, {key: flat tensor}) of ``name``'s AdamW state; None before its first step."""
        st = self.state.get(self.by_name[name])
        if not st:
            return None
        keys = ["exp_avg", "exp_avg_sq"] + (["step_offset"] if st["step_offset"] is not None else [])
        return ({"step": st["step"], "max_offset": st["max_offset"], "keys": keys},
                {k: st[k].reshape(-1) for k in keys})

    def master_piece(self, name: str) -> torch.Tensor | None:
        master = self.masters.get(self.by_name[name])
        return None if master is None else master.reshape(-1)

    def load_state_piece(self, name: str, counts: dict, tensors: dict[str, torch.Tensor]) -> None:
        shape = self.by_name[name].shape
        st = {"step": counts["step"], "max_offset": counts["max_offset"], "step_offset": None}
        st.update({k: t.view(shape) for k, t in tensors.items()})
        self.load_named_state({name: st})
