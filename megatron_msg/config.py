"""Typed run configuration: dataclasses, YAML loading, ``--set`` overrides, validation.

A run is described by one YAML file with the sections below; every field has a
default so a file only says what differs.  Loading is strict: an unknown key, a
wrong type or an impossible growth schedule raises :class:`ConfigError` whose
message starts with the dotted path of the offending field
(``growth.stages[2].hidden: ...``) before any model is built.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ARCHS = ("gpt", "bert")
ACTIVATIONS = ("gelu", "relu", "silu")
POSITION_EMBEDDINGS = ("learned", "rope")
# Growth operators (DESIGN.md "Baselines are first-class operators").
OPERATORS = ("msg", "nomask", "net2net", "stack")
# New-weight initialisation for width growth.
INITS = ("normal", "zeros", "copy")
DEPTH_PLACEMENTS = ("top", "interleave")
DEPTH_INITS = ("random", "copy")
# Adam step-count rule for tensors that mix old and new entries (docs/growth.md).
STEP_RULES = ("per_entry", "inherit", "reset")
LR_DECAYS = ("cosine", "linear", "constant")
# Activation recomputation (parallel/recompute.py).
RECOMPUTE_MODES = ("none", "full")


class ConfigError(ValueError):
    """A configuration problem; the message starts with the field's dotted path."""


@dataclass(frozen=True)
class Shape:
    """The four growable dimensions of a Transformer."""

    hidden: int
    ffn: int
    heads: int
    layers: int

    def grows_from(self, old: "Shape") -> list[str]:
        return [d for d in SHAPE_DIMS if getattr(self, d) > getattr(old, d)]

    def __str__(self) -> str:
        return f"(h={self.hidden}, ffn={self.ffn}, heads={self.heads}, L={self.layers})"


SHAPE_DIMS = ("hidden", "ffn", "heads", "layers")


@dataclass
class ModelConfig:
    arch: str = "gpt"
    # Initial shape (the first stage); growth stages give later shapes.
    hidden: int = 64
    ffn: int = 256
    heads: int = 4
    layers: int = 2
    # Head size is a constant of the model (DESIGN.md "Heads"): heads*head_dim may differ from hidden.
    head_dim: int = 16
    vocab_size: int = 261  # the byte tokenizer: 256 bytes + EOD, CLS, SEP, MASK, PAD
    seq_len: int = 128
    dropout: float = 0.0
    attention_dropout: float = 0.0
    eps: float = 1e-5
    activation: str = "gelu"
    # "learned": a [seq_len, hidden] table added to the token embedding (GPT-2, BERT);
    # "rope": rotary embeddings on each head's queries and keys (model/rotary.py), no table.
    position_embedding: str = "learned"
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    init_std: float = 0.02
    type_vocab_size: int = 2  # BERT token types

    @property
    def shape(self) -> Shape:
        return Shape(self.hidden, self.ffn, self.heads, self.layers)

    def with_shape(self, shape: Shape) -> "ModelConfig":
        return dataclasses.replace(self, hidden=shape.hidden, ffn=shape.ffn, heads=shape.heads,
                                   layers=shape.layers)


@dataclass
class OptimizerConfig:
    lr: float = 1e-3
    min_lr: float = 1e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    # How Adam's step count / bias correction treats entries created by growth.
    growth_step_rule: str = "per_entry"
    # The steady-state update (tensors without per-entry offsets) as one fused kernel call
    # (training/fused_adamw.py); false: the unfused update, bit-compatible with
    # torch.optim.AdamW(foreach=False) (e.g. DeepSpeed's torch_adam).
    fused: bool = True


@dataclass
class LRConfig:
    warmup_steps: int = 100
    decay: str = "cosine"
    # Steps over which the LR decays to min_lr; None means the whole run.
    decay_steps: int | None = None
    # Warm-up length after an LR rewind at a growth event (0: jump to the peak).
    rewind_warmup_steps: int = 0
    # Steps that rewind the LR without a growth (training/lr.py): a full-size control run given
    # the same rewinds as a growth schedule separates the operator from the LR schedule.
    rewind_at: list[int] = field(default_factory=list)
    # What a rewind (a growth stage's, or lr.rewind_at's) restarts at: this fraction of its
    # segment's peak (1.0: the paper's rewind to the peak; below 1: a partial rewind).
    rewind_peak: float = 1.0
    # A rewound segment decays to its floor over this fraction of the steps from its start to the
    # decay end, then stays there (1.0: the whole way, as the first segment does; below 1: the
    # faster decay after expansion LEMON recommends, Wang et al. 2023).
    rewind_decay: float = 1.0


@dataclass
class DataConfig:
    # jsonl: ``path`` is a jsonl file ("bundled" = the corpus in megatron_msg/assets/),
    # tokenized on the fly with the byte tokenizer.  indexed: ``path`` is a Megatron
    # .bin/.idx prefix written by msg-preprocess (GPT: build_gpt_datasets; BERT:
    # build_bert_datasets, best preprocessed with --split-sentences).
    format: str = "jsonl"
    path: str = "bundled"
    # indexed only: several corpora blended by weight, Megatron's flat form
    # [0.7, data/web_text_document, 0.3, data/books_text_document] (or prefixes alone: equal
    # weights).  Replaces ``path``.
    paths: list[str | float] | None = None
    text_key: str = "text"
    # byte | sentencepiece | huggingface | gpt2 (all but byte: indexed only).  The tokenizer
    # fixes the vocabulary (model.vocab_size must hold it) and the special ids; it must be the
    # one the data was preprocessed with.  Files are the user's: nothing is downloaded.
    tokenizer: str = "byte"
    # sentencepiece: the .model file; huggingface: a tokenizers ``tokenizer.json`` (BPE,
    # WordPiece or Unigram); gpt2: GPT-2's ``vocab.json`` (with ``merges_file``).
    tokenizer_model: str | None = None
    merges_file: str | None = None  # gpt2: GPT-2's merges.txt
    valid_fraction: float = 0.05  # jsonl: share of documents held out for validation
    splits: str = "969,30,1"  # indexed: train,valid,test weights
    seed: int = 1234


@dataclass
class GrowthStage:
    """One growth event: at ``at_step`` the model grows to the given shape.

    Dimensions left out keep the previous stage's value; options left out take
    ``growth.defaults``.  ``at_step: auto``: the trainer decides the step from the run's own
    measurements (growth.auto, growth/auto_timing.py).
    """

    at_step: int | str
    hidden: int | None = None
    ffn: int | None = None
    heads: int | None = None
    layers: int | None = None
    operator: str | None = None
    init: str | None = None
    init_std: float | None = None
    phi: int | None = None
    depth_placement: str | None = None
    depth_init: str | None = None
    rewind_lr: bool | None = None
    # Move the run to another TP x PP x DP layout at this growth (same number of processes;
    # FLM-101B: TP2/PP1/DP96 -> TP4/PP2/DP24).  Omitted: keep the previous stage's.
    tp: int | None = None
    pp: int | None = None
    dp: int | None = None
    # Training settings from this stage on (FLM-101B changes them at every growth); omitted:
    # the previous stage's.  Setting lr, min_lr or warmup_steps starts a new LR segment here
    # (a rewind: warm-up from 0 to the stage's peak, then decay to its min_lr by the run's
    # decay end; training/lr.py).  batch_size (micro-batch) x grad_accum is the global batch.
    lr: float | None = None
    min_lr: float | None = None
    warmup_steps: int | None = None
    batch_size: int | None = None
    grad_accum: int | None = None


@dataclass
class GrowthOptions:
    operator: str = "msg"
    init: str = "normal"
    init_std: float = 0.02
    # Mask ramp length in optimizer steps (paper: 5000; >= 500 shown stable).
    phi: int = 500
    depth_placement: str = "top"
    # copy: stacking completed by the depth mask (eq. 20), the paper's and its official code's choice.
    depth_init: str = "copy"
    rewind_lr: bool = False


AUTO = "auto"  # growth.stages[i].at_step: decided by the trainer
TIMINGS = ("fixed", AUTO)


@dataclass
class AutoTimingConfig:
    """Self-adaptive growth timing (``at_step: auto``; the rule: growth/auto_timing.py, docs/growth.md).

    Omitted values scale with ``train.steps``, so one setting serves any budget and corpus."""

    check_every: int | None = None  # steps between growth checks (default: train.steps // 12; docs/growth.md)
    probe_steps: int | None = None  # the lookahead a check trains the grown model for (default: check_every // 2)
    # Every stage still to come keeps this fraction of train.steps: stage k of n grows at the
    # latest at steps * (1 - (n - k) * reserve), whatever the measurements say.
    reserve: float = 0.125
    eval_iters: int | None = None   # validation batches per probe loss (default: train.eval_iters)
    # A lookahead that decides "grow" is kept, not rolled back: its steps become the run's, and the
    # stage's LR rewind (if any) comes at the lookahead's end instead of at the growth.  Off: every
    # lookahead is thrown away, and the run equals a fixed run at the steps it decided.
    adopt_lookahead: bool = True
    # The current shape's rate is compared where the lookahead measures the grown one: extrapolated
    # from the window before the check to the middle of the grown window (see include_ramp) along
    # a power law through the current shape's last two windows.  Off: the rate of the last window as
    # measured, which favours the current shape (loss curves decelerate) and so grows late.
    extrapolate: bool = True
    # A lookahead is cut short after its mask ramp and half its window when the grown rate over that
    # half is already below the current one: loss curves decelerate, so the whole window's rate
    # (the mean of its halves') would be lower still and the check would say "wait" anyway; only
    # lookaheads that say "wait" are thrown away, so this is compute the rule no longer spends on them.
    stop_early: bool = True
    # The grown rate is measured from the growth itself, through the mask ramp, to the window's end
    # (MSG starts the grown model at the current loss, so this window needs no settled start).  Off:
    # from the ramp's end only.  The ramp is where the new units are switched on and the loss falls
    # fastest; leaving it out measured the slower stretch after it, over half the steps, so with
    # probe noise of the weights most early-stopped lookaheads said "wait" (docs/growth.md).
    include_ramp: bool = True
    # No lookahead at a check nearer its stage's deadline than the grown steps a "wait" lookahead
    # throws away (the ramp and half the window with stop_early; the ramp and the window without):
    # a "wait" there changes nothing, the stage grows at its deadline anyway, and a "grow" moves
    # the growth earlier by no more steps than a "wait" throws away.  Off: every check on the
    # check_every grid runs, however near the deadline.
    skip_near_deadline: bool = True

    def every(self, steps: int) -> int:
        return self.check_every if self.check_every is not None else max(2, steps // 12)

    def probe(self, steps: int) -> int:
        every = self.every(steps)
        return min(every, self.probe_steps if self.probe_steps is not None else max(1, every // 2))

    def latest(self, steps: int, position: int, count: int) -> int:
        """The step the ``position``-th of ``count`` auto stages grows at if no check says so before."""
        return max(1, round(steps * (1 - (count - position) * self.reserve)))

    def first_check(self, settled: int, steps: int) -> int:
        """A stage's first check, given the step its current shape stopped changing."""
        return settled + self.every(steps)


@dataclass
class GrowthConfig:
    defaults: GrowthOptions = field(default_factory=GrowthOptions)
    stages: list[GrowthStage] = field(default_factory=list)
    # fixed: every stage at its at_step; auto: every stage of growth.schedule at a step the trainer
    # decides (hand-listed stages say at_step: auto one by one).
    timing: str = "fixed"
    auto: AutoTimingConfig = field(default_factory=AutoTimingConfig)
    # sch1 | sch0 | rapid: make the stages from the target shape (model.*) and train.steps by the MSG
    # paper's rules (named_schedules.py); model.* then becomes the start shape.  Expanded when
    # the config is built, so a run records (and resumes) the stages it made.
    schedule: str | None = None
    # What made the stages (set by the expansion: "sch1 from (h=..., ...) in N steps").
    generated_from: str | None = None


@dataclass
class ResolvedStage:
    """A growth stage with every option filled in: what the trainer executes."""

    index: int
    at_step: int | None  # None: at_step auto, not decided yet (the trainer decides it)
    shape: Shape
    operator: str
    init: str
    init_std: float
    phi: int
    depth_placement: str
    depth_init: str
    rewind_lr: bool  # an LR segment starts here (rewind_lr, or a stage lr/min_lr/warmup_steps)
    layout: tuple[int, int, int] = (1, 1, 1)  # (tp, pp, dp) from this stage on
    # Training settings from this stage on, inherited when the stage leaves them out.
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 0  # of the LR segment this stage starts (when rewind_lr)
    batch_size: int = 16
    grad_accum: int = 1
    auto: bool = False  # at_step: auto (decided or not)

    @property
    def uses_masks(self) -> bool:
        return self.operator == "msg"

    @property
    def ramp_steps(self) -> int:
        """Steps the new units' masks ramp over after this growth (phi; none without masks)."""
        return self.phi if self.uses_masks else 0

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step: micro-batch size x micro-batches (over all replicas)."""
        return self.batch_size * self.grad_accum


CHECKPOINT_FORMATS = ("sharded", "logical")


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    eval_interval: int = 100
    eval_iters: int = 4
    log_interval: int = 10
    save_interval: int = 200
    keep_checkpoints: int = 2
    # sharded: every rank writes its own pieces in parallel and a resume reads only what each
    # rank needs (checkpoint/sharded.py); logical: rank 0 gathers and writes one file per tensor
    # (checkpoint/io.py, DeepSpeed-universal-like).  Either resumes on any layout.
    checkpoint_format: str = "sharded"
    out_dir: str = "runs/default"
    seed: int = 1234
    device: str = "auto"
    dtype: str = "fp32"
    # Parameters' dtype: fp32 (autocast computes in `dtype` from fp32 weights), or `dtype` itself
    # (bf16/fp16 weights and activations; fp32 master weights, moments and gradient sums in the
    # optimizer, Megatron's --bf16: 2 bytes per parameter less on every rank, more under ZeRO).
    params_dtype: str = "fp32"
    # fp16 only: dynamic loss scaling (training/loss_scale.py; Megatron's names).  A step whose
    # gradients overflow is skipped and halves the scale; loss_scale_window clean steps double it.
    initial_loss_scale: float = 65536.0
    loss_scale_window: int = 1000
    min_loss_scale: float = 1.0
    compile: bool = False
    # Steps whose global gradient norm is inf/nan (without fp16 loss scaling, which skips those by
    # design) are skipped, up to this many over the run; the next one stops training with
    # TrainingDivergedError before anything is saved, so the last checkpoint stays a sound one.
    skip_nonfinite_steps: int = 0
    # Activation recomputation (parallel/recompute.py): "full" keeps only each layer's input and
    # redoes the layer's forward in backward.  recompute_layers: 0 = every layer of a pipeline
    # stage, N = the first N of each stage.  Memory only: losses are identical either way.
    recompute: str = "none"
    recompute_layers: int = 0
    # Training batches built this many steps ahead in a background thread (training/prefetch.py;
    # pinned memory on CUDA); 0 builds each in the step; None: 2 on CUDA, 0 on CPU (where the
    # thread shares the cores with the step: docs/benchmarks.md).  Batches are the same either way.
    prefetch: int | None = None
    # What a resume may find changed from the checkpoint's run (training/run_definition.py):
    # names as the refusal prints them, e.g. [model.dropout, "growth.stages[2]"].  Empty: nothing.
    resume_may_change: list[str] = field(default_factory=list)
    # Before any model is built, every stage still to run is estimated (the msg-plan memory model)
    # against this rank's free device memory (host memory on CPU) and refused when it cannot fit
    # (training/memory_check.py).  false: skip the check (the estimate is a model, not a measurement).
    memory_check: bool = True
    # Evaluate once before the first step (a valid record at step -1: no step run yet), so every
    # curve starts at the initial loss and msg-compare can interpolate from zero FLOPs.
    eval_at_start: bool = True
    # Threads of torch's CPU ops in this process; None: torch's default for one process, and the
    # host's cores divided among the ranks started on it for several (oversubscribed threads
    # spin: two 2-thread jobs on 2 cores ran ~15x slower than one thread each).
    threads: int | None = None
    tensorboard: bool = True
    plot: bool = True


@dataclass
class ParallelConfig:
    """Tensor x pipeline x data parallel layout; the launcher must start tp*pp*dp processes."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    # torch.distributed backend: auto = nccl on CUDA, gloo on CPU.
    backend: str = "auto"
    # Megatron sequence parallelism inside TP regions (LayerNorm/dropout on seq/tp tokens).
    sequence_parallel: bool = False
    # New ffn/head units are appended inside this many equal blocks (0: the TP size), so under
    # TP every rank grows its own block locally (docs/parallel.md, "Growth layout rule").
    # Set it to a TP run's size in a single-process run to reproduce that run exactly.
    growth_layout_parts: int = 0
    # ZeRO over the data-parallel group (training/zero.py): 0 off; 1 Adam state partitioned;
    # 2 Adam state and gradients partitioned.  Checkpoints do not depend on it.
    zero_stage: int = 0
    # Seconds a collective waits for the other ranks before it fails: a hung or dead rank becomes
    # an error on every other rank within this time (msg-train exit code 4), not a silent stall.
    # It must exceed the longest legitimate wait: a checkpoint save or a growth on rank 0.
    timeout_s: float = 1800.0
    # Data-parallel gradient all-reduce in buckets of about bucket_mb, launched during backward as
    # each bucket's gradients are final (parallel/grad_buckets.py); off: one all-reduce after it.
    # ZeRO-2 keeps its reduce-scatter after backward either way.
    overlap_grad_reduce: bool = True
    bucket_mb: float = 25.0
    # Model chunks per pipeline stage: > 1 runs Megatron's interleaved 1F1B (parallel/schedule.py),
    # bubble about (pp - 1) / (virtual_stages * micro-batches) instead of (pp - 1) / micro-batches,
    # for a little more activation memory and v times the p2p transfers. Needs every stage's layers
    # divisible by pp * virtual_stages and its micro-batches per replica by pp; no effect at pp = 1.
    virtual_stages: int = 1

    def layout_parts(self, tp: int | None = None) -> int:
        """Blocks for a growth into a layout with ``tp`` (default: this section's tp)."""
        return self.growth_layout_parts or (tp or self.tp)

    @property
    def layout(self) -> tuple[int, int, int]:
        return (self.tp, self.pp, self.dp)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr: LRConfig = field(default_factory=LRConfig)
    data: DataConfig = field(default_factory=DataConfig)
    growth: GrowthConfig = field(default_factory=GrowthConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def resolved_stages(self, decided: dict[int, int] | None = None) -> list[ResolvedStage]:
        return resolve_stages(self, decided)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- loading

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Convert a YAML value to the annotated type, or raise ConfigError naming ``path``."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], path)
        for option in inner:  # e.g. ``str | float``: the first type the value really is
            try:
                return _coerce(value, option, path)
            except ConfigError:
                continue
        raise ConfigError(f"{path}: expected {' or '.join(_type_name(a) for a in inner)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        if isinstance(value, str):  # YAML reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{path}: expected a number, got {value!r}") from None
        if not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported type {_type_name(tp)}")  # pragma: no cover


def _build(cls: type, data: Any, path: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or '<root>'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"{where}{unknown[0]}: unknown field (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        sub = f"{path}.{f.name}" if path else f.name
        if f.name in data:
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{sub}: required field missing")
    return cls(**kwargs)


_INDEXED = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?:\[(\d+)\])?$")


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one ``key.path=value`` override (value parsed as YAML) to a raw mapping.

    ``growth.stages[1].phi=50`` indexes into lists.
    """
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key=value")
    key, text = assignment.split("=", 1)
    try:
        value = yaml.load(text, Loader=_StrictLoader) if text != "" else ""
    except (yaml.YAMLError, ConfigError) as exc:
        raise ConfigError(f"--set {key.strip()}: the value {text!r} is not valid YAML "
                          f"({' '.join(str(exc).split())})") from None
    parts = key.strip().split(".")
    node: Any = raw
    for i, part in enumerate(parts):
        m = _INDEXED.match(part)
        if not m:
            raise ConfigError(f"--set {key}: bad key segment {part!r}")
        name, index = m.group(1), m.group(2)
        last = i == len(parts) - 1
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {'.'.join(parts[:i])} is not a mapping")
        if index is None:
            if last:
                node[name] = value
            else:
                node = node.setdefault(name, {})
        else:
            seq = node.get(name)
            idx = int(index)
            if not isinstance(seq, list) or idx >= len(seq):
                raise ConfigError(f"--set {key}: {name}[{idx}] does not exist")
            if last:
                seq[idx] = value
            else:
                node = seq[idx]


BUNDLED_CONFIGS = Path(__file__).resolve().parent / "configs"


def resolve_config_path(name: str | Path, relative_to: Path | None = None) -> Path:
    """A config file: a path (relative to ``relative_to``'s folder first, when given), else the
    name of a bundled config (``demo_tiny_gpt``, ``paper/bert_base_sch1``; ``.yaml`` optional)."""
    p = Path(name)
    candidates = [relative_to.parent / p] if relative_to is not None and not p.is_absolute() else []
    candidates.append(p)
    for c in candidates:
        if c.is_file():
            return c
    bundled = BUNDLED_CONFIGS / (str(name) if str(name).endswith(".yaml") else f"{name}.yaml")
    return bundled if bundled.is_file() else candidates[0]


class _StrictLoader(yaml.SafeLoader):
    """safe_load that refuses a mapping with the same key twice (YAML would keep the last silently)."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:  # a list or mapping as a key: SafeLoader's own error says so
            break
        if key in seen:
            raise ConfigError(f"line {key_node.start_mark.line + 1}: duplicate key {key!r} "
                              f"(first on line {seen[key] + 1})")
        seen[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def _merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``: mappings merge key by key; lists and values replace."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_config_file(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """The raw mapping of a config file, with its ``base:`` (the configs it extends) merged in.

    ``base`` names another config, or a list of them merged in order (each a path relative
    to this file, or a bundled name); this file's sections are merged over them, so a recipe
    says only what differs from a paper schedule: ``base: [paper/bert_base_sch1, cluster.yaml]``.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        raw = yaml.load(p.read_text(), Loader=_StrictLoader) or {}
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: invalid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections")
    if "base" not in raw:
        return raw
    bases = raw.pop("base")
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not bases or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{p}: base: expected the name or path of a config, or a list of them, got {bases!r}")
    chain = (*_chain, p.resolve())
    merged: dict = {}
    for base in bases:
        base_path = resolve_config_path(base, relative_to=p)
        if not base_path.is_file():
            raise ConfigError(f"{p}: base: no config {base!r} (neither a file next to {p.name} nor a bundled config)")
        if base_path.resolve() in chain:
            raise ConfigError(f"{p}: base: {base!r} extends itself "
                              f"({' -> '.join(c.name for c in chain)} -> {base_path.name})")
        merged = _merge(merged, read_config_file(base_path, chain))
    return _merge(merged, raw)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                check_files: bool = True) -> RunConfig:
    """Load, override and validate a run configuration.  ``path=None`` gives the defaults."""
    raw = read_config_file(path) if path is not None else {}
    for assignment in overrides or []:
        apply_override(raw, assignment)
    cfg = expand_named_schedule(_build(RunConfig, raw, ""))
    validate(cfg, check_files)
    return cfg


def expand_named_schedule(cfg: RunConfig) -> RunConfig:
    """``growth.schedule: sch1 | sch0 | rapid`` -> the start shape in model.* and the stages it makes."""
    g = cfg.growth
    if g.schedule is None:
        return cfg
    from megatron_msg.named_schedules import SCHEDULES, Dims, make_schedule
    _choice(g.schedule, SCHEDULES, "growth.schedule")
    _check(not g.stages, "growth.schedule", "makes the stages from model.* (the target) and train.steps: "
           "give growth.schedule or growth.stages, not both")
    m = cfg.model
    for name in SHAPE_DIMS:
        _check(getattr(m, name) >= 1, f"model.{name}", f"must be >= 1, got {getattr(m, name)}")
    _check(cfg.train.steps >= 24, "train.steps", f"growth.schedule needs >= 24 steps, got {cfg.train.steps}")
    made = make_schedule(g.schedule, Dims(m.hidden, m.ffn, m.heads, m.layers), cfg.train.steps, m.head_dim)
    start = made.start
    cfg.model = dataclasses.replace(m, hidden=start.hidden, ffn=start.ffn, heads=start.heads, layers=start.layers)
    cfg.growth = dataclasses.replace(g, schedule=None, generated_from=(
        f"{g.schedule} from {Shape(m.hidden, m.ffn, m.heads, m.layers)} in {cfg.train.steps} steps"), stages=[
        GrowthStage(at_step=AUTO if g.timing == AUTO else st.at_step, hidden=st.dims.hidden, ffn=st.dims.ffn,
                    heads=st.dims.heads, layers=st.dims.layers, phi=made.phi, rewind_lr=st.rewind_lr)
        for st in made.stages])
    return cfg


def config_from_dict(raw: dict, check: bool = True) -> RunConfig:
    """A RunConfig from nested dicts; ``check=False`` skips validation (e.g. a finished run's
    recorded config, whose data files may have moved since)."""
    cfg = expand_named_schedule(_build(RunConfig, raw, ""))
    if check:
        validate(cfg)
    return cfg


# --------------------------------------------------------------------------- validation

def _check(cond: bool, path: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{path}: {msg}")


def _choice(value: str, choices: tuple, path: str) -> None:
    _check(value in choices, path, f"{value!r} is not one of {', '.join(choices)}")


def resolve_stages(cfg: RunConfig, decided: dict[int, int] | None = None) -> list[ResolvedStage]:
    """Fill every stage's shape and options from the previous stage and the defaults.

    ``decided``: the steps the trainer chose for ``at_step: auto`` stages so far (stage index ->
    step); an auto stage not in it resolves with ``at_step=None``."""
    decided = decided or {}
    d = cfg.growth.defaults
    prev = cfg.model.shape
    layout = cfg.parallel.layout
    # The training settings every stage inherits until one changes them.
    settings = {"lr": cfg.optimizer.lr, "min_lr": cfg.optimizer.min_lr, "batch_size": cfg.train.batch_size,
                "grad_accum": cfg.train.grad_accum}
    out = []
    for i, s in enumerate(cfg.growth.stages):
        layout = tuple(getattr(s, n) if getattr(s, n) is not None else v for n, v in zip(("tp", "pp", "dp"), layout))
        shape = Shape(*(getattr(s, n) if getattr(s, n) is not None else getattr(prev, n)
                        for n in SHAPE_DIMS))
        pick = lambda name: getattr(s, name) if getattr(s, name) is not None else getattr(d, name)  # noqa: E731
        settings.update({n: getattr(s, n) for n in settings if getattr(s, n) is not None})
        new_segment = any(getattr(s, n) is not None for n in LR_STAGE_FIELDS)
        warmup = s.warmup_steps if s.warmup_steps is not None else cfg.lr.rewind_warmup_steps
        auto = s.at_step == AUTO
        at_step = decided.get(i) if auto else s.at_step
        out.append(ResolvedStage(index=i, at_step=at_step, shape=shape, operator=pick("operator"),
                                 init=pick("init"), init_std=pick("init_std"), phi=pick("phi"),
                                 depth_placement=pick("depth_placement"), depth_init=pick("depth_init"),
                                 rewind_lr=bool(pick("rewind_lr")) or new_segment, layout=layout,
                                 warmup_steps=warmup, auto=auto, **settings))
        prev = shape
    return out


# Stage fields that start a new LR segment (growth.stages[i].lr ...).
LR_STAGE_FIELDS = ("lr", "min_lr", "warmup_steps")


def validate(cfg: RunConfig, check_files: bool = True) -> None:
    """Raise ConfigError naming the first bad field.  ``check_files=False`` skips what needs the
    data and tokenizer files (msg-plan, and bundled recipes whose data a user has yet to make)."""
    m = cfg.model
    _choice(m.arch, ARCHS, "model.arch")
    _choice(m.activation, ACTIVATIONS, "model.activation")
    _choice(m.position_embedding, POSITION_EMBEDDINGS, "model.position_embedding")
    if m.position_embedding == "rope":
        _check(m.head_dim % 2 == 0, "model.head_dim",
               f"rotary embeddings rotate pairs of a head's features: needs an even head_dim, got {m.head_dim}")
        _check(m.rope_theta > 0, "model.rope_theta", f"must be > 0, got {m.rope_theta}")
    for name in ("hidden", "ffn", "heads", "layers", "head_dim", "vocab_size", "seq_len", "type_vocab_size"):
        _check(getattr(m, name) >= 1, f"model.{name}", f"must be >= 1, got {getattr(m, name)}")
    for name in ("dropout", "attention_dropout"):
        _check(0.0 <= getattr(m, name) < 1.0, f"model.{name}", "must be in [0, 1)")
    _check(m.eps > 0, "model.eps", "must be > 0")
    _check(m.init_std > 0, "model.init_std", "must be > 0")
    if m.arch == "gpt":
        _check(m.vocab_size >= 2, "model.vocab_size", "GPT needs at least 2 tokens")

    o = cfg.optimizer
    _check(o.lr > 0, "optimizer.lr", "must be > 0")
    _check(0 <= o.min_lr <= o.lr, "optimizer.min_lr", f"must be in [0, lr={o.lr}]")
    _check(o.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0")
    _check(0 <= o.beta1 < 1, "optimizer.beta1", "must be in [0, 1)")
    _check(0 <= o.beta2 < 1, "optimizer.beta2", "must be in [0, 1)")
    _check(o.eps > 0, "optimizer.eps", "must be > 0")
    _check(o.grad_clip >= 0, "optimizer.grad_clip", "must be >= 0 (0 disables clipping)")
    _choice(o.growth_step_rule, STEP_RULES, "optimizer.growth_step_rule")

    t = cfg.train
    _check(t.steps >= 1, "train.steps", "must be >= 1")
    for name in ("batch_size", "grad_accum", "eval_interval", "eval_iters", "log_interval",
                 "save_interval", "keep_checkpoints"):
        _check(getattr(t, name) >= 1, f"train.{name}", f"must be >= 1, got {getattr(t, name)}")
    _choice(t.device, ("auto", "cpu", "cuda"), "train.device")
    _choice(t.checkpoint_format, CHECKPOINT_FORMATS, "train.checkpoint_format")
    _choice(t.dtype, ("fp32", "bf16", "fp16"), "train.dtype")
    _check(t.skip_nonfinite_steps >= 0, "train.skip_nonfinite_steps", f"must be >= 0, got {t.skip_nonfinite_steps}")
    _choice(t.params_dtype, ("fp32", "bf16", "fp16"), "train.params_dtype")
    _check(t.params_dtype in ("fp32", t.dtype), "train.params_dtype",
           f"{t.params_dtype} needs train.dtype={t.params_dtype} (parameters are kept in fp32 or in the "
           f"compute dtype), got train.dtype={t.dtype}")
    _choice(t.recompute, RECOMPUTE_MODES, "train.recompute")
    _check(t.threads is None or t.threads >= 1, "train.threads", f"must be >= 1 or null (automatic), got {t.threads}")
    _check(t.prefetch is None or t.prefetch >= 0, "train.prefetch",
           f"must be >= 0 (steps built ahead; 0: none) or null (2 on CUDA, 0 on CPU), got {t.prefetch}")
    _check(t.recompute_layers >= 0, "train.recompute_layers",
           f"must be >= 0 (0: every layer of a stage), got {t.recompute_layers}")
    _check(t.recompute_layers == 0 or t.recompute == "full", "train.recompute_layers",
           f"{t.recompute_layers} needs train.recompute=full (it says which layers recompute)")
    dropout = cfg.model.dropout > 0 or cfg.model.attention_dropout > 0
    _check(not (t.recompute == "full" and t.compile and dropout), "train.recompute",
           "full with train.compile=true needs model.dropout = model.attention_dropout = 0: torch.compile "
           "cannot trace the replay of dropout's generator states that recomputation relies on")
    _check(t.loss_scale_window >= 1, "train.loss_scale_window", f"must be >= 1, got {t.loss_scale_window}")
    _check(0 < t.min_loss_scale <= t.initial_loss_scale, "train.min_loss_scale",
           f"must be > 0 and <= train.initial_loss_scale={t.initial_loss_scale}, got {t.min_loss_scale}")

    lr = cfg.lr
    _choice(lr.decay, LR_DECAYS, "lr.decay")
    _check(0 <= lr.warmup_steps < t.steps, "lr.warmup_steps", f"must be in [0, train.steps={t.steps})")
    if lr.decay_steps is not None:
        _check(lr.decay_steps > lr.warmup_steps, "lr.decay_steps", "must exceed lr.warmup_steps")
    _check(lr.rewind_warmup_steps >= 0, "lr.rewind_warmup_steps", "must be >= 0")
    _check(0 < lr.rewind_peak <= 1, "lr.rewind_peak", f"must be in (0, 1] (a fraction of the peak), got {lr.rewind_peak}")
    _check(0 < lr.rewind_decay <= 1, "lr.rewind_decay",
           f"must be in (0, 1] (a fraction of the steps left to the decay end), got {lr.rewind_decay}")
    _check(all(0 < r < t.steps for r in lr.rewind_at), "lr.rewind_at",
           f"every step must be in (0, train.steps={t.steps}), got {lr.rewind_at}")
    _check(list(lr.rewind_at) == sorted(set(lr.rewind_at)), "lr.rewind_at",
           f"steps must be increasing and distinct, got {lr.rewind_at}")
    for r, end in zip(lr.rewind_at, list(lr.rewind_at[1:]) + [t.steps]):
        _check(r + lr.rewind_warmup_steps < end, "lr.rewind_warmup_steps",
               f"a warm-up of {lr.rewind_warmup_steps} steps from the rewind at step {r} (lr.rewind_at) does not "
               f"end before {'the next rewind at step ' + str(end) if end < t.steps else 'train.steps=' + str(end)}")
    stages = resolve_stages(cfg)
    _validate_timing(cfg, stages)
    # A partial rewind below its floor would make the LR climb while it "decays".
    # (At 1.0 each stage's own min_lr <= lr check below says it.)
    rewound = [(st.lr, st.min_lr, f"growth.stages[{st.index}]") for st in stages if st.rewind_lr and lr.rewind_peak < 1]
    if lr.rewind_at and lr.rewind_peak < 1:
        rewound.append((cfg.optimizer.lr, cfg.optimizer.min_lr, "optimizer"))
    for peak, floor, where in rewound:
        _check(lr.rewind_peak * peak >= floor, "lr.rewind_peak",
               f"{lr.rewind_peak} x the peak {peak:g} ({where}) is below its min_lr {floor:g}")
    first_rewind = next((s.at_step for s in stages if s.rewind_lr and not s.auto), None)
    if first_rewind is not None:
        _check(lr.warmup_steps < first_rewind, "lr.warmup_steps",
               f"{lr.warmup_steps} does not end before the first LR rewind at step {first_rewind}")

    _validate_data(cfg, check_files)

    d = cfg.growth.defaults
    _validate_options(d.operator, d.init, d.init_std, d.phi, d.depth_placement, d.depth_init,
                      "growth.defaults")
    prev_shape, prev = m.shape, None
    for st in stages:
        path = f"growth.stages[{st.index}]"
        _validate_options(st.operator, st.init, st.init_std, st.phi, st.depth_placement, st.depth_init, path)
        if not st.auto:
            _check(st.at_step >= 1, f"{path}.at_step", "must be >= 1 (the model at step 0 is model.*)")
            _check(st.at_step < t.steps, f"{path}.at_step", f"{st.at_step} is not before train.steps={t.steps}")
        if prev is not None and not st.auto:
            _check(st.at_step > prev.at_step, f"{path}.at_step",
                   f"{st.at_step} is not after stage {prev.index}'s at_step={prev.at_step} (stages must be in order)")
            if prev.uses_masks:
                # Ramps may not overlap: every mask is 1 when a growth starts, which keeps
                # the ramp a single scalar per event (docs/growth.md).
                ramp_end = prev.at_step + prev.phi
                _check(st.at_step >= ramp_end, f"{path}.at_step",
                       f"{st.at_step} starts inside stage {prev.index}'s mask ramp "
                       f"(steps {prev.at_step}..{ramp_end}); move it to >= {ramp_end} or shorten phi")
        for dim in SHAPE_DIMS:
            new, old = getattr(st.shape, dim), getattr(prev_shape, dim)
            _check(new >= old, f"{path}.{dim}", f"{new} shrinks the previous {dim}={old} (growth only grows)")
        grown = st.shape.grows_from(prev_shape)
        _check(bool(grown), path, f"shape {st.shape} does not grow any dimension of {prev_shape}")
        _validate_stage_settings(cfg, st, stages)
        if st.operator == "stack":
            _check(grown == ["layers"], f"{path}.operator",
                   f"'stack' (G_stack) grows depth only, but this stage grows {', '.join(grown)}")
            _check(st.shape.layers % prev_shape.layers == 0, f"{path}.layers",
                   f"'stack' copies the whole stack: {st.shape.layers} is not a multiple of {prev_shape.layers}")
        prev_shape, prev = st.shape, st
    _validate_parallel(cfg)


TOKENIZERS = ("byte", "sentencepiece", "huggingface", "gpt2")
# What data.tokenizer_model is for each tokenizer that takes one (byte takes none).
TOKENIZER_FILES = {"sentencepiece": "its .model file (msg-tokenizer train writes one)",
                   "huggingface": "a tokenizers tokenizer.json (msg-tokenizer train --library hf writes one)",
                   "gpt2": "GPT-2's vocab.json (with data.merges_file: merges.txt)"}
BERT_SPECIAL_TOKENS = ("cls", "sep", "mask", "pad")


def _validate_data(cfg: RunConfig, check_files: bool = True) -> None:
    """Data source and tokenizer; with ``check_files`` opens the tokenizer (cheap) and stats the data files."""
    dc, m = cfg.data, cfg.model
    _check(0.0 < dc.valid_fraction < 1.0, "data.valid_fraction", "must be in (0, 1)")
    _choice(dc.format, ("jsonl", "indexed"), "data.format")
    _choice(dc.tokenizer, TOKENIZERS, "data.tokenizer")
    if dc.format == "jsonl":
        _check(dc.tokenizer == "byte", "data.tokenizer",
               f"{dc.tokenizer!r} needs data.format: indexed (jsonl is tokenized on the fly with the byte "
               "tokenizer; run msg-preprocess with this tokenizer first)")
        _check(dc.paths is None, "data.paths", "blends indexed datasets: needs data.format: indexed")
    if dc.tokenizer == "byte":
        _check(dc.tokenizer_model is None, "data.tokenizer_model",
               "not used by data.tokenizer: byte (the byte tokenizer has no file)")
    else:
        _check(bool(dc.tokenizer_model), "data.tokenizer_model",
               f"data.tokenizer: {dc.tokenizer} needs {TOKENIZER_FILES[dc.tokenizer]}")
    if dc.tokenizer == "gpt2":
        _check(bool(dc.merges_file), "data.merges_file", "data.tokenizer: gpt2 needs GPT-2's merges.txt")
    else:
        _check(dc.merges_file is None, "data.merges_file", f"only used with data.tokenizer: gpt2, not {dc.tokenizer}")
    if dc.paths is not None:
        _check(dc.path == "bundled", "data.paths", f"give data.path or data.paths, not both (data.path={dc.path!r})")
        try:
            prefixes = data_prefixes(dc)
        except ValueError as exc:
            raise ConfigError(f"data.paths: {exc}") from None
        for prefix, weight in prefixes:
            _check(weight > 0, "data.paths", f"weight {weight} of {prefix!r} must be > 0")
    if dc.format == "indexed" and m.arch == "bert":
        _check(m.seq_len >= 5, "model.seq_len", f"BERT samples ([CLS] A [SEP] B [SEP]) need >= 5, got {m.seq_len}")
    if not check_files:
        return
    if dc.format == "jsonl" and dc.path != "bundled":
        _check(Path(dc.path).is_file(), "data.path", f"no such file {dc.path!r} (a jsonl corpus, or 'bundled')")
    for name in ("tokenizer_model", "merges_file"):
        value = getattr(dc, name)
        _check(value is None or Path(value).is_file(), f"data.{name}", f"no such file {value!r}")
    if dc.format == "indexed":
        field_name = "data.paths" if dc.paths is not None else "data.path"
        for prefix, _ in data_prefixes(dc):
            for suffix in (".bin", ".idx"):
                f = prefix + suffix
                _check(Path(f).is_file(), field_name,
                       f"no indexed dataset at {prefix!r} ({f} does not exist; msg-preprocess writes "
                       "<output-prefix>_text_document.bin/.idx)")
    tok = build_run_tokenizer(dc)
    _check(m.vocab_size >= tok.vocab_size, "model.vocab_size",
           f"{m.vocab_size} is smaller than the {dc.tokenizer} tokenizer's {tok.vocab_size} tokens")
    needed = BERT_SPECIAL_TOKENS if m.arch == "bert" else ("eod",)
    missing = [n.upper() for n in needed if getattr(tok.special_tokens, n) is None]
    _check(not missing, "data.tokenizer_model" if dc.tokenizer_model else "data.tokenizer",
           f"{tok.describe()} has no {', '.join(missing)} token(s), which {m.arch.upper()} needs "
           + ("(msg-tokenizer train reserves [CLS], [SEP], [MASK], [PAD])" if m.arch == "bert" else
              "(the end-of-document token between documents; msg-tokenizer train reserves <eod>)"))


def data_prefixes(dc: DataConfig) -> list[tuple[str, float]]:
    """The indexed corpora (prefix without .bin/.idx, weight) ``data.path`` / ``data.paths`` name."""
    if dc.paths is None:
        return [(_strip_data_suffix(dc.path), 1.0)]
    from megatron_msg.data.builders import parse_prefixes_and_weights
    return parse_prefixes_and_weights(dc.paths)


def _strip_data_suffix(prefix: str) -> str:
    for suffix in (".bin", ".idx"):
        if prefix.endswith(suffix):
            return prefix[: -len(suffix)]
    return prefix


def build_run_tokenizer(dc: DataConfig):
    """The tokenizer ``data.tokenizer`` / ``data.tokenizer_model`` name (a ``megatron_msg.data`` Tokenizer)."""
    from megatron_msg.data.tokenizer import build_tokenizer
    try:
        return build_tokenizer(dc.tokenizer, dc.tokenizer_model, merges_file=dc.merges_file)
    except ImportError as exc:
        raise ConfigError(f"data.tokenizer: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any failure to read a user's file is that file's fault: name it
        raise ConfigError(f"data.tokenizer_model: cannot load {dc.tokenizer_model!r} as a {dc.tokenizer} "
                          f"tokenizer: {_one_line(exc)}") from None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _validate_parallel(cfg: RunConfig) -> None:
    """Every shape the schedule reaches must lay out on the topology (checked before training)."""
    p, t = cfg.parallel, cfg.train
    for name in ("tp", "pp", "dp"):
        _check(getattr(p, name) >= 1, f"parallel.{name}", f"must be >= 1, got {getattr(p, name)}")
    _check(p.growth_layout_parts >= 0, "parallel.growth_layout_parts", "must be >= 0 (0: the TP size)")
    _choice(p.backend, ("auto", "gloo", "nccl"), "parallel.backend")
    _check(p.zero_stage in (0, 1, 2), "parallel.zero_stage", f"must be 0, 1 or 2, got {p.zero_stage!r}")
    _check(p.timeout_s > 0, "parallel.timeout_s", f"must be > 0 seconds, got {p.timeout_s}")
    _check(p.bucket_mb > 0, "parallel.bucket_mb", f"must be > 0 (MB per gradient bucket), got {p.bucket_mb}")
    _check(isinstance(p.virtual_stages, int) and p.virtual_stages >= 1, "parallel.virtual_stages",
           f"must be an integer >= 1 (model chunks per pipeline stage), got {p.virtual_stages!r}")
    if p.sequence_parallel:
        _check(p.tp > 1, "parallel.sequence_parallel", "needs parallel.tp > 1")
        _check(cfg.model.seq_len % p.tp == 0, "parallel.sequence_parallel",
               f"model.seq_len={cfg.model.seq_len} is not divisible by parallel.tp={p.tp}")
    world = p.tp * p.pp * p.dp
    # (where, shape, layout, previous shape, micro-batches per step, the field to blame for them)
    entries = [("model", cfg.model.shape, p.layout, None, t.grad_accum, "train.grad_accum")]
    prev_shape = cfg.model.shape
    for s, raw in zip(resolve_stages(cfg), cfg.growth.stages):
        where = f"growth.stages[{s.index}]"
        entries.append((where, s.shape, s.layout, prev_shape, s.grad_accum,
                        f"{where}.grad_accum" if raw.grad_accum is not None else f"{where}.dp"))
        prev_shape = s.shape
    for where, shape, (tp, pp, dp), old_shape, accum, accum_field in entries:
        desc = f"tp{tp} x pp{pp} x dp{dp}"
        if (tp, pp, dp) == p.layout:
            tp_txt, pp_txt, dp_txt = f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.dp={dp}"
        else:
            for name, v in (("tp", tp), ("pp", pp), ("dp", dp)):
                _check(v >= 1, f"{where}.{name}", f"must be >= 1, got {v}")
            _check(tp * pp * dp == world, where,
                   f"layout {desc} needs {tp * pp * dp} processes, the run has {world} (parallel.tp * pp * dp)")
            tp_txt, pp_txt, dp_txt = f"tp={tp} (layout {desc})", f"pp={pp} (layout {desc})", f"dp={dp} (layout {desc})"
        _check(accum % dp == 0, accum_field,
               f"{accum} is not divisible by {dp_txt} (replicas take equal shares of the micro-batches)"
               if where == "model" else f"grad_accum={accum} (this stage's micro-batches) is not divisible by {dp_txt}")
        if p.sequence_parallel:
            _check(cfg.model.seq_len % tp == 0, "parallel.sequence_parallel",
                   f"model.seq_len={cfg.model.seq_len} is not divisible by {tp_txt}")
        _check(shape.heads % tp == 0, f"{where}.heads",
               f"{shape.heads} is not divisible by {tp_txt} (every TP rank holds an equal share of heads)")
        _check(shape.ffn % tp == 0, f"{where}.ffn", f"{shape.ffn} is not divisible by {tp_txt}")
        _check(shape.layers % pp == 0, f"{where}.layers",
               f"{shape.layers} is not divisible by {pp_txt} (pipeline stages hold equal numbers of layers)")
        v = p.virtual_stages
        if pp > 1 and v > 1:
            _check(shape.layers % (pp * v) == 0, f"{where}.layers",
                   f"{shape.layers} is not divisible by {pp_txt} x parallel.virtual_stages={v} "
                   "(interleaved pipeline chunks hold equal numbers of layers)")
            _check((accum // dp) % pp == 0, accum_field,
                   f"{accum} micro-batches over {dp_txt} give {accum // dp} per pipeline, not a multiple of "
                   f"{pp_txt} (interleaved 1F1B runs micro-batches in groups of pp; parallel.virtual_stages={v})")
        # A growth into this stage appends new units inside `parts` blocks of the old and new sizes.
        parts = p.layout_parts(tp)
        for dim in ("ffn", "heads"):
            for label, sh in (("", shape), ("the previous ", old_shape)):
                if sh is None:
                    continue
                _check(getattr(sh, dim) % parts == 0, f"{where}.{dim}",
                       f"{label}{dim}={getattr(sh, dim)} is not divisible by the growth layout's {parts} blocks "
                       "(parallel.growth_layout_parts, default: the TP size)")


def _validate_stage_settings(cfg: RunConfig, st: ResolvedStage, stages: list[ResolvedStage]) -> None:
    """A stage's own training settings (resolved, so inherited values are checked in context)."""
    raw, path = cfg.growth.stages[st.index], f"growth.stages[{st.index}]"
    given = {n for n in ("lr", "min_lr", "warmup_steps", "batch_size", "grad_accum") if getattr(raw, n) is not None}
    if given & set(LR_STAGE_FIELDS):
        _check(raw.rewind_lr is not False, f"{path}.rewind_lr",
               f"false contradicts {path}.{sorted(given & set(LR_STAGE_FIELDS))[0]}: a stage that sets its "
               "own LR starts a new LR segment (a rewind) there")
    _check(st.lr > 0, f"{path}.lr", f"must be > 0, got {st.lr}")
    where = f"{path}.min_lr" if "min_lr" in given else f"{path}.lr"
    _check(0 <= st.min_lr <= st.lr, where,
           f"min_lr={st.min_lr} is not in [0, lr={st.lr}] at this stage"
           + ("" if {"lr", "min_lr"} <= given else " (set both growth.stages[i].lr and min_lr)"))
    _check(st.warmup_steps >= 0, f"{path}.warmup_steps", f"must be >= 0, got {st.warmup_steps}")
    for name in ("batch_size", "grad_accum"):
        _check(getattr(st, name) >= 1, f"{path}.{name}", f"must be >= 1, got {getattr(st, name)}")
    if st.rewind_lr and not st.auto:  # an auto stage's warm-up is checked when its step is decided
        # The segment's warm-up must end before the next segment starts (or the run ends).
        later = [s.at_step for s in stages[st.index + 1:] if s.rewind_lr and not s.auto]
        end = later[0] if later else cfg.train.steps
        _check(st.at_step + st.warmup_steps < end,
               f"{path}.warmup_steps" if "warmup_steps" in given else "lr.rewind_warmup_steps",
               f"a warm-up of {st.warmup_steps} steps from step {st.at_step} does not end before "
               f"{'the next LR segment at step ' + str(end) if later else 'train.steps=' + str(end)}")


# What an at_step: auto stage may not change: the data position and the ranks' groups must not
# depend on a decision taken during the run (the datasets are sized, and the groups built, up front).
AUTO_FIXED_FIELDS = ("batch_size", "grad_accum", "tp", "pp", "dp")


def _validate_timing(cfg: RunConfig, stages: list[ResolvedStage]) -> None:
    """growth.timing, every at_step: auto, and growth.auto."""
    g = cfg.growth
    _choice(g.timing, TIMINGS, "growth.timing")
    after_auto = None
    for raw, st in zip(g.stages, stages):
        path = f"growth.stages[{st.index}]"
        if isinstance(raw.at_step, str):
            _check(raw.at_step == AUTO, f"{path}.at_step", f"expected an integer or 'auto', got {raw.at_step!r}")
        if g.timing == AUTO:
            _check(st.auto, "growth.timing", f"auto decides every stage's step, but {path}.at_step is "
                   f"{raw.at_step} (give at_step: auto, or growth.timing: fixed)")
        if st.auto:
            for name in AUTO_FIXED_FIELDS:
                _check(getattr(raw, name) is None, f"{path}.{name}",
                       "an at_step: auto stage cannot change it: the batch schedule and the layout must be "
                       "known before the run (give the stage a fixed at_step)")
            after_auto = st.index
        elif after_auto is not None:
            _check(False, f"{path}.at_step", f"a fixed step after the at_step: auto stage {after_auto} may come "
                   "before it: stages after an auto stage are auto too")
    a = g.auto
    for name in ("check_every", "probe_steps", "eval_iters"):
        value = getattr(a, name)
        _check(value is None or value >= 1, f"growth.auto.{name}", f"must be >= 1, got {value}")
    if a.check_every is not None and a.probe_steps is not None:
        _check(a.probe_steps <= a.check_every, "growth.auto.probe_steps",
               f"{a.probe_steps} exceeds growth.auto.check_every={a.check_every} (the loss the current shape "
               "is measured by is probe_steps before each check)")
    every, probe = a.every(cfg.train.steps), a.probe(cfg.train.steps)
    _check(not a.adopt_lookahead or 2 * probe <= every, "growth.auto.probe_steps",
           f"{probe} is more than half of growth.auto.check_every={every}: an adopted lookahead would end "
           "inside the next check's measuring window (lower probe_steps, or set adopt_lookahead: false)")
    autos = sum(st.auto for st in stages)
    _check(0 < a.reserve and autos * a.reserve < 1, "growth.auto.reserve",
           f"{a.reserve} x {max(autos, 1)} auto stage(s) must leave part of train.steps for the first "
           f"(reserve in (0, 1/{max(autos, 1)}))")
    # Every auto stage must get a check before the run ends, even when each stage before it grows
    # as late as the rule allows (at its deadline, or at its first check when that is later).
    steps, position, settled = cfg.train.steps, 0, cfg.lr.warmup_steps
    for st in stages:
        if st.auto:
            first = a.first_check(settled, steps)
            _check(first < steps, "growth.auto", f"growth.stages[{st.index}] gets its first check at step {first}, "
                   f"not before train.steps={steps}, when the stages before it grow as late as allowed (raise "
                   "train.steps, or lower growth.auto.check_every or reserve, or the stages' phi)")
            at = max(first, a.latest(steps, position, autos))
            position += 1
        else:
            at = st.at_step
        settled = at + st.ramp_steps


def _validate_options(operator, init, init_std, phi, placement, depth_init, path):
    _choice(operator, OPERATORS, f"{path}.operator")
    _choice(init, INITS, f"{path}.init")
    _choice(placement, DEPTH_PLACEMENTS, f"{path}.depth_placement")
    _choice(depth_init, DEPTH_INITS, f"{path}.depth_init")
    _check(init_std > 0, f"{path}.init_std", "must be > 0")
    _check(phi >= 1, f"{path}.phi", f"mask ramp length must be >= 1 step, got {phi}")
