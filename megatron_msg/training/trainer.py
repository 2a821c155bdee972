"""Single-device trainer that runs a whole multi-stage MSG schedule unattended.

One loop iteration = one optimizer step ``s``:

1. apply every growth stage whose ``at_step == s`` (grow model + optimizer state);
2. set the masks for step ``s`` from the ramp (and drop them at the ramp's end);
3. set the LR for step ``s``; forward/backward over ``grad_accum`` micro-batches;
   clip; AdamW step;
4. log / evaluate / checkpoint.

Everything that decides step ``s`` is a function of ``s`` and the saved state
(batches of the step, LR, ramp value, growth RNG), so a run killed at any point
and resumed from its last checkpoint reproduces the uninterrupted losses.
"""
from __future__ import annotations

import dataclasses
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_msg.checkpoint.io import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from megatron_msg.config import ModelConfig, ResolvedStage, RunConfig, Shape
from megatron_msg.growth.apply import build_optimizer, grow_model, spec_for_stage
from megatron_msg.growth.ramp import MaskRamp, apply_ramp
from megatron_msg.model import build_model
from megatron_msg.training.batches import BertBatches, GPTBatches, IndexedGPTBatches, byte_token_streams
from megatron_msg.training.lr import lr_at
from megatron_msg.training.metrics import MetricsLog
from megatron_msg.training.plot import plot_loss_curve

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device: 'cuda' requested but CUDA is not available")
    return torch.device(name)


def build_batches(cfg: RunConfig):
    """(train, valid) batch sources whose ``get(step, micro)`` is a pure function of the step."""
    t, d = cfg.train, cfg.data
    if d.format == "indexed":
        from megatron_msg.data import build_gpt_datasets
        from megatron_msg.data.tokenizer import ByteTokenizer
        n_train = t.steps * t.grad_accum * t.batch_size
        n_valid = t.eval_iters * t.batch_size
        train, valid, _ = build_gpt_datasets(d.path, cfg.model.seq_len, seed=d.seed, splits=d.splits,
                                             num_samples=(n_train, n_valid, None), tokenizer=ByteTokenizer())
        if train is None or valid is None:
            raise ValueError(f"data.splits={d.splits!r} leaves no training or validation data")
        return IndexedGPTBatches(train, t.batch_size, t.grad_accum), IndexedGPTBatches(valid, t.batch_size)
    train_stream, valid_stream = byte_token_streams(d.path, d.text_key, d.valid_fraction, d.seed)
    make = GPTBatches if cfg.model.arch == "gpt" else BertBatches
    return (make(train_stream, cfg.model.seq_len, t.batch_size, t.seed),
            make(valid_stream, cfg.model.seq_len, t.batch_size, t.seed + 1))


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


class Trainer:
    def __init__(self, cfg: RunConfig, out_dir: str | Path | None = None, resume: bool = True,
                 progress: bool | None = None):
        self.cfg = cfg
        self.out_dir = Path(out_dir or cfg.train.out_dir)
        self.device = resolve_device(cfg.train.device)
        self.stages: list[ResolvedStage] = cfg.resolved_stages()
        self.rewinds = [s.at_step for s in self.stages if s.rewind_lr]
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.autocast_dtype = DTYPES[cfg.train.dtype]
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.train.dtype == "fp16" else None
        self._stop_requested = False
        self._bar = None  # tqdm progress bar while run() is active

        self.train_batches, self.valid_batches = build_batches(cfg)
        t = cfg.train

        self.metrics = MetricsLog(self.out_dir, t.tensorboard)
        ckpt = latest_checkpoint(self.out_dir) if resume else None
        if ckpt is not None:
            self._restore(load_checkpoint(ckpt), ckpt)
        else:
            torch.manual_seed(t.seed)
            self.model = build_model(cfg.model).to(self.device)
            self.optimizer = build_optimizer(self.model, cfg.optimizer)
            self.step, self.stage_index, self.ramp = 0, 0, None
            self.metrics.truncate_from(0)
        self._wrap_model()

    # ------------------------------------------------------------------ state

    def _wrap_model(self) -> None:
        self.model.train()
        self.forward_model = torch.compile(self.model) if self.cfg.train.compile else self.model

    def expected_shape(self, stage_index: int) -> Shape:
        return self.stages[stage_index - 1].shape if stage_index else self.cfg.model.shape

    def state_dict(self) -> dict:
        opt = {n: {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in st.items()}
               for n, st in self.optimizer.named_state().items()}
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "step": self.step,
            "stage_index": self.stage_index,
            "model_config": dataclasses.asdict(self.model.cfg),
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "masked": self.model.masked,
            "optimizer": opt,
            "ramp": None if self.ramp is None else dataclasses.asdict(self.ramp),
            "rng": rng,
            "config": self.cfg.to_dict(),
        }

    def _restore(self, state: dict, path: Path) -> None:
        mcfg = ModelConfig(**state["model_config"])
        want = self.expected_shape(state["stage_index"])
        if mcfg.arch != self.cfg.model.arch:
            raise CheckpointError(f"{path}: checkpoint is a {mcfg.arch} model, config says model.arch={self.cfg.model.arch}")
        if mcfg.shape != want:
            raise CheckpointError(f"{path}: checkpoint shape {mcfg.shape} after {state['stage_index']} growth "
                                  f"stage(s) does not match the config's schedule, which gives {want}")
        self.model = build_model(mcfg)
        self.model.load_state_dict(state["model"], strict=True)
        self.model.to(self.device)
        self.model.set_masked(state["masked"])
        self.optimizer = build_optimizer(self.model, self.cfg.optimizer)
        self.optimizer.load_named_state(state["optimizer"])
        self.step, self.stage_index = state["step"], state["stage_index"]
        self.ramp = None if state["ramp"] is None else MaskRamp(**state["ramp"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self.metrics.truncate_from(self.step)
        self._log_console(f"resumed from {path} at step {self.step}, shape {mcfg.shape}")

    def save(self) -> Path:
        meta = {"shape": str(self.model.cfg.shape), "stage_index": self.stage_index,
                "parameters": self.model.num_parameters()}
        return save_checkpoint(self.out_dir, self.step, self.state_dict(), meta, self.cfg.train.keep_checkpoints)

    # ------------------------------------------------------------------ steps

    def _autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def train_step(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for micro in range(cfg.train.grad_accum):
            batch = self._to_device(self.train_batches.get(step, micro))
            with self._autocast():
                loss = model_loss(self.forward_model, batch) / cfg.train.grad_accum
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += loss.detach()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        clip = cfg.optimizer.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else float("inf"))
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return total, norm

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        losses = []
        for i in range(self.cfg.train.eval_iters):
            batch = self._to_device(self.valid_batches.get(i))
            with self._autocast():
                losses.append(model_loss(self.forward_model, batch).float())
        self.model.train()
        return torch.stack(losses).mean().item()

    @torch.no_grad()
    def _probe_loss(self) -> float:
        """Loss of a fixed validation batch in eval mode: compared across a growth."""
        self.model.eval()
        loss = model_loss(self.model, self._to_device(self.valid_batches.get(0))).item()
        self.model.train()
        return loss

    def grow(self, stage: ResolvedStage) -> None:
        before = self._probe_loss()
        spec = spec_for_stage(self.model.cfg, stage, seed=self.cfg.train.seed)
        result = grow_model(self.model, spec, self.optimizer, self.cfg.optimizer,
                            ramp_start=stage.at_step, phi=stage.phi)
        self.model, self.optimizer, self.ramp = result.model, result.optimizer, result.ramp
        self._wrap_model()
        after = self._probe_loss()
        record = {"kind": "growth", "step": stage.at_step, "stage": stage.index, "operator": stage.operator,
                  "shape": str(stage.shape), "parameters": self.model.num_parameters(),
                  "loss_before": before, "loss_after": after, "phi": stage.phi, "rewind_lr": stage.rewind_lr}
        self.metrics.write(record)
        self._log_console(f"step {stage.at_step}: grew ({stage.operator}) to {stage.shape}, "
                          f"{record['parameters']:,} parameters; probe loss {before:.5f} -> {after:.5f}")

    # ------------------------------------------------------------------ loop

    def _log_console(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def _request_stop(self, signum, frame) -> None:
        self._stop_requested = True

    def run(self, max_steps: int | None = None) -> TrainResult:
        cfg, t = self.cfg, self.cfg.train
        total = t.steps
        result = TrainResult(self.out_dir, 0, self.step, self.model.cfg.shape)
        tokens_per_step = t.batch_size * t.grad_accum * cfg.model.seq_len
        old_handler = signal.signal(signal.SIGTERM, self._request_stop) if _main_thread() else None
        if self.progress:
            from tqdm import tqdm
            self._bar = tqdm(total=total, initial=self.step, unit="step", dynamic_ncols=True)
        last_time, last_step = time.perf_counter(), self.step
        try:
            while self.step < total and (max_steps is None or result.steps_run < max_steps):
                if self._stop_requested:
                    result.interrupted = True
                    break
                while self.stage_index < len(self.stages) and self.stages[self.stage_index].at_step == self.step:
                    self.grow(self.stages[self.stage_index])
                    self.stage_index += 1
                self.ramp = apply_ramp(self.model, self.ramp, self.step)
                lr = lr_at(self.step, cfg.optimizer, cfg.lr, total, self.rewinds)
                self.optimizer.set_lr(lr)
                loss, norm = self.train_step(self.step)
                step_run = self.step
                self.step += 1
                result.steps_run += 1
                if self._bar is not None:
                    self._bar.update(1)
                if self.step % t.log_interval == 0 or self.step == total:
                    now = time.perf_counter()
                    rec = {"kind": "train", "step": step_run, "loss": loss.item(), "lr": lr,
                           "grad_norm": norm.item(), "stage": self.stage_index, "shape": str(self.model.cfg.shape),
                           "mask": None if self.ramp is None else self.ramp.value(step_run),
                           "tokens_per_s": tokens_per_step * (self.step - last_step) / max(now - last_time, 1e-9)}
                    last_time, last_step = now, self.step
                    self.metrics.write(rec)
                    result.losses[step_run] = rec["loss"]
                    self._report(rec)
                if self.step % t.eval_interval == 0 or self.step == total:
                    vloss = self.evaluate()
                    self.metrics.write({"kind": "valid", "step": step_run, "loss": vloss})
                    result.valid_losses[step_run] = vloss
                if self.step % t.save_interval == 0 or self.step == total:
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
        if self.step >= total and t.plot:
            png = plot_loss_curve(self.metrics.read(), self.out_dir / "loss_curve.png",
                                  title=f"{cfg.model.arch} growth run ({len(self.stages)} growth events)")
            if png:
                self._log_console(f"loss curve: {png}")
        self.metrics.close()
        return result

    def _report(self, rec: dict) -> None:
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.2e}", shape=rec["shape"],
                                  tok_s=f"{rec['tokens_per_s']:.0f}")
        else:
            mask = "" if rec["mask"] is None else f" mask {rec['mask']:.2f}"
            print(f"step {rec['step']:>6} | loss {rec['loss']:.4f} | lr {rec['lr']:.2e} | {rec['shape']}{mask}"
                  f" | {rec['tokens_per_s']:.0f} tok/s", flush=True)


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()
