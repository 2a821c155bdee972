"""growth.schedule: sch1 | sch0 (issue 19): the paper's schedules made from their targets and budgets."""
from __future__ import annotations

import pytest

from megatron_msg.config import ConfigError, config_from_dict, load_config, resolve_config_path
from megatron_msg.named_schedules import Dims, rapid, sch0, sch1


def _paper(name: str):
    cfg = load_config(resolve_config_path(f"paper/{name}"), check_files=False)
    return cfg.model.shape, [(s.at_step, s.shape) for s in cfg.resolved_stages()], cfg.train.steps


def _made(name: str, target_name: str, schedule: str):
    """The named schedule for the paper config's target and budget, as a RunConfig would make it."""
    target = load_config(resolve_config_path(f"paper/{target_name}"), check_files=False)
    raw = target.to_dict()
    raw["growth"] = {"schedule": schedule}
    raw["train"]["steps"] = load_config(resolve_config_path(f"paper/{name}"), check_files=False).train.steps
    cfg = config_from_dict(raw, check=False)
    return cfg.model.shape, [(s.at_step, s.shape) for s in cfg.resolved_stages()], cfg


def test_sch1_makes_sch1_g_exactly_from_gpt2s_shape_and_budget():
    start, stages, cfg = _made("gpt2_sch1", "gpt2_full", "sch1")
    paper_start, paper_stages, _ = _paper("gpt2_sch1")
    assert start == paper_start and stages == paper_stages
    assert {s.phi for s in cfg.resolved_stages()} == {5000}  # the paper's phi
    assert [s.rewind_lr for s in cfg.resolved_stages()] == [True, True, False, False, False]
    assert cfg.growth.generated_from.startswith("sch1 from (h=768, ffn=3072, heads=12, L=12)")


@pytest.mark.parametrize("name, full", [("bert_base_sch1", "bert_base_full"), ("bert_large_sch1", "bert_large_full")])
def test_sch1_makes_sch1_b_and_l_shapes_and_their_boundaries_to_one_significant_digit(name, full):
    start, stages, _ = _made(name, full, "sch1")
    paper_start, paper_stages, steps = _paper(name)
    assert start == paper_start and [s for _, s in stages] == [s for _, s in paper_stages]
    # The paper's 200k/400k/500k/600k/700k are the 5:5:3:3:3:5 boundaries rounded (docs/growth.md).
    assert [at for at, _ in stages] == [187_500, 375_000, 487_500, 600_000, 712_500]
    assert [float(f"{at:.0e}") for at, _ in stages] == [at for at, _ in paper_stages]


def test_sch0_makes_sch0_b_exactly():
    start, stages, _ = _made("bert_base_sch0", "bert_base_full", "sch0")
    paper_start, paper_stages, _ = _paper("bert_base_sch0")
    assert start == paper_start and stages == paper_stages


def test_rapid_makes_rapid_l_exactly_with_its_phi_and_rewinds():
    start, stages, cfg = _made("bert_large_rapid", "bert_large_full", "rapid")
    paper_start, paper_stages, _ = _paper("bert_large_rapid")
    assert start == paper_start and stages == paper_stages
    assert {s.phi for s in cfg.resolved_stages()} == {5000}  # 1/4 of its shortest stage, 20k
    assert [s.rewind_lr for s in cfg.resolved_stages()] == [True, True, False, False]


def test_rapid_on_a_small_target_grows_depth_last_and_all_at_once():
    made = rapid(Dims(128, 512, 4, 8), 3000, head_dim=32)
    assert made.start == Dims(64, 128, 2, 2)
    assert [(s.at_step, s.dims) for s in made.stages] == [
        (1500, Dims(64, 512, 2, 2)), (1575, Dims(128, 512, 2, 2)), (1650, Dims(128, 512, 4, 2)),
        (1875, Dims(128, 512, 4, 8))]
    assert made.phi == 75 // 4


def test_small_targets_keep_one_dimension_per_stage_and_skip_what_cannot_grow():
    made = sch1(Dims(128, 512, 4, 8), 1500, head_dim=32)
    assert made.start == Dims(96, 128, 3, 2)  # 2/3 of 128 is no multiple of 128 or 64 below 128: of 32
    shapes = [made.start] + [s.dims for s in made.stages]
    for a, b in zip(shapes, shapes[1:]):
        assert sum(x != y for x, y in zip(vars(a).values(), vars(b).values())) == 1
    assert shapes[-1] == Dims(128, 512, 4, 8) and made.phi == (1500 * 3 // 24) // 6
    tiny = sch1(Dims(32, 64, 2, 1), 240, head_dim=16)  # one layer: no depth stages
    assert [s.dims.layers for s in tiny.stages] == [1] * len(tiny.stages) and len(tiny.stages) == 3
    flat = sch0(Dims(64, 256, 4, 4), 900, head_dim=16)
    assert [s.dims.layers for s in flat.stages] == [2, 3, 4, 4] and flat.stages[-1].dims.ffn == 256


def test_named_schedule_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"^growth.schedule: 'sch9' is not one of sch1, sch0, rapid$"):
        load_config(None, ["growth.schedule=sch9", "train.steps=100"])
    with pytest.raises(ConfigError, match=r"^growth.schedule: .*give growth.schedule or growth.stages, not both"):
        load_config(None, ["growth.schedule=sch1", "growth.stages=[{at_step: 5, ffn: 512}]", "train.steps=100"])
    with pytest.raises(ConfigError, match=r"^train.steps: growth.schedule needs >= 24 steps"):
        load_config(None, ["growth.schedule=sch1", "train.steps=20", "lr.warmup_steps=2"])


def test_a_made_schedule_round_trips_through_the_recorded_config():
    cfg = load_config(None, ["growth.schedule=sch1", "model.hidden=96", "model.ffn=256", "model.heads=6",
                             "model.layers=8", "model.head_dim=16", "train.steps=480", "lr.warmup_steps=10"])
    again = config_from_dict(cfg.to_dict())
    assert again.model == cfg.model and again.resolved_stages() == cfg.resolved_stages()
    assert again.growth.schedule is None and again.growth.generated_from == cfg.growth.generated_from
