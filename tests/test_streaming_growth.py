"""Live growth streams layer by layer and equals the whole-state composition bit for bit.

``grow_model`` gathers one global tensor, or one source layer, at a time, grows
it and keeps this rank's blocks (growth/apply.py).  These tests check it
against the whole-state composition ``grow_tensors(gather(state))`` +
``grow_optimizer_state``, on one process for every operator and under
TP2 x PP2 with new layers landing on the other pipeline stage, and that no
gather ever asks for more than one layer.
"""
from __future__ import annotations

import pytest
import torch

import megatron_msg.growth.apply as apply_mod
from megatron_msg.checkpoint.logical import gather_model, gather_optimizer, load_model, shard_optimizer_state
from megatron_msg.config import OptimizerConfig, Shape
from megatron_msg.growth.apply import grow_model as _grow_model
from megatron_msg.training.optimizer_factory import build_optimizer
from megatron_msg.growth.operators import GrowthSpec, grow_tensors, plan_growth
from megatron_msg.growth.optimizer_state import grow_optimizer_state
from megatron_msg.model import build_model
from megatron_msg.model.init import logical_shapes
from megatron_msg.model.layout import split_layer_name
from megatron_msg.model.placement import placement_for
from megatron_msg.parallel.topology import ParallelState, Topology
from megatron_msg.training.trainer import model_loss
from tests.dist_harness import run_distributed
from tests.helpers import make_batch, tiny_cfg

BASE = Shape(32, 64, 4, 2)
BIG = Shape(40, 96, 6, 5)  # every dimension grows; 2 -> 5 layers: copies of one source are adjacent
CASES = [  # (operator, init, depth_placement, depth_init)
    ("msg", "normal", "top", "random"),
    ("msg", "copy", "interleave", "copy"),
    ("msg", "zeros", "interleave", "random"),
    ("nomask", "normal", "top", "copy"),
    ("net2net", "normal", "top", "random"),  # net2net: interleaved copies whatever is asked
    ("stack", "normal", "interleave", "random"),  # stack: copies on top whatever is asked
]


def grow_model(model, spec, opt=None, ocfg=None, **kw):
    """grow_model with the optimizer the trainer would build for the grown model (plain AdamW)."""
    if opt is None:
        return _grow_model(model, spec, **kw)
    return _grow_model(model, spec, opt, new_optimizer=lambda m: build_optimizer(m, ocfg),
                       step_rule=ocfg.growth_step_rule, **kw)


def _trained(arch: str, shape: Shape, steps: int = 2, seed: int = 0):
    """A model and its AdamW after ``steps`` steps, so that moments exist."""
    model = build_model(tiny_cfg(arch, shape), seed=seed)
    ocfg = OptimizerConfig(lr=1e-3)
    opt = build_optimizer(model, ocfg)
    for s in range(steps):
        opt.zero_grad()
        model_loss(model, make_batch(arch, model.cfg, seed=s)).backward()
        opt.step()
    return model, opt, ocfg


def _whole_state_growth(model, opt, spec: GrowthSpec, rule: str):
    """The composition grow_model replaced: whole logical state, grown at once."""
    plan = plan_growth(spec)
    ps = ParallelState.single()
    return (grow_tensors(gather_model(model, ps), plan),
            grow_optimizer_state(gather_optimizer(opt, model, ps), plan, rule))


def _assert_same_state(params: dict, states: dict, ref_params: dict, ref_states: dict):
    assert set(params) == set(ref_params)
    for name, t in ref_params.items():
        assert torch.equal(params[name], t), name
    assert set(states) == set(ref_states)
    for name, st in ref_states.items():
        got = states[name]
        assert int(got["step"]) == int(st["step"]) and int(got["max_offset"]) == int(st["max_offset"]), name
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(got[key], st[key]), f"{name}.{key}"
        assert (got.get("step_offset") is None) == (st.get("step_offset") is None), name
        if st.get("step_offset") is not None:
            assert torch.equal(got["step_offset"], st["step_offset"]), f"{name}.step_offset"


def _spec(old: Shape, new: Shape, operator, init, placement, depth_init, event=1, seed=7) -> GrowthSpec:
    return GrowthSpec(old=old, new=new, head_dim=8, operator=operator, init=init,
                      depth_placement=placement, depth_init=depth_init, seed=seed, event=event)


@pytest.mark.parametrize("arch", ["gpt", "bert"])
@pytest.mark.parametrize("operator,init,placement,depth_init", CASES)
def test_streamed_growth_equals_whole_state_growth(arch, operator, init, placement, depth_init):
    model, opt, ocfg = _trained(arch, BASE)
    spec = _spec(BASE, BIG, operator, init, placement, depth_init)
    ref_params, ref_states = _whole_state_growth(model, opt, spec, ocfg.growth_step_rule)
    out = grow_model(model, spec, opt, ocfg)
    _assert_same_state(out.model.state_dict(), out.optimizer.named_state(), ref_params, ref_states)
    assert out.model.masked == spec.uses_masks and (out.ramp is not None) == spec.uses_masks


@pytest.mark.parametrize("rule", ["per_entry", "inherit", "reset"])
def test_streamed_growth_carries_step_offsets_like_whole_state_growth(rule):
    # Two events with steps in between: the second grows tensors that already have per-entry offsets.
    model, opt, ocfg = _trained("gpt", BASE)
    ocfg = OptimizerConfig(lr=1e-3, growth_step_rule=rule)
    mid = Shape(36, 80, 4, 3)
    first = grow_model(model, _spec(BASE, mid, "msg", "normal", "interleave", "copy", event=1), opt, ocfg)
    model, opt = first.model, first.optimizer
    model.set_masked(False)  # masks at 0 would stop gradients to new entries; any values do here
    for s in range(2):
        opt.zero_grad()
        model_loss(model, make_batch("gpt", model.cfg, seed=10 + s)).backward()
        opt.step()
    spec = _spec(mid, BIG, "msg", "copy", "top", "copy", event=2)
    ref_params, ref_states = _whole_state_growth(model, opt, spec, rule)
    if rule == "per_entry":
        assert any(st.get("step_offset") is not None for st in opt.named_state().values())
    out = grow_model(model, spec, opt, ocfg)
    _assert_same_state(out.model.state_dict(), out.optimizer.named_state(), ref_params, ref_states)


def test_growth_without_optimizer_streams_too():
    model = build_model(tiny_cfg("bert", BASE), seed=1)
    spec = _spec(BASE, BIG, "msg", "normal", "interleave", "random")
    ref = grow_tensors(model.state_dict(), plan_growth(spec))
    out = grow_model(model, spec)
    assert out.optimizer is None
    _assert_same_state(out.model.state_dict(), {}, ref, {})


def _recording(calls: list, fn):
    def wrapper(*args, **kw):
        out = fn(*args, **kw)
        calls.append((kw.get("names"), list(out)))
        return out
    return wrapper


def _assert_one_layer_per_gather(calls: list, cfg):
    """No gather asked for, nor returned, more than one global tensor or one layer's tensors."""
    shapes = logical_shapes(cfg)
    per_layer = sum(1 for n in shapes if split_layer_name(n)[0] == 0)
    assert calls
    for asked, got in calls:
        assert asked is not None, "a gather of the whole logical state"
        assert set(got) <= set(asked)
        layers = {split_layer_name(n)[0] for n in asked}
        assert len(layers) == 1, asked
        assert len(asked) == (1 if layers == {None} else per_layer), asked


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_no_gather_holds_more_than_one_layer(arch, monkeypatch):
    model, opt, ocfg = _trained(arch, BASE)
    params, states = [], []
    monkeypatch.setattr(apply_mod, "gather_model", _recording(params, apply_mod.gather_model))
    monkeypatch.setattr(apply_mod, "gather_optimizer", _recording(states, apply_mod.gather_optimizer))
    spec = _spec(BASE, BIG, "msg", "normal", "interleave", "copy")
    grow_model(model, spec, opt, ocfg)
    _assert_one_layer_per_gather(params, model.cfg)
    _assert_one_layer_per_gather(states, model.cfg)
    # Every logical tensor is gathered, each old layer once (interleave: copies are adjacent).
    shapes = logical_shapes(model.cfg)
    asked = [n for a, _ in params for n in a]
    assert sorted(asked) == sorted(shapes)
    # Top placement re-gathers a source for its copies, still one layer per call.
    params.clear(), states.clear()
    grow_model(model, _spec(BASE, BIG, "msg", "normal", "top", "copy"), opt, ocfg)
    _assert_one_layer_per_gather(params, model.cfg)
    layer_gathers = [split_layer_name(a[0])[0] for a, _ in params if split_layer_name(a[0])[0] is not None]
    assert layer_gathers == [0, 1, 0, 1, 0]  # sources of layers 0..4 (old, old, copies on top)


# --------------------------------------------------------------------------- TP2 x PP2

def _grow_sharded(rank, world, arch, placement, depth_init):
    ps = ParallelState.create(Topology(2, 2, 1), "cpu")
    ref, ref_opt, ocfg = _trained(arch, Shape(32, 64, 4, 2))  # every rank: the same whole model
    model = build_model(ref.cfg, placement_for(ps), initialize=False)
    load_model(model, ref.state_dict())
    opt = build_optimizer(model, ocfg)
    opt.load_named_state(shard_optimizer_state(ref_opt.named_state(), model))
    new = Shape(40, 96, 6, 6)  # 2 -> 6 layers on 2 stages: copies land on the other stage
    spec = GrowthSpec(old=ref.cfg.shape, new=new, head_dim=8, operator="msg", depth_placement=placement,
                      depth_init=depth_init, seed=3, event=1, parts={"ffn": 2, "heads": 2})
    ref_params, ref_states = _whole_state_growth(ref, ref_opt, spec, ocfg.growth_step_rule)
    calls = []
    orig = apply_mod.gather_model
    apply_mod.gather_model = _recording(calls, orig)
    try:
        out = grow_model(model, spec, opt, ocfg, ps=ps)
    finally:
        apply_mod.gather_model = orig
    _assert_one_layer_per_gather(calls, ref.cfg)
    params = gather_model(out.model, ps)
    states = gather_optimizer(out.optimizer, out.model, ps)
    _assert_same_state(params, states, ref_params, ref_states)
    return True


@pytest.mark.parametrize("arch,placement,depth_init", [("gpt", "top", "copy"), ("bert", "interleave", "random")])
def test_streamed_growth_under_tp2_pp2_equals_whole_state_growth(arch, placement, depth_init):
    assert run_distributed(_grow_sharded, 4, args=(arch, placement, depth_init)) == [True] * 4
