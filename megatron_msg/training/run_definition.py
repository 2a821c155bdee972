"""Is a config the run a checkpoint belongs to?  What a resume compares, field by field.

A resume continues the checkpoint's model whatever the config says, so a config that
describes another model (head size, activation, vocabulary, positions, tying...), other
growth stages than the ones already applied, or another tokenizer would train one model
and record another: ``msg-compare`` would then compare runs that are not what they claim.
Compared (every difference named; the trainer refuses the resume):

* every model field but the four growth dimensions (the shape is checked against the
  schedule separately);
* the growth stages already applied (step, shape, operator, init, phi, depth rules);
* a stage not yet applied whose step the checkpoint has passed (it would never apply);
* the tokenizer (kind and files), and the ``parallel.growth_layout_parts`` in effect at each
  stage still to come (where its new units go: 0 means the TP size, so a resume on another TP
  size sets it to the run's).

Not compared: the parallel layout (any layout resumes any checkpoint, bit for bit or within
float noise: docs/parallel.md), and the batch and LR schedule, which the trainer checks
against the checkpoint's recorded settings (``train_settings``).  Deliberate changes go
through ``msg-grow``, or are listed in ``train.resume_may_change`` (each entry a reported
name, e.g. ``model.dropout`` or ``growth.stages[2]``, which covers its fields too).
"""
from __future__ import annotations

import dataclasses

from megatron_msg.checkpoint.errors import CheckpointError
from megatron_msg.config import ConfigError, ModelConfig, ResolvedStage, RunConfig, config_from_dict

SHAPE_FIELDS = {"hidden", "ffn", "heads", "layers"}


class RunDefinitionError(CheckpointError):
    """The config is not the checkpoint's run (an older checkpoint of the run would not be either)."""
STAGE_FIELDS = ("at_step", "shape", "operator", "init", "init_std", "phi", "depth_placement", "depth_init")
TOKENIZER_FIELDS = ("tokenizer", "tokenizer_model", "merges_file")


def run_definition_differences(state: dict, cfg: RunConfig, stages: list[ResolvedStage]) -> list[str]:
    """``"name: checkpoint X, config Y"`` for each difference between the checkpoint's run and ``cfg``."""
    out: list[str] = []

    def differ(name: str, saved, mine) -> None:
        if saved != mine:
            out.append(f"{name}: checkpoint {saved!r}, config {mine!r}")

    saved_model = state["model_config"]
    for f in dataclasses.fields(ModelConfig):
        if f.name not in SHAPE_FIELDS and f.name in saved_model:
            differ(f"model.{f.name}", saved_model[f.name], getattr(cfg.model, f.name))
    step, applied = state["step"], state["stage_index"]
    saved_raw = state.get("config")
    saved = None
    if saved_raw is not None:  # written by a run that recorded its config (all since stages existed)
        try:
            saved = config_from_dict(saved_raw)
        except ConfigError as exc:  # written under other validation rules
            out.append(f"config: the checkpoint's recorded config does not validate today ({exc}), so its "
                       "stages and tokenizer cannot be compared")
    if saved is not None:
        saved_stages = saved.resolved_stages()
        for i in range(applied):
            if i >= len(stages):
                out.append(f"growth.stages[{i}]: applied by the checkpoint, absent from the config")
                continue
            for f in STAGE_FIELDS:
                differ(f"growth.stages[{i}].{f}", _plain(getattr(saved_stages[i], f)), _plain(getattr(stages[i], f)))
        for f in TOKENIZER_FIELDS:
            differ(f"data.{f}", getattr(saved.data, f), getattr(cfg.data, f))
        for i in range(applied, min(len(stages), len(saved_stages))):  # where the next growths put new units
            differ(f"parallel.growth_layout_parts (in effect at growth.stages[{i}])",
                   saved.parallel.layout_parts(saved_stages[i].layout[0]), cfg.parallel.layout_parts(stages[i].layout[0]))
    for stage in stages[applied:]:
        if stage.at_step is not None and stage.at_step < step:
            out.append(f"growth.stages[{stage.index}].at_step: {stage.at_step} is before the checkpoint's step "
                       f"{step}, so it would never be applied")
    allowed = tuple(cfg.train.resume_may_change)
    return [d for d in out if not _allowed(d.split(":", 1)[0], allowed)]


def _plain(value):
    return str(value) if dataclasses.is_dataclass(value) else value


def _allowed(name: str, allowed: tuple[str, ...]) -> bool:
    return any(name == a or name.startswith(a + ".") or name.startswith(a + "[") for a in allowed)
