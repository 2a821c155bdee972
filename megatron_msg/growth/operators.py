"""Growth operators as pure functions over named tensors (the logical state).

``plan_growth`` turns an old and a new shape plus the operator options into a
:class:`GrowthPlan`: for each growable unit dimension (hidden, ffn, heads) where
every old unit lands and which old unit each new position copies, and for depth
which old layer (or none) each new layer comes from.  ``grow_tensors`` then
applies the plan to one named tensor at a time, so a checkpoint can be grown
parameter by parameter without ever holding the whole model twice; the
per-layer pieces (``grow_layer_width``, ``grow_layer``) let live growth stream
one logical layer at a time.

Operators (DESIGN.md "Baselines are first-class operators"):

* ``msg``     new units get ``init`` values and masks start at 0 (exact);
* ``nomask``  same new weights as msg, masks at 1 at once (not exact);
* ``net2net`` bert2BERT: new units copy random old units; a layer's input columns
              that read copied units are divided by the copy count; new layers
              are interleaved copies of their predecessor; no masks.  Exact for
              FFN and heads, not for hidden (LayerNorm statistics change, paper
              section 2.3.1) nor depth;
* ``stack``   G_stack: the whole stack is copied on top; no masks.

Layout rule.  Old units keep their order and new units are appended.  With
``parts[dim] = p`` the dimension is viewed as ``p`` equal contiguous blocks (one
per tensor-parallel rank) and each block appends its own share of new units, so
every rank keeps an equal, contiguous share and grows locally.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import torch

from megatron_msg.config import Shape
from megatron_msg.model.init import initial_tensor
from megatron_msg.model.layout import IN, Axis, layer_name, split_layer_name, tensor_spec

UNIT_DIMS = ("hidden", "ffn", "heads")


@dataclass(frozen=True)
class GrowthSpec:
    """Everything a growth event needs, and nothing about ranks or modules."""

    old: Shape
    new: Shape
    head_dim: int
    operator: str = "msg"
    init: str = "normal"
    init_std: float = 0.02
    depth_placement: str = "top"
    depth_init: str = "random"
    seed: int = 0
    event: int = 0
    # Equal contiguous blocks per unit dimension (tensor-parallel layout rule).
    parts: dict = field(default_factory=dict)

    @property
    def uses_masks(self) -> bool:
        return self.operator == "msg"

    @property
    def copies_units(self) -> bool:
        return self.operator == "net2net" or self.init == "copy"

    @property
    def effective_depth(self) -> tuple[str, str]:
        """(placement, init) for new layers after the operator's own rules."""
        if self.operator == "net2net":
            return "interleave", "copy"  # bert2BERT depth: interpolated copies
        if self.operator == "stack":
            return "top", "copy"  # G_stack
        return self.depth_placement, self.depth_init


@dataclass
class UnitPlan:
    """How one unit dimension (hidden, ffn or heads) grows."""

    old_units: int
    new_units: int
    old_pos: torch.Tensor  # [old_units] new index of each old unit
    src: torch.Tensor  # [new_units] old unit each position reads (identity for old units)
    is_new: torch.Tensor  # [new_units] bool
    count: torch.Tensor  # [old_units] positions reading each old unit (net2net split)


@dataclass
class LayerSource:
    new: bool
    src: int  # old layer index this layer is (or copies / takes masks from)


@dataclass
class GrowthPlan:
    spec: GrowthSpec
    units: dict[str, UnitPlan]
    layers: list[LayerSource]


def _generator(seed: int, event: int, key: str) -> torch.Generator:
    """Deterministic per-(run seed, growth event, tensor/axis) RNG: growth is a pure function."""
    g = torch.Generator()
    g.manual_seed(zlib.crc32(f"{seed}/{event}/{key}".encode()))
    return g


def _plan_units(spec: GrowthSpec, dim: str) -> UnitPlan:
    old, new = getattr(spec.old, dim), getattr(spec.new, dim)
    p = int(spec.parts.get(dim, 1))
    if old % p or new % p:
        raise ValueError(f"{dim}: {old} -> {new} is not divisible into {p} equal parts "
                         f"(tensor-parallel layout rule: every rank keeps an equal share)")
    o, n = old // p, new // p
    g = _generator(spec.seed, spec.event, f"units/{dim}")
    src, is_new, old_pos = [], [], []
    for q in range(p):
        base_old = q * o
        old_pos.extend(range(q * n, q * n + o))
        src.extend(range(base_old, base_old + o))
        is_new.extend([False] * o)
        if n > o:
            # New units of block q copy (when copying) units of the same block: local to a rank.
            picks = torch.randint(0, o, (n - o,), generator=g) + base_old
            src.extend(picks.tolist())
            is_new.extend([True] * (n - o))
    src_t = torch.tensor(src, dtype=torch.long)
    return UnitPlan(old, new, torch.tensor(old_pos, dtype=torch.long), src_t,
                    torch.tensor(is_new, dtype=torch.bool), torch.bincount(src_t, minlength=old))


def _plan_layers(spec: GrowthSpec) -> list[LayerSource]:
    old, new = spec.old.layers, spec.new.layers
    extra = new - old
    placement, _ = spec.effective_depth
    if placement == "top":
        return [LayerSource(False, i) for i in range(old)] + \
               [LayerSource(True, j % old) for j in range(extra)]
    out = []
    for i in range(old):
        out.append(LayerSource(False, i))
        # Spread the new layers evenly: old layer i is followed by k_i copies.
        k = (i + 1) * extra // old - i * extra // old
        out.extend(LayerSource(True, i) for _ in range(k))
    return out


def plan_growth(spec: GrowthSpec) -> GrowthPlan:
    for dim in ("hidden", "ffn", "heads", "layers"):
        if getattr(spec.new, dim) < getattr(spec.old, dim):
            raise ValueError(f"{dim}: cannot shrink {getattr(spec.old, dim)} -> {getattr(spec.new, dim)}")
    units = {d: _plan_units(spec, d) for d in UNIT_DIMS}
    return GrowthPlan(spec, units, _plan_layers(spec))


# --------------------------------------------------------------------------- per-dimension indices

def _dim_indices(axis: Axis, plan: GrowthPlan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Expand the unit plan of ``axis`` to tensor-dimension indices.

    Returns (old_pos, src, is_new, count_of_src) over the dimension's elements.
    """
    spec = plan.spec
    up = plan.units[axis.unit_dim]
    pre, _, suf = axis.factors(spec.old, spec.head_dim)
    u_old, u_new = up.old_units, up.new_units
    a = torch.arange(pre).view(pre, 1, 1)
    s = torch.arange(suf).view(1, 1, suf)
    old_pos = (a * u_new * suf + up.old_pos.view(1, -1, 1) * suf + s).reshape(-1)
    src = (a * u_old * suf + up.src.view(1, -1, 1) * suf + s).reshape(-1)
    is_new = up.is_new.view(1, -1, 1).expand(pre, u_new, suf).reshape(-1)
    count = up.count[up.src].view(1, -1, 1).expand(pre, u_new, suf).reshape(-1)
    return old_pos, src, is_new, count


def _new_shape(name: str, old: torch.Tensor, plan: GrowthPlan) -> tuple[int, ...]:
    spec = tensor_spec(name)
    shape = []
    for d, axis in enumerate(spec.axes):
        if axis is None:
            shape.append(old.shape[d])
        else:
            pre, units, suf = axis.factors(plan.spec.new, plan.spec.head_dim)
            shape.append(pre * units * suf)
    return tuple(shape)


def _fresh(name: str, shape: tuple[int, ...], plan: GrowthPlan, init: str, dtype, key: str) -> torch.Tensor:
    """Values for new entries: the tensor's from-scratch initialiser, or zeros."""
    spec = tensor_spec(name)
    if spec.is_mask:
        # Masks ramp from 0 under MSG; every other operator has no masks (all 1).
        return torch.full(shape, 0.0 if plan.spec.uses_masks else 1.0, dtype=dtype)
    if init == "zeros":
        return torch.zeros(shape, dtype=dtype)
    g = _generator(plan.spec.seed, plan.spec.event, key)
    return initial_tensor(name, shape, plan.spec.init_std, plan.spec.seed, generator=g).to(dtype)


def new_entry_mask(name: str, new_shape: tuple[int, ...], plan: GrowthPlan) -> torch.Tensor:
    """Bool tensor of ``new_shape``: True where the entry did not exist before growth."""
    out = torch.zeros(new_shape, dtype=torch.bool)
    for d, axis in enumerate(tensor_spec(name).axes):
        if axis is None:
            continue
        _, _, is_new, _ = _dim_indices(axis, plan)
        view = [1] * len(new_shape)
        view[d] = -1
        out = out | is_new.view(view)
    return out


def _scatter_old(old: torch.Tensor, name: str, new_shape, plan: GrowthPlan, fill: torch.Tensor) -> torch.Tensor:
    """Place ``old`` at its new positions inside ``fill`` (a tensor of ``new_shape``)."""
    out = old
    for d, axis in enumerate(tensor_spec(name).axes):
        if axis is None:
            continue
        old_pos, _, _, _ = _dim_indices(axis, plan)
        shape = list(out.shape)
        shape[d] = new_shape[d]
        out = torch.zeros(shape, dtype=old.dtype).index_copy_(d, old_pos, out)
    return torch.where(new_entry_mask(name, tuple(new_shape), plan), fill, out)


def _gather_copies(old: torch.Tensor, name: str, plan: GrowthPlan, split_inputs: bool) -> torch.Tensor:
    """Every position reads its source unit; optionally divide input columns by the copy count."""
    out = old
    for d, axis in enumerate(tensor_spec(name).axes):
        if axis is None:
            continue
        _, src, _, count = _dim_indices(axis, plan)
        out = out.index_select(d, src)
        if split_inputs and axis.role == IN:
            view = [1] * out.dim()
            view[d] = -1
            out = out / count.to(out.dtype).view(view)
    return out


def grow_param(name: str, old: torch.Tensor, plan: GrowthPlan) -> torch.Tensor:
    """Grow one parameter or mask of an existing layer/global tensor (width only)."""
    old_cpu = old.detach().to("cpu")
    new_shape = _new_shape(name, old_cpu, plan)
    if new_shape == tuple(old_cpu.shape):
        return old.detach().clone()
    spec = tensor_spec(name)
    if spec.is_mask:
        fill = _fresh(name, new_shape, plan, "zeros", old_cpu.dtype, name)
        return _scatter_old(old_cpu, name, new_shape, plan, fill).to(old.device)
    if plan.spec.copies_units:
        # Copies (and, for net2net, splits); old entries are kept exactly except
        # for net2net's split input columns, which is the operator's definition.
        grown = _gather_copies(old_cpu, name, plan, split_inputs=plan.spec.operator == "net2net")
        if plan.spec.operator != "net2net":
            grown = _scatter_old(old_cpu, name, new_shape, plan, grown)
        return grown.to(old.device)
    fill = _fresh(name, new_shape, plan, plan.spec.init, old_cpu.dtype, f"width/{name}")
    return _scatter_old(old_cpu, name, new_shape, plan, fill).to(old.device)


def grow_moment(name: str, old: torch.Tensor, plan: GrowthPlan) -> torch.Tensor:
    """Optimizer moments: old entries move to their new positions, new entries are 0."""
    old_cpu = old.detach().to("cpu")
    new_shape = _new_shape(name, old_cpu, plan)
    if new_shape == tuple(old_cpu.shape):
        return old.detach().clone()
    zeros = torch.zeros(new_shape, dtype=old_cpu.dtype)
    return _scatter_old(old_cpu, name, new_shape, plan, zeros).to(old.device)


# --------------------------------------------------------------------------- streaming growth
#
# Growth decomposes into independent pieces, so a caller can stream it and hold
# one logical layer at a time (growth/apply.py):
#
# * a global (non-layer) tensor is only width-grown: ``grow_param`` / ``grow_moment``;
# * old layer ``i`` is width-grown tensor by tensor under its *old* name
#   (``grow_layer_width``), which fixes the RNG keys of its new entries;
# * new layer ``j`` is then built from the width-grown tensors of its source
#   layer ``plan.layers[j].src`` (``grow_layer`` / ``grow_layer_moments``).
#
# ``grow_tensors`` and ``grow_moments`` below are loops over these pieces.

def grow_layer_width(index: int, tensors: dict[str, torch.Tensor], plan: GrowthPlan,
                     grow_one=None) -> dict[str, torch.Tensor]:
    """Width-grow old layer ``index`` ({local name: tensor}); ``grow_one`` defaults to ``grow_param``."""
    grow_one = grow_one or grow_param
    return {local: grow_one(layer_name(index, local), t, plan) for local, t in tensors.items()}


def grow_layer(j: int, src: dict[str, torch.Tensor], plan: GrowthPlan) -> dict[str, torch.Tensor]:
    """Parameters and masks of new layer ``j`` (full names) from its width-grown source layer.

    ``src`` maps local names to the width-grown tensors of old layer
    ``plan.layers[j].src``.  An old layer is its source, renamed; a new layer is
    built at the new width, either from the from-scratch initialiser
    (``random``) or as a copy of its source (``copy``); it takes its source's
    FFN/head masks and, under MSG, a depth mask of 0.
    """
    ls = plan.layers[j]
    _, depth_init = plan.spec.effective_depth
    out: dict[str, torch.Tensor] = {}
    for local, t in src.items():
        name = layer_name(j, local)
        if not ls.new:
            out[name] = t
            continue
        spec = tensor_spec(name)
        if local == "depth_mask":
            value = 0.0 if plan.spec.uses_masks else 1.0
            out[name] = torch.full_like(t, value)
        elif spec.is_mask or depth_init == "copy":
            out[name] = t.clone()
        else:
            fresh = _fresh(name, tuple(t.shape), plan, "normal", t.dtype, f"depth/{name}")
            out[name] = fresh.to(t.device)
    return out


def grow_layer_moments(j: int, src: dict[str, torch.Tensor], plan: GrowthPlan) -> dict[str, torch.Tensor]:
    """One kind of optimizer moment of new layer ``j`` from its width-grown source; new layers start at 0."""
    new = plan.layers[j].new
    return {layer_name(j, local): torch.zeros_like(t) if new else t for local, t in src.items()}


# --------------------------------------------------------------------------- whole-state growth

def _grow_width(tensors: dict[str, torch.Tensor], plan: GrowthPlan, grow_one
                ) -> tuple[dict[str, torch.Tensor], dict[int, dict[str, torch.Tensor]]]:
    """Width-grow every tensor; returns (global tensors, layer index -> {local name: tensor})."""
    grown: dict[str, torch.Tensor] = {}
    per_layer: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        layer, local = split_layer_name(name)
        if layer is None:
            grown[name] = grow_one(name, t, plan)
        else:
            per_layer.setdefault(layer, {})[local] = t
    return grown, {i: grow_layer_width(i, ts, plan, grow_one) for i, ts in per_layer.items()}


def grow_tensors(state: dict[str, torch.Tensor], plan: GrowthPlan) -> dict[str, torch.Tensor]:
    """Grow every named parameter and mask; returns the new model's state dict.

    Width first, then depth (:func:`grow_layer`); the whole-state form of the
    streaming pieces above.
    """
    grown, per_layer = _grow_width(state, plan, grow_param)
    for j, ls in enumerate(plan.layers):
        grown.update(grow_layer(j, per_layer[ls.src], plan))
    return grown


def grow_moments(moments: dict[str, torch.Tensor], plan: GrowthPlan) -> dict[str, torch.Tensor]:
    """Grow one kind of optimizer moment keyed by parameter name; new layers start at 0."""
    grown, per_layer = _grow_width(moments, plan, grow_moment)
    for j, ls in enumerate(plan.layers):
        grown.update(grow_layer_moments(j, per_layer.get(ls.src, {}), plan))
    return grown
