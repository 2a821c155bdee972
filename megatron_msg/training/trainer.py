"""Trainer that runs a whole multi-stage MSG schedule unattended, on one device or TP x PP x DP.

One loop iteration = one optimizer step ``s``:

1. apply every growth stage whose ``at_step == s`` (grow model + optimizer state,
   through the logical state: gather -> grow -> shard, growth/apply.py);
2. set the masks for step ``s`` from the ramp (and drop them at the ramp's end);
3. set the LR for step ``s``; forward/backward over ``grad_accum`` micro-batches
   (split over data-parallel replicas, pushed through the 1F1B pipeline);
   sum tied-embedding and data-parallel gradients; clip by the global norm;
   AdamW step;
4. log / evaluate / checkpoint (rank 0 writes the logical state).

Everything that decides step ``s`` is a function of ``s`` and the saved state
(batches of the step, LR, ramp value, growth RNG, dropout seeds per
micro-batch), so a run killed at any point and resumed from its last
checkpoint reproduces the uninterrupted losses, at the same or another layout.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch

import torch.distributed as dist

from megatron_msg.checkpoint.io import (Checkpoint, CheckpointError, LogicalTensor, checkpoint_damage, find_latest,
                                        latest_checkpoint, open_checkpoint, previous_complete, remove_checkpoints,
                                        remove_stale_temporaries, save_checkpoint)
from megatron_msg.checkpoint.logical import gather_model, gather_optimizer, load_model, shard_optimizer_state
from megatron_msg.checkpoint.rank_state import load_rank_pieces
from megatron_msg.checkpoint.sharded import save_sharded
from megatron_msg.config import (ConfigError, ModelConfig, ResolvedStage, RunConfig, Shape, build_run_tokenizer,
                                 data_prefixes)
from megatron_msg.growth.apply import grow_model, spec_for_stage
from megatron_msg.growth.auto_timing import AutoTiming, GrowthCheck, compared_rate, decide, grown_rate, step_flops
from megatron_msg.growth.ramp import MaskRamp, apply_ramp
from megatron_msg.model import build_model
from megatron_msg.model.init import logical_shapes
from megatron_msg.model.placement import placement_for
from megatron_msg.parallel.grads import clip_grad_norm, reduced_after_backward, sync_gradients
from megatron_msg.parallel.random import RNGTracker
from megatron_msg.parallel.recompute import RecomputePolicy
from megatron_msg.parallel.step import forward_backward, my_micro_batches
from megatron_msg.parallel.grad_buckets import GradBuckets
from megatron_msg.training.prefetch import PrefetchedBatches
from megatron_msg.training.run_definition import RunDefinitionError, run_definition_differences
from megatron_msg.parallel.topology import ParallelState, Topology
from megatron_msg.training.batches import (BatchSchedule, BertBatches, GPTBatches, IndexedBertBatches,
                                          IndexedGPTBatches, byte_token_streams)
from megatron_msg.training.lr import lr_at, lr_segments, segment_at
from megatron_msg.training.clock import RunClock
from megatron_msg.training.loss_scale import DynamicLossScaler
from megatron_msg.training.memory_check import available_bytes, check_memory
from megatron_msg.training.metrics import MetricsLog
from megatron_msg.training.optimizer_factory import build_optimizer
from megatron_msg.training.plot import plot_loss_curve

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingDivergedError(RuntimeError):
    """A step's gradients were inf/nan more often than ``train.skip_nonfinite_steps`` allows."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device: 'cuda' requested but CUDA is not available")
    return torch.device(name)


def build_batches(cfg: RunConfig):
    """(train, valid) batch sources whose ``get(step, micro)`` is a pure function of the step.

    Training batches follow the schedule's batch sizes (they may change at growth stages);
    evaluation always uses ``train.batch_size``, so validation losses compare across stages.
    """
    t, d = cfg.train, cfg.data
    train_sizes, valid_sizes = BatchSchedule.from_config(cfg), BatchSchedule.constant(t.batch_size)
    if d.format == "indexed":
        n_train = train_sizes.samples_before(t.steps)
        n_valid = t.eval_iters * t.batch_size
        train, valid = _indexed_datasets(cfg, (n_train, n_valid, None))
        make = IndexedGPTBatches if cfg.model.arch == "gpt" else IndexedBertBatches
        return make(train, train_sizes), make(valid, valid_sizes)
    train_stream, valid_stream = byte_token_streams(d.path, d.text_key, d.valid_fraction, d.seed)
    make = GPTBatches if cfg.model.arch == "gpt" else BertBatches
    return (make(train_stream, cfg.model.seq_len, train_sizes, t.seed),
            make(valid_stream, cfg.model.seq_len, valid_sizes, t.seed + 1))


def _indexed_datasets(cfg: RunConfig, num_samples: tuple):
    """(train, valid) datasets of ``data.path`` read with the configured tokenizer."""
    from megatron_msg.data import build_bert_datasets, build_gpt_datasets
    from megatron_msg.data.errors import TokenizerMismatchError
    d, seq_len = cfg.data, cfg.model.seq_len
    tok = build_run_tokenizer(d)
    corpora = data_prefixes(d)  # one, or several blended by weight (data.paths)
    try:
        if cfg.model.arch == "gpt":
            train, valid, _ = build_gpt_datasets(corpora, seq_len, seed=d.seed, splits=d.splits,
                                                 num_samples=num_samples, tokenizer=tok)
        else:
            train, valid, _ = build_bert_datasets(corpora, tok, max_seq_len=seq_len, seed=d.seed, splits=d.splits,
                                                  num_samples=num_samples)
    except TokenizerMismatchError as exc:
        raise ConfigError(f"data.tokenizer: {exc}") from None
    except ValueError as exc:
        if str(exc).startswith("splits:"):  # e.g. a split too small to hold a document
            raise ConfigError(f"data.{exc}") from None
        raise
    if train is None or valid is None:
        raise ConfigError(f"data.splits: {d.splits!r} leaves no training or validation data")
    return train, valid


def model_loss(model, batch: dict) -> torch.Tensor:
    if "targets" in batch:
        return model(batch["tokens"], batch["targets"])[1]
    return model(batch["tokens"], batch["token_types"], batch["padding_mask"],
                 batch["mlm_labels"], batch["nsp_labels"]).loss


@dataclass
class TrainResult:
    out_dir: Path
    steps_run: int
    final_step: int
    shape: Shape
    losses: dict[int, float] = field(default_factory=dict)
    valid_losses: dict[int, float] = field(default_factory=dict)
    interrupted: bool = False


def train_settings_at(schedule: BatchSchedule, segments, step: int) -> dict:
    """What a checkpoint of ``step`` records of the schedule (checked when it is resumed)."""
    seg, lr = schedule.at(step), segment_at(step, segments)
    return {"consumed_samples": schedule.samples_before(step), "batch_size": seg.batch_size,
            "grad_accum": seg.grad_accum, "lr_segment": dataclasses.asdict(lr)}


class Trainer:
    def __init__(self, cfg: RunConfig, out_dir: str | Path | None = None, resume: bool = True,
                 progress: bool | None = None, parallel: ParallelState | None = None,
                 resume_from: str | Path | None = None):
        self.cfg = cfg
        self.out_dir = Path(out_dir or cfg.train.out_dir)
        ps = parallel or ParallelState.single(resolve_device(cfg.train.device))
        # The chunks per stage come from the config, whoever built the groups.
        self.ps = dataclasses.replace(ps, virtual=cfg.parallel.virtual_stages)
        self.device = self.ps.device
        self.is_main = self.ps.rank == 0  # logs, writes checkpoints and plots
        self.stages: list[ResolvedStage] = cfg.resolved_stages()
        self.lr_segments = lr_segments(cfg)
        # at_step: auto: the steps decided so far and the probe losses the next decision needs.
        self.auto = AutoTiming.from_config(cfg, self.stages) if any(st.auto for st in self.stages) else None
        self.decided: dict[int, int] = {}
        self.probe_losses: dict[int, float] = {}
        self.grown_rate: float | None = None  # the last lookahead's, for the stage being decided
        # Stage -> the step its LR rewind moved to (an adopted lookahead trained on without it).
        self.moved_rewinds: dict[int, int] = {}
        self._probing = False  # inside a growth lookahead: nothing is logged until it is adopted
        self._probe_records: list[dict] = []  # what a lookahead would have logged (kept if adopted)
        self._probe_eval_s = 0.0  # the lookahead's evaluation time (training time if thrown away)
        self._adopted: list[dict] = []  # an adopted lookahead's records, for run() to write
        self.batch_schedule = BatchSchedule.from_config(cfg)
        self.progress = (sys.stderr.isatty() if progress is None else progress) and self.is_main
        self.autocast_dtype = DTYPES[cfg.train.dtype]
        t = cfg.train
        self.scaler = (DynamicLossScaler(t.initial_loss_scale, t.loss_scale_window, t.min_loss_scale)
                       if t.dtype == "fp16" else None)
        self.rng = RNGTracker(self.device)
        self.recompute = RecomputePolicy.from_config(t.recompute, t.recompute_layers)
        self.placement = placement_for(self.ps, self.rng, cfg.parallel.sequence_parallel, self.recompute)
        self._stop_requested = False
        self._bar = None  # tqdm progress bar while run() is active
        self.clock = RunClock()
        threads = cpu_threads(self.cfg.train.threads, _ranks_on_this_host(self.ps))
        if threads is not None:
            torch.set_num_threads(threads)  # process-wide, like OMP_NUM_THREADS

        # The checks a user can act on come first, and write nothing: the data, the checkpoint to
        # resume, whether every stage still to run fits memory, then whether the run directory is writable.
        self.train_batches, self.valid_batches = build_batches(cfg)
        t = cfg.train
        starting_over = not resume and resume_from is None
        ckpt_path = None if starting_over else self._checkpoint_to_resume(resume_from)
        ckpt = open_checkpoint(ckpt_path) if ckpt_path is not None else None
        if t.memory_check:
            check_memory(cfg, ckpt.state["step"] if ckpt is not None else 0,
                         available_bytes(self.device, _ranks_on_this_host(self.ps)),
                         str(self.device) if self.device.type == "cuda" else "this host")
        if self.is_main:
            _check_writable(self.out_dir)  # now, not at the first save hours later
        if starting_over:
            self._remove_previous_checkpoints()
        prefetch = t.prefetch if t.prefetch is not None else (2 if self.device.type == "cuda" else 0)
        if prefetch:
            self.train_batches = PrefetchedBatches(self.train_batches, self._my_micro_batches_at, prefetch,
                                                   pin_memory=self.device.type == "cuda")
        self.metrics = MetricsLog(self.out_dir, t.tensorboard and self.is_main, enabled=self.is_main)
        if self.is_main:  # what killed saves left; nobody writes this directory yet
            for name in remove_stale_temporaries(self.out_dir):
                self._log_console(f"removed {self.out_dir / 'checkpoints' / name}, left by an interrupted save")
        self._saved_step = None  # the step of the last checkpoint this run wrote or resumed (never twice)
        if ckpt is not None:
            self._use_layout(self.layout_of(ckpt.state["stage_index"]))  # the layout the run had reached
            try:
                self._restore(ckpt)
            except RunDefinitionError:
                raise  # the config, not the files: an older checkpoint would not fit it either
            except CheckpointError as exc:  # a file whose contents are damaged: offer the one before
                older = previous_complete(self.out_dir, ckpt_path)
                offer = (f"; the newest complete checkpoint before it is {older}: resume it with --resume-from {older}"
                         if older is not None else "")
                raise CheckpointError(f"{exc}{offer}") from None
            self._saved_step = self.step
        else:
            self.model = build_model(cfg.model, self.placement, seed=t.seed, device=self.device)
            self.optimizer = self._build_optimizer(self.model)
            self.step, self.stage_index, self.ramp = 0, 0, None
            self.nonfinite_skipped = 0
            self.metrics.truncate_from(0)
        self._wrap_model()

    # ------------------------------------------------------------------ state

    def _checkpoint_to_resume(self, resume_from: str | Path | None) -> Path | None:
        """``resume_from``, else the run directory's newest complete checkpoint (damaged newer ones
        are named in a warning), else None (a fresh run).  Reads only."""
        if resume_from is not None:
            path = Path(resume_from)
            why = checkpoint_damage(path) if path.is_dir() else f"{path} is not a checkpoint directory"
            if why is not None:
                raise CheckpointError(f"--resume-from {path}: {why}")
            return path
        found = find_latest(self.out_dir)
        for message in found.warnings():
            self._log_console(f"warning: {message}")
        return found.path

    def _remove_previous_checkpoints(self) -> None:
        """--no-resume: the previous run's checkpoints would be resumed by mistake later."""
        if self.is_main:
            removed = remove_checkpoints(self.out_dir)
            if removed:
                self._log_console(f"starting over (--no-resume): removed the previous run's {len(removed)} "
                                  f"checkpoint(s) in {self.out_dir / 'checkpoints'}")
        self._barrier()  # nobody writes the directory before they are gone

    def _wrap_model(self) -> None:
        self.model.train()
        if getattr(self, "grad_buckets", None) is not None:
            self.grad_buckets.remove()  # the hooks of the model this one replaces
        self.grad_buckets = None
        p = self.cfg.parallel
        if p.overlap_grad_reduce and self.ps.dp_size > 1 and self.zero_stage != 2:
            self.grad_buckets = GradBuckets(self.model.named_parameters(), self.ps.dp_group, p.bucket_mb,
                                            exclude=reduced_after_backward(self.model, self.ps))
        # The training and evaluation paths call stage_forward, so that is what gets compiled.
        self.stage_forward = (torch.compile(self.model.stage_forward) if self.cfg.train.compile
                              else self.model.stage_forward)

    @property
    def zero_stage(self) -> int:
        return self.cfg.parallel.zero_stage

    @property
    def params_dtype(self) -> torch.dtype:
        return DTYPES[self.cfg.train.params_dtype] or torch.float32

    def _build_optimizer(self, model):
        return build_optimizer(model, self.cfg.optimizer, self.zero_stage, self.ps, self.params_dtype)

    def layout_of(self, stage_index: int) -> tuple[int, int, int]:
        """(tp, pp, dp) after ``stage_index`` growth stages."""
        return self.stages[stage_index - 1].layout if stage_index else self.cfg.parallel.layout

    def _use_layout(self, layout: tuple[int, int, int]) -> ParallelState:
        """Switch this rank to ``layout`` (collective when it changes); returns the previous state."""
        old = self.ps
        topo = Topology(*layout)
        if topo != self.ps.topology:
            self.ps = ParallelState.create(topo, self.device, self.ps.timeout_s, virtual=self.ps.virtual)
            self.placement = placement_for(self.ps, self.rng, self.cfg.parallel.sequence_parallel, self.recompute)
        return old

    def expected_shape(self, stage_index: int) -> Shape:
        return self.stages[stage_index - 1].shape if stage_index else self.cfg.model.shape

    def checkpoint_state(self) -> dict:
        """The small part of the logical training state (the tensors stream separately)."""
        topo = self.ps.topology
        return {
            "step": self.step,
            "stage_index": self.stage_index,
            "model_config": dataclasses.asdict(self.model.cfg),
            "masked": self.model.masked,
            "ramp": None if self.ramp is None else dataclasses.asdict(self.ramp),
            # Dropout is reseeded per micro-batch from (seed, step, micro): no generator state.
            "written_by": {"tp": topo.tp, "pp": topo.pp, "dp": topo.dp},
            "loss_scaler": None if self.scaler is None else self.scaler.state_dict(),
            "nonfinite_skipped": self.nonfinite_skipped,
            "clock": self.clock.state_dict(),
            # at_step: auto: what the run decided, and the probe losses a coming decision compares.
            "growth_decisions": {str(k): v for k, v in self.decided.items()},
            "probe_losses": {str(k): v for k, v in self.probe_losses.items()},
            "grown_rate": self.grown_rate,
            "moved_rewinds": {str(k): v for k, v in self.moved_rewinds.items()},
            # What the schedule says for the next step: a resumed run must agree (_check_settings).
            "train_settings": self.train_settings(self.step),
            "config": self.cfg.to_dict(),
        }

    def train_settings(self, step: int) -> dict:
        """The per-stage training settings in force at ``step`` and the data position before it."""
        return train_settings_at(self.batch_schedule, self.lr_segments, step)

    def _check_settings(self, ckpt: Checkpoint) -> None:
        """Refuse a config whose schedule disagrees with what the checkpoint trained with so far."""
        saved = ckpt.state.get("train_settings")
        if saved is None:  # written before per-stage settings existed: one batch size, nothing to check
            return
        mine = self.train_settings(ckpt.state["step"])
        diff = [k for k in saved if saved[k] != mine.get(k)]
        if diff:
            detail = "; ".join(f"{k}: checkpoint {saved[k]}, config {mine.get(k)}" for k in diff)
            raise RunDefinitionError(
                f"{ckpt.path}: the config's training settings at step {ckpt.state['step']} differ from the "
                f"run's ({detail}); the batch and LR schedule of steps already trained (train.*, optimizer.*, "
                f"lr.*, growth.stages[i].lr/min_lr/warmup_steps/batch_size/grad_accum) must stay as they were")

    def logical_tensors(self) -> Iterator[LogicalTensor]:
        """The logical parameters, masks and AdamW state, one tensor at a time.

        Collective over this rank's model replica (each item is gathered over its
        TP x PP ranks), so every rank of the replica must consume it in step.
        """
        shapes = logical_shapes(self.model.cfg)
        for name in shapes:
            value = gather_model(self.model, self.ps, names=[name], shapes=shapes, optimizer=self.optimizer)[name]
            opt = gather_optimizer(self.optimizer, self.model, self.ps, names=[name], shapes=shapes)
            yield LogicalTensor(name, value, opt.get(name))

    def _restore(self, ckpt: Checkpoint) -> None:
        state, path = ckpt.state, ckpt.path
        mcfg = ModelConfig(**state["model_config"])
        want = self.expected_shape(state["stage_index"])
        if mcfg.arch != self.cfg.model.arch:
            raise RunDefinitionError(f"{path}: checkpoint is a {mcfg.arch} model, config says model.arch={self.cfg.model.arch}")
        if mcfg.shape != want:
            raise RunDefinitionError(f"{path}: checkpoint shape {mcfg.shape} after {state['stage_index']} growth "
                                  f"stage(s) does not match the config's schedule, which gives {want}")
        differences = run_definition_differences(state, self.cfg, self.stages)
        if differences:
            raise RunDefinitionError(
                f"{path}: the config describes another run than the checkpoint's: {'; '.join(differences)} "
                "(grow with msg-grow, or list a deliberate change in train.resume_may_change)")
        # at_step: auto: the steps the run decided shape its LR and batch schedules from here on.
        self.moved_rewinds = {int(k): v for k, v in state.get("moved_rewinds", {}).items()}
        self._set_decided({int(k): v for k, v in state.get("growth_decisions", {}).items()})
        self._check_settings(ckpt)
        self.model = build_model(mcfg, self.placement, initialize=False, device=self.device,
                                 params_dtype=self.params_dtype)
        self.model.set_masked(state["masked"])
        # Built before the load, so fp32 master weights (train.params_dtype) get the exact values.
        self.optimizer = self._build_optimizer(self.model)
        if ckpt.store is not None:  # sharded: each rank reads the stored chunks overlapping its pieces
            load_rank_pieces(self.model, self.optimizer, ckpt.store, ckpt.index,
                             no_dist=self.ps.topology.world_size == 1)
        else:  # tensor by tensor, each rank cuts its blocks: any layout can resume any checkpoint
            load_model(self.model, ckpt.model, optimizer=self.optimizer)
            self.optimizer.load_named_state(shard_optimizer_state(ckpt.optimizer, self.model))
        self.step, self.stage_index = state["step"], state["stage_index"]
        self.probe_losses = {int(k): v for k, v in state.get("probe_losses", {}).items()}
        self.grown_rate = state.get("grown_rate")
        self.nonfinite_skipped = state.get("nonfinite_skipped", 0)
        self.clock = RunClock.from_state(state.get("clock"))
        self.ramp = None if state["ramp"] is None else MaskRamp(**state["ramp"])
        if self.scaler is not None and state.get("loss_scaler"):  # absent: written by a bf16/fp32 run
            self.scaler.load_state_dict(state["loss_scaler"])
        self.metrics.truncate_from(self.step, self.stage_index)
        self._log_console(f"resumed from {path} at step {self.step}, shape {mcfg.shape}")

    def save(self) -> Path | None:
        """Write a checkpoint (collective).  Returns its path on rank 0.

        ``train.checkpoint_format``: sharded, every rank writes the pieces it holds
        (checkpoint/sharded.py); logical, only replica 0 gathers (under ZeRO every replica
        joins in: each holds part of the Adam state) and rank 0 writes each logical tensor
        as soon as it is gathered.
        """
        if self._saved_step == self.step:  # e.g. stopped right after a periodic save: it is on disk
            return self.out_dir / "checkpoints" / f"step_{self.step:08d}" if self.is_main else None
        meta = {"shape": str(self.model.cfg.shape), "stage_index": self.stage_index,
                "parameters": self.model.num_parameters()}
        keep, path = self.cfg.train.keep_checkpoints, None
        if self.cfg.train.checkpoint_format == "sharded":  # every rank writes its own pieces
            path = save_sharded(self.out_dir, self.step, self.checkpoint_state(), meta, keep,
                                self.model, self.optimizer, self.ps)
        else:
            gathers = self.ps.dp_rank == 0 or self.zero_stage > 0
            tensors = self.logical_tensors() if gathers else iter(())
            if self.is_main:
                path = save_checkpoint(self.out_dir, self.step, self.checkpoint_state(), meta, keep, tensors)
            else:
                for _ in tensors:  # the collectives of the gathers rank 0 writes
                    pass
        self._saved_step = self.step
        self._barrier()  # nobody reads "latest" before it exists
        return path

    def _barrier(self) -> None:
        if self.ps.topology.world_size > 1:
            dist.barrier()

    # ------------------------------------------------------------------ steps

    def _autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _run_micro_batches(self, get_batch, micro_ids, scale: float, forward_only: bool, step: int,
                           batch_size: int, after_backward=None) -> torch.Tensor:
        """Sum over ``micro_ids`` of ``scale * loss``, summed over data-parallel replicas.

        ``after_backward()`` runs before that sum: the gradient buckets' collectives must be
        waited on before another collective is issued on the group (gloo would otherwise queue
        it behind a bucket whose peer is gone, and a timed-out group does not time out again).
        """
        ps = self.ps
        seed = self.cfg.train.seed
        total = forward_backward(
            self.stage_forward, ps, lambda m: self._to_device(get_batch(m)), micro_ids, scale,
            self.model.activation_shape(batch_size, self.cfg.model.seq_len),
            forward_only=forward_only, autocast=self._autocast, act_dtype=self.params_dtype,
            before_micro=lambda m, stage: self.rng.seed_micro_batch(seed, step, m, stage, ps.tp_rank))
        if after_backward is not None:
            after_backward()
        if ps.dp_size > 1:
            dist.all_reduce(total, group=ps.dp_group)
        return total

    def _my_micro_batches_at(self, step: int) -> range:
        """This rank's micro-batch ids at ``step`` (none past the run's last step)."""
        if step >= self.cfg.train.steps:
            return range(0)
        return my_micro_batches(self.batch_schedule.at(step).grad_accum, self.ps)

    def train_step(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step; returns (loss, global gradient norm).  Under fp16 a step whose
        gradients overflowed is skipped (norm inf/nan) and lowers the loss scale."""
        cfg = self.cfg
        self.optimizer.zero_grad(set_to_none=True)
        sizes = self.batch_schedule.at(step)
        accum = sizes.grad_accum
        loss_scale = self.scaler.scale if self.scaler else 1.0
        micro_ids = my_micro_batches(accum, self.ps)
        buckets = self.grad_buckets
        if buckets is not None:
            buckets.begin_step(len(micro_ids))
        total = self._run_micro_batches(lambda m: self.train_batches.get(step, m), micro_ids,
                                        loss_scale / accum, False, step, sizes.batch_size,
                                        after_backward=buckets.finish if buckets is not None else None)
        partitioned = self.zero_stage == 2  # gradients reduce-scattered over DP, not all-reduced
        sync_gradients(self.model, self.ps, data_parallel=not partitioned,
                       reduced=buckets.names if buckets is not None else frozenset())
        if partitioned:
            self.optimizer.reduce_scatter_gradients()
        if self.scaler:
            if partitioned:
                self.optimizer.unscale_(1.0 / loss_scale)
            else:
                self.scaler.unscale_(self.model)
            total = total / loss_scale
        # The norm is all-reduced over the model-parallel group (and under ZeRO-2 the DP group):
        # every rank sees the same value, so every rank takes the same skip decision.
        if partitioned:
            norm = self.optimizer.clip_grad_norm(cfg.optimizer.grad_clip)
        else:
            norm = clip_grad_norm(self.model, cfg.optimizer.grad_clip, self.ps)
        # One host sync per step: whether to apply it.  The norm is global (identical on every
        # rank), so every rank decides alike, and a non-finite step never reaches the weights.
        finite = bool(torch.isfinite(norm))
        if self.scaler is not None:
            apply = self.scaler.update(finite)
        else:
            apply = finite or self._skip_nonfinite(step, total, norm)
        if apply:
            self.optimizer.step()
        return total, norm

    def _skip_nonfinite(self, step: int, loss: torch.Tensor, norm: torch.Tensor) -> bool:
        """Count a skipped non-finite step, or raise once the config's allowance is spent."""
        allowed = self.cfg.train.skip_nonfinite_steps
        if self.nonfinite_skipped >= allowed:
            last = latest_checkpoint(self.out_dir, report=None)
            raise TrainingDivergedError(
                f"step {step}: the gradient norm is {norm.item()} (loss {loss.item():.4g}) and "
                f"{self.nonfinite_skipped} of train.skip_nonfinite_steps={allowed} non-finite steps were "
                f"already skipped; nothing was saved for this step, the last checkpoint is "
                f"{last if last is not None else 'none'} (lower the LR, or raise train.skip_nonfinite_steps)")
        self.nonfinite_skipped += 1
        self._log_console(f"step {step}: gradient norm {norm.item()}, update skipped "
                          f"({self.nonfinite_skipped} of {allowed} allowed)")
        return False

    def _eval_ids(self, n: int) -> tuple[range, int]:
        """(this replica's share of n eval batches, number of replicas sharing them).

        Contiguous shares differing by at most one batch; with fewer batches than
        replicas (the one-batch growth probe) every replica evaluates all of them and
        their sum is divided back, so no pipeline runs an empty schedule.
        """
        ps = self.ps
        if n < ps.dp_size:
            return range(n), 1
        return range(ps.dp_rank * n // ps.dp_size, (ps.dp_rank + 1) * n // ps.dp_size), ps.dp_size

    @torch.no_grad()
    def _eval_loss(self, n: int) -> float:
        ids, sharing = self._eval_ids(n)
        return self._eval_sum(ids, 1.0 / n, sharing)

    def _eval_sum(self, ids: range, scale: float, sharing: int) -> float:
        """``scale`` x the summed validation loss of batches ``ids``, eval mode; with ``sharing == 1``
        every replica evaluated all of ``ids`` and the all-reduced sum is divided back."""
        self.model.eval()
        total = self._run_micro_batches(self.valid_batches.get, ids, scale, True, self.step,
                                        self.cfg.train.batch_size)
        self.model.train()
        if sharing == 1 and self.ps.dp_size > 1:
            total = total / self.ps.dp_size
        return total.item()

    def evaluate(self) -> float:
        return self._eval_loss(self.cfg.train.eval_iters)

    @torch.no_grad()
    def eval_batch_losses(self, n: int) -> list[float]:
        """Each of the first ``n`` validation batches' own loss at the current weights (eval mode).

        For measuring the probe loss's noise (tools/probe_noise.py), which needs every batch apart
        where ``evaluate`` returns their mean.  Every replica evaluates every batch, so this costs
        ``n`` batches per replica: a measuring tool's price, not the training path's.
        """
        return [self._eval_sum(range(i, i + 1), 1.0, 1) for i in range(n)]

    def _probe_loss(self) -> float:
        """Loss of a fixed validation batch in eval mode: compared across a growth."""
        return self._eval_loss(1)

    def _set_decided(self, decided: dict[int, int]) -> None:
        """The auto steps decided so far, and the stages and LR segments that follow from them."""
        self.decided = dict(decided)
        self.stages = self.cfg.resolved_stages(self.decided)
        self.lr_segments = lr_segments(self.cfg, self.stages, self.moved_rewinds)

    def grow(self, stage: ResolvedStage) -> None:
        if self._probing and not self.auto.adopt:  # a lookahead that is always rolled back: no record
            self._grow_to(stage)
            return
        before = self._probe_loss()
        self._grow_to(stage)
        after = self._probe_loss()
        record = {"kind": "growth", "step": stage.at_step, "stage": stage.index, "operator": stage.operator,
                  "shape": str(stage.shape), "parameters": self.model.num_parameters(),
                  "layout": "tp{} x pp{} x dp{}".format(*stage.layout),
                  "loss_before": before, "loss_after": after, "phi": stage.phi, "rewind_lr": stage.rewind_lr,
                  "time_s": self.clock.so_far("train")}
        if stage.auto:
            record["timing"] = "auto"
        if self._probing:  # written if the lookahead is adopted
            self._probe_records.append(record)
            return
        self.metrics.write(record)
        self._log_console(_growth_line(record, f"probe loss {before:.5f} -> {after:.5f}"))

    def _grow_to(self, stage: ResolvedStage) -> None:
        spec = spec_for_stage(self.model.cfg, stage, seed=self.cfg.train.seed,
                              layout_parts=self.cfg.parallel.layout_parts(stage.layout[0]))
        old_ps = self._use_layout(stage.layout)  # gather on the old layout, shard onto the new one
        result = grow_model(self.model, spec, self.optimizer, new_optimizer=self._build_optimizer,
                            step_rule=self.cfg.optimizer.growth_step_rule, ramp_start=stage.at_step, phi=stage.phi,
                            ps=old_ps, placement=self.placement, params_dtype=self.params_dtype)
        self.model, self.optimizer, self.ramp = result.model, result.optimizer, result.ramp
        self._wrap_model()

    # ------------------------------------------------------------------ at_step: auto

    def _auto_timing(self) -> None:
        """Before step ``self.step``: measure, and decide whether the next auto stage grows now."""
        k, s = self.stage_index, self.step
        if k >= len(self.stages) or self.stages[k].at_step is not None:
            return
        previous = self.stages[k - 1] if k else None
        checks = self.auto.checks(k, previous)
        if s in self.auto.measure_steps(k, previous) and s not in self.probe_losses:
            self.probe_losses[s] = self._eval_loss(self.auto.eval_iters)
        if s not in checks:
            return
        stage, w = self.stages[k], self.auto.probe_steps
        ramp = stage.ramp_steps
        if s == checks[-1] or s + ramp + w >= self.cfg.train.steps:
            check = GrowthCheck(s, k, "deadline", None, None, None, None, None, None, 0)
        else:
            batch = self.batch_schedule.at(s).global_batch
            flops_now, flops_grown = step_flops(self.model.cfg, batch), step_flops(
                self.cfg.model.with_shape(stage.shape), batch)
            rate_now, rate_ahead = self.auto.current_rates(self.probe_losses, s, previous, ramp, flops_now)
            compared = compared_rate(rate_now, rate_ahead)
            if self.grown_rate is not None and compared > self.grown_rate:
                # Still faster than the grown shape was at the last lookahead: no new one yet.
                check = GrowthCheck(s, k, "wait", self.probe_losses[s - w], self.probe_losses[s], None, None,
                                    rate_now, self.grown_rate, 0, rate_current_ahead=rate_ahead)
            else:
                keep = self._start_lookahead(k)
                try:
                    start, settled, after, measured = self._lookahead(ramp, w, compared, flops_grown)
                except BaseException:
                    self._end_lookahead(keep, adopt=False)
                    raise
                check = decide(k, s, w, self.probe_losses[s - w], self.probe_losses[s], settled, after,
                               flops_now, flops_grown, ramp + measured, rate_ahead, grown_steps=measured,
                               grown_start=start)
                assert not check.stopped_early or check.decision == "wait", "an early stop must say wait"
                self.grown_rate = check.rate_grown
                adopt = self.auto.adopt and check.decision == "grow"
                self._end_lookahead(keep, adopt)
                if adopt:  # its steps are the run's now: no overhead, and the rewind comes here
                    check = dataclasses.replace(check, probe_flops=0, adopted=True)
                    if stage.rewind_lr:
                        self.moved_rewinds = {**self.moved_rewinds, k: self.step}
        if check.decision == "wait":  # the loss now may open the next check's window
            self.probe_losses = {s: self.probe_losses[s]}
        else:  # the next stage's windows start after this growth's ramp
            # An adopted lookahead measured the run's own probe losses at its ramp's end and at its
            # end: the next stage's first windows may need them.
            self.probe_losses = ({s + ramp: check.grown_settled, s + ramp + w: check.grown_after}
                                 if check.adopted else {})
            self.grown_rate = None
            self._set_decided({**self.decided, k: s})
        self.metrics.write({"kind": "growth_check", **dataclasses.asdict(check), "shape": str(stage.shape),
                            "time_s": self.clock.so_far("train")})
        if check.decision == "wait":
            ahead = "" if check.rate_current_ahead is None else f" ({check.rate_current_ahead:.3g} ahead)"
            self._log_console(f"step {s}: stage {k} waits (loss drop per FLOP: current {check.rate_current:.3g}"
                              f"{ahead}, grown {check.rate_grown:.3g}"
                              f"{'' if check.probe_flops else ' at the last lookahead'})")

    def _start_lookahead(self, k: int) -> tuple:
        """Grow stage ``k`` at the next step with its LR rewind left out, and return what puts every
        part of the training state back.  The LR goes on as if there were no rewind: a rewind's
        transient is paid whenever the stage grows, so it says nothing about when to."""
        keep = (self.model, self.optimizer, self.ramp, self.stage_index, self.step, self.nonfinite_skipped,
                self.scaler.state_dict() if self.scaler is not None else None, self.decided)
        self._probing, self._probe_records, self._probe_eval_s = True, [], 0.0
        self._set_decided({**self.decided, k: self.step})
        self.stages[k] = dataclasses.replace(self.stages[k], rewind_lr=False)
        self.lr_segments = lr_segments(self.cfg, self.stages, self.moved_rewinds)
        return keep

    def _lookahead(self, ramp: int, steps: int, rate_to_beat: float,
                   flops_grown: int) -> tuple[float | None, float, float, int]:
        """Train the grown model through its mask ramp and ``steps`` more steps; return the probe
        loss right after growing (growth.auto.include_ramp, else None), at the ramp's end and at the
        end, and the steps trained after the ramp: ``steps``, or fewer where the rate so far fell
        below ``rate_to_beat`` (growth.auto.stop_early).  When the lookahead may be adopted, what the
        run would have logged on these steps (train and validation records) is kept aside."""
        settled, t, half = None, self.cfg.train, self.auto.early_stop_steps()
        start = self._eval_loss(self.auto.eval_iters) if self.auto.include_ramp and ramp else None
        last_time, last_samples = self.clock.so_far("train"), self.batch_schedule.samples_before(self.step)
        for i in range(ramp + steps):
            if i == ramp:
                settled = self._eval_loss(self.auto.eval_iters)
                if self.auto.include_ramp and start is None:  # no ramp: the window starts here anyway
                    start = settled
            elif half is not None and i == ramp + half:
                middle = self._eval_loss(self.auto.eval_iters)
                if grown_rate(start, settled, middle, ramp, half, flops_grown) < rate_to_beat:
                    return start, settled, middle, half
            step_run, lr, loss, norm = self.advance()
            if not self.auto.adopt:
                continue
            if self.step % t.log_interval == 0:
                now, samples = self.clock.so_far("train"), self.batch_schedule.samples_before(self.step)
                self._probe_records.append(self._train_record(step_run, lr, loss, norm, samples - last_samples,
                                                              now - last_time))
                last_time, last_samples = now, samples
            if self.step % t.eval_interval == 0:
                before = self.clock.eval_s
                with self.clock.timing("eval", within="train"):
                    vloss = self.evaluate()
                self._probe_eval_s += self.clock.eval_s - before
                self._probe_records.append({"kind": "valid", "step": step_run, "loss": vloss,
                                            "time_s": self.clock.so_far("train"), "eval_time_s": self.clock.eval_s})
        return start, settled, self._eval_loss(self.auto.eval_iters), steps

    def _end_lookahead(self, keep: tuple, adopt: bool) -> None:
        """Keep the lookahead's state (its records go to run() to write), or put back ``keep``."""
        self._probing = False
        if adopt:
            self._adopted += self._probe_records
        else:  # its evaluations were overhead of the timing rule, like its steps: training time
            self.clock.eval_s -= self._probe_eval_s
            self.clock.train_s += self._probe_eval_s
            (self.model, self.optimizer, self.ramp, self.stage_index, self.step, self.nonfinite_skipped,
             scaler_state, decided) = keep
            if scaler_state is not None:
                self.scaler.load_state_dict(scaler_state)
            self._set_decided(decided)
            self._wrap_model()
        self._probe_records = []

    # ------------------------------------------------------------------ loop

    def _log_console(self, text: str) -> None:
        if not self.is_main:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def _request_stop(self, signum, frame) -> None:
        self._stop_requested = True

    def _stop_agreed(self) -> bool:
        """A stop request on any rank stops every rank at the same step (else the others hang)."""
        if self.ps.topology.world_size == 1:
            return self._stop_requested
        flag = torch.tensor([1.0 if self._stop_requested else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._control_group())
        return bool(flag.item())

    def _control_group(self):
        """A gloo group over all ranks for host-side control messages (works beside nccl)."""
        if getattr(self, "_ctrl", None) is None:
            self._ctrl = (dist.new_group(backend="gloo", timeout=timedelta(seconds=self.ps.timeout_s))
                          if dist.get_backend() != "gloo" else dist.group.WORLD)
        return self._ctrl

    def advance(self) -> tuple[int, float, torch.Tensor, torch.Tensor]:
        """One step of the run: the growth events due, the mask ramp, the LR, the optimizer step.

        Returns (the step just run, its LR, loss, gradient norm); what ``run`` does per step
        besides logging, evaluation and saving (``msg-bench train`` times exactly this).
        """
        if self.auto is not None and not self._probing:
            before = self.step
            self._auto_timing()
            if self.step != before:  # an adopted lookahead: the step it ended at may need a probe loss
                self._auto_timing()
        while self.stage_index < len(self.stages) and self.stages[self.stage_index].at_step == self.step:
            self.grow(self.stages[self.stage_index])
            self.stage_index += 1
        self.ramp = apply_ramp(self.model, self.ramp, self.step)
        lr = lr_at(self.step, self.lr_segments, self.cfg.lr, self.cfg.train.steps)
        self.optimizer.set_lr(lr)
        loss, norm = self.train_step(self.step)
        self.step += 1
        return self.step - 1, lr, loss, norm

    def run(self, max_steps: int | None = None) -> TrainResult:
        cfg, t = self.cfg, self.cfg.train
        total = t.steps
        result = TrainResult(self.out_dir, 0, self.step, self.model.cfg.shape)
        old_handler = signal.signal(signal.SIGTERM, self._request_stop) if _main_thread() else None
        if self.progress:
            from tqdm import tqdm
            self._bar = tqdm(total=total, initial=self.step, unit="step", dynamic_ncols=True)
        last_time, last_samples = time.perf_counter(), self.batch_schedule.samples_before(self.step)
        try:
            if self.step == 0 and t.eval_at_start:
                self._evaluate_and_record(-1, result)  # the initial loss, at zero FLOPs
            while self.step < total and (max_steps is None or result.steps_run < max_steps):
                if self._stop_agreed():
                    result.interrupted = True
                    break
                before = self.step
                with self.clock.timing("train"):
                    step_run, lr, loss, norm = self.advance()
                result.steps_run += self.step - before  # more than one after an adopted lookahead
                if self._bar is not None:
                    self._bar.update(self.step - before)
                self._write_adopted(result)
                if self.step % t.log_interval == 0 or self.step == total:
                    now, samples = time.perf_counter(), self.batch_schedule.samples_before(self.step)
                    rec = self._train_record(step_run, lr, loss, norm, samples - last_samples, now - last_time)
                    last_time, last_samples = now, samples
                    self.metrics.write(rec)
                    result.losses[step_run] = rec["loss"]
                    self._report(rec)
                if self.step % t.eval_interval == 0 or self.step == total:
                    self._evaluate_and_record(step_run, result)
                if self.step % t.save_interval == 0 or self.step == total:
                    with self.clock.timing("save"):
                        self.save()
        except KeyboardInterrupt:
            result.interrupted = True
        finally:
            if old_handler is not None:
                signal.signal(signal.SIGTERM, old_handler)
        if result.interrupted or (self.step < total and result.steps_run and
                                  self.step % t.save_interval != 0):
            path = self.save()  # interrupted, or stopped by max_steps: always resumable
            self._log_console(f"stopped at step {self.step}: saved {path}; run again to resume")
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        result.final_step, result.shape = self.step, self.model.cfg.shape
        if self.step >= total and t.plot and self.is_main:
            png = plot_loss_curve(self.metrics.read(), self.out_dir / "loss_curve.png",
                                  title=f"{cfg.model.arch} growth run ({len(self.stages)} growth events)")
            if png:
                self._log_console(f"loss curve: {png}")
        self.metrics.close()
        return result

    def _train_record(self, step_run: int, lr: float, loss: torch.Tensor, norm: torch.Tensor,
                      samples: int, seconds: float) -> dict:
        """The ``train`` record of ``step_run``; ``samples`` trained in ``seconds`` since the last one."""
        tokens_per_s = samples * self.cfg.model.seq_len / max(seconds, 1e-9)
        rec = {"kind": "train", "step": step_run, "loss": loss.item(), "lr": lr,
               "grad_norm": norm.item(), "stage": self.stage_index, "shape": str(self.model.cfg.shape),
               "mask": None if self.ramp is None else self.ramp.value(step_run),
               "global_batch": self.batch_schedule.at(step_run).global_batch,
               "tokens_per_s": tokens_per_s, "time_s": self.clock.so_far("train")}
        if self.scaler is not None:
            rec.update(loss_scale=self.scaler.scale, skipped_steps=self.scaler.skipped_steps)
        elif self.nonfinite_skipped:
            rec.update(skipped_steps=self.nonfinite_skipped)
        return rec

    def _write_adopted(self, result: TrainResult) -> None:
        """The records of an adopted lookahead's steps (its growth, train and validation records),
        written after the fact in step order, as the run would have written them."""
        for rec in self._adopted:
            self.metrics.write(rec)
            if rec["kind"] == "train":
                result.losses[rec["step"]] = rec["loss"]
                self._report(rec)
            elif rec["kind"] == "valid":
                result.valid_losses[rec["step"]] = rec["loss"]
            elif rec["kind"] == "growth":
                self._log_console(_growth_line(rec, "lookahead adopted"))
        self._adopted = []

    def _evaluate_and_record(self, step_run: int, result: TrainResult) -> None:
        with self.clock.timing("eval"):
            vloss = self.evaluate()
        self.metrics.write({"kind": "valid", "step": step_run, "loss": vloss, "time_s": self.clock.train_s,
                            "eval_time_s": self.clock.eval_s})
        result.valid_losses[step_run] = vloss

    def _report(self, rec: dict) -> None:
        if not self.is_main:
            return
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.2e}", shape=rec["shape"],
                                  tok_s=f"{rec['tokens_per_s']:.0f}")
        else:
            mask = "" if rec["mask"] is None else f" mask {rec['mask']:.2f}"
            print(f"step {rec['step']:>6} | loss {rec['loss']:.4f} | lr {rec['lr']:.2e} | {rec['shape']}{mask}"
                  f" | {rec['tokens_per_s']:.0f} tok/s", flush=True)


def _growth_line(record: dict, detail: str) -> str:
    """The console line of a growth record (live, or an adopted lookahead's written afterwards)."""
    return (f"step {record['step']}: grew ({record['operator']}) to {record['shape']}, "
            f"{record['parameters']:,} parameters; {detail}")


def cpu_threads(threads: int | None, ranks_on_host: int) -> int | None:
    """The thread count to set (None: leave torch's): ``train.threads`` when given; else, for
    several ranks on one host, its cores divided among them."""
    if threads is not None:
        return threads
    if ranks_on_host > 1:
        return max(1, (os.cpu_count() or 1) // ranks_on_host)
    return None


def _ranks_on_this_host(ps: ParallelState) -> int:
    """How many ranks share this host's memory: the launcher's LOCAL_WORLD_SIZE (torchrun, the
    deepspeed launcher), else every rank of a single-host run."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", ps.topology.world_size))


def _check_writable(out_dir: Path) -> None:
    """The run directory and its checkpoints/ can be created and written, or a ConfigError naming it."""
    probe = Path(out_dir) / "checkpoints"
    try:
        probe.mkdir(parents=True, exist_ok=True)
        test = probe / f".write-test.{os.getpid()}"
        test.write_bytes(b"")
        test.unlink()
    except OSError as exc:
        raise ConfigError(f"train.out_dir: cannot write to {probe} ({exc.strerror or exc})") from None


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()
