"""Benchmarks behind ``msg-bench optimizer`` and ``msg-bench train``: the trainer's own speed.

optimizer: one AdamW step over a GPT's parameter tensors (random gradients), timed for
torch's ``AdamW(fused=True)`` and for ours on the same tensors: MSGAdamW fused and
unfused, ZeRO-1 on one process (the flat-buffer fragment path), and MSGAdamW fused
right after a growth (the grown tensors carry per-entry offsets and take the exact
per-entry path).  Every variant owns a copy of the same tensors.

train: one training step of ``msg-train``'s real step (``Trainer.advance``: growth
check, ramp, LR, batches, forward/backward, gradient sync, clipping, the optimizer)
against (a) a plain PyTorch loop over the same model object type and the same batches
already on the device (``model(tokens, targets)``, ``clip_grad_norm_``,
``AdamW(fused=True)``), and (b) a nanoGPT-style reference GPT of the same shape
(``nn.LayerNorm``, SDPA, tied head; compiled with ``--compile``), in one process.  The
trainer is timed with the masks removed (no growth stage) and during a ramp (grown at
step 1 in hidden and FFN, ramp longer than the benchmark).  Tokens/s and MFU (6N + 12LdT
FLOPs per token, as nanoGPT and ../shared/bench/anchor_baselines.py count) against a
matmul ceiling measured in the same process.

Both: the variants' timing windows are interleaved (drift hits all alike) and the median
window is reported, with ratios to the baseline of the same run.
"""
from __future__ import annotations

import copy
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# name -> (hidden, layers, heads, batch) of msg-bench train: tiny and small for CPUs, the others the
# issue's GPU shapes (seq_len 1024 and vocab 50304 on GPU)
TRAIN_SIZES = {"tiny": (64, 2, 2, 4), "small": (256, 4, 4, 8), "768": (768, 12, 12, 16), "1024": (1024, 24, 16, 16),
               "2048": (2048, 24, 16, 8)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved_medians(variants: dict[str, Callable[[], object]], steps: int, windows: int,
                        device: torch.device, warmup: int = 2) -> dict[str, list[float]]:
    """ms per call of each variant: ``windows`` windows of ``steps`` calls each, interleaved."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(windows):
        for name, fn in variants.items():
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            _sync(device)
            times[name].append((time.perf_counter() - t0) / steps * 1e3)
    return times


def _header(device: torch.device) -> dict:
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    return {"date": time.strftime("%Y-%m-%d"), "device": name, "torch": torch.__version__}


def _write(out_dir: str, stem: str, res: dict, md: str) -> None:
    """JSON and markdown, each written to a temporary name and renamed (never half a file)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for path, text in ((out / f"{stem}.json", json.dumps(res, indent=1)), (out / f"{stem}.md", md)):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)


# ---------------------------------------------------------------------------------- optimizer

def _gpt_parameters(hidden: int, layers: int, vocab: int, device) -> list[tuple[str, nn.Parameter]]:
    from megatron_msg.config import ModelConfig
    from megatron_msg.model import build_model
    cfg = ModelConfig(arch="gpt", hidden=hidden, ffn=4 * hidden, heads=max(1, hidden // 64), head_dim=64,
                      layers=layers, vocab_size=vocab, seq_len=256)
    return list(build_model(cfg, device=device).named_parameters())


def run_optimizer_bench(out_dir: str, hidden: int = 256, layers: int = 12, vocab: int = 4096, steps: int = 10,
                        windows: int = 7, device: str = "cpu", log=print) -> dict:
    from megatron_msg.config import OptimizerConfig
    from megatron_msg.model.layout import tensor_spec
    from megatron_msg.parallel.topology import ParallelState
    from megatron_msg.training.optimizer import MSGAdamW
    from megatron_msg.training.zero import ZeroAdamW
    dev = torch.device(device)
    torch.manual_seed(0)
    base = _gpt_parameters(hidden, layers, vocab, dev)
    grads = {n: torch.randn_like(p) * 1e-3 for n, p in base}
    o = OptimizerConfig()
    kw = dict(lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
    no_decay = {n for n, _ in base if tensor_spec(n).no_weight_decay}

    def copy_params():
        return [(n, nn.Parameter(p.detach().clone())) for n, p in base]

    def with_grads(named):
        for n, p in named:
            p.grad = grads[n]
        return named

    variants: dict[str, Callable[[], None]] = {}
    named = with_grads(copy_params())
    decay = [p for n, p in named if n not in no_decay]
    plain = [p for n, p in named if n in no_decay]
    ref = torch.optim.AdamW([{"params": decay}, {"params": plain, "weight_decay": 0.0}], fused=True, **kw)
    variants["torch AdamW(fused=True)"] = ref.step
    for label, fused in (("MSGAdamW, fused", True), ("MSGAdamW, unfused (before)", False)):
        opt = MSGAdamW(with_grads(copy_params()), no_decay=no_decay, fused=fused, **kw)
        variants[label] = opt.step
    zero = ZeroAdamW(copy_params(), ParallelState.single(dev), 1, no_decay=no_decay, fused=True, **kw)
    for n, p in zero.named:
        p.grad = grads[n]
    variants["ZeroAdamW stage 1, one process, fused"] = zero.step
    grown = MSGAdamW(with_grads(copy_params()), no_decay=no_decay, fused=True, **kw)
    grown.step()  # state exists; then give the MLP tensors per-entry offsets, as an FFN growth does
    offsets = 0
    for n, p in grown.by_name.items():
        if ".mlp." in n:
            st = grown.state[p]
            off = torch.zeros_like(st["exp_avg"])
            off.view(-1)[: off.numel() // 2] = 1.0
            # born one step after the rest: unsettled for ~300 steps at beta2 = 0.95, longer than the benchmark
            st.update(step_offset=off, max_offset=1, offset_values=(0.0, 1.0))
            offsets += p.numel()
    variants["MSGAdamW, fused, MLP tensors with per-entry offsets"] = grown.step
    n_params = sum(p.numel() for _, p in base)
    res = {**_header(dev), "tensors": len(base), "parameters": n_params, "entries_with_offsets": offsets,
           "shape": f"GPT hidden {hidden}, ffn {4 * hidden}, layers {layers}, vocab {vocab}",
           "steps_per_window": steps, "windows": windows, "rows": []}
    with torch.no_grad():
        times = interleaved_medians(variants, steps, windows, dev)
    still = sum(st["step_offset"] is not None for p, st in grown.state.items() if ".mlp." in grown.names[p])
    if not still:
        raise AssertionError("the per-entry offsets settled during the benchmark: that variant measured nothing")
    ref_ms = statistics.median(times["torch AdamW(fused=True)"])
    for label, ts in times.items():
        med = statistics.median(ts)
        res["rows"].append({"variant": label, "step_ms": round(med, 3), "vs_torch_fused": round(med / ref_ms, 3),
                            "windows_ms": [round(t, 3) for t in ts]})
    lines = [f"{res['shape']}: {len(base)} tensors, {n_params / 1e6:.1f}M parameters; {res['device']}, "
             f"torch {res['torch']}; median of {windows} windows x {steps} steps", "",
             "| optimizer step | ms | vs torch fused |", "|---|---:|---:|"]
    lines += [f"| {r['variant']} | {r['step_ms']:.2f} | {r['vs_torch_fused']:.2f}x |" for r in res["rows"]]
    md = "\n".join(lines) + "\n"
    _write(out_dir, "optimizer", res, md)
    log(md)
    return res


# ---------------------------------------------------------------------------------- train

class _RefBlock(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, ffn), nn.Linear(ffn, d)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2)
                   for z in self.qkv(self.ln1(x)).split(c, 2))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.proj(a)
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class ReferenceGPT(nn.Module):
    """nanoGPT's GPT, written plainly: pre-LN blocks, SDPA, tied LM head."""

    def __init__(self, vocab: int, seq: int, d: int, heads: int, ffn: int, layers: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(_RefBlock(d, heads, ffn) for _ in range(layers))
        self.lnf = nn.LayerNorm(d)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        logits = F.linear(self.lnf(x), self.wte.weight)
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))


def matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    n = 4096 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = interleaved_medians({"mm": lambda: a @ b}, 10 if device.type == "cuda" else 3, 5, device)["mm"]
    return 2 * n ** 3 / (statistics.median(times) * 1e-3) / 1e12


def _train_raw(size: str, device: str, vocab: int, seq: int, ramp: bool) -> dict:
    hidden, layers, heads, batch = TRAIN_SIZES[size]
    gpu = device == "cuda"
    start = {"hidden": hidden * 3 // 4, "ffn": 2 * hidden} if ramp else {}
    raw = {"model": {"arch": "gpt", "hidden": start.get("hidden", hidden), "ffn": start.get("ffn", 4 * hidden),
                     "heads": heads, "head_dim": hidden // heads, "layers": layers, "seq_len": seq,
                     "vocab_size": vocab},
           "lr": {"warmup_steps": 1},
           "train": {"steps": 10 ** 6, "batch_size": batch, "grad_accum": 1, "log_interval": 10 ** 6,
                     "eval_interval": 10 ** 6, "save_interval": 10 ** 6, "device": device, "tensorboard": False,
                     "plot": False, "dtype": "bf16" if gpu else "fp32"}}
    if ramp:  # grown at step 1 to the benchmark's shape; the ramp outlasts the benchmark
        raw["growth"] = {"stages": [{"at_step": 1, "hidden": hidden, "ffn": 4 * hidden, "phi": 10 ** 5}]}
    return raw


def run_train_bench(out_dir: str, size: str = "tiny", device: str = "auto", steps: int = 5, windows: int = 5,
                    compile_reference: bool | None = None, seq: int | None = None, vocab: int | None = None,
                    log=print) -> dict:
    from megatron_msg.config import config_from_dict
    from megatron_msg.training.trainer import Trainer, model_loss, resolve_device
    if size not in TRAIN_SIZES:
        raise SystemExit(f"--size: one of {', '.join(TRAIN_SIZES)}, got {size!r}")
    dev = resolve_device(device)
    gpu = dev.type == "cuda"
    seq = seq or (1024 if gpu else 64)
    vocab = vocab or (50304 if gpu else 261)
    compile_reference = gpu if compile_reference is None else compile_reference
    hidden, layers, heads, batch = TRAIN_SIZES[size]
    amp = torch.bfloat16 if gpu else None
    scratch = Path(tempfile.mkdtemp(prefix="msg-bench-train-"))
    variants: dict[str, Callable[[], object]] = {}

    trainer = Trainer(config_from_dict(_train_raw(size, dev.type, vocab, seq, ramp=False)),
                      out_dir=scratch / "plain", progress=False)
    variants["msg-train step, masks removed"] = trainer.advance
    ramped = Trainer(config_from_dict(_train_raw(size, dev.type, vocab, seq, ramp=True)),
                     out_dir=scratch / "ramp", progress=False)
    ramped.advance()
    ramped.advance()  # grown at step 1: mid-ramp from here on
    assert ramped.ramp is not None and ramped.model.cfg.hidden == hidden
    variants["msg-train step, during a ramp"] = ramped.advance

    # The plain loop: the same model (a copy of the trainer's), the same batches, already on the device.
    model = copy.deepcopy(trainer.model)
    source = getattr(trainer.train_batches, "source", trainer.train_batches)
    batches = [{k: v.to(dev) for k, v in source.get(s, 0).items()} for s in range(8)]
    o = trainer.cfg.optimizer
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                            weight_decay=o.weight_decay, fused=True)
    it = [0]

    def autocast():
        return torch.autocast(dev.type, dtype=amp, enabled=amp is not None)

    def plain_step():
        b = batches[it[0] % len(batches)]
        it[0] += 1
        with autocast():
            loss = model_loss(model, b)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    variants["plain PyTorch loop, same model and batches"] = plain_step

    torch.manual_seed(0)
    ref = ReferenceGPT(vocab, seq, hidden, heads, 4 * hidden, layers).to(dev)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=o.lr, fused=True)
    ref_fwd = torch.compile(ref) if compile_reference else ref

    def ref_step():
        b = batches[it[0] % len(batches)]
        it[0] += 1
        with autocast():
            loss = ref_fwd(b["tokens"], b["targets"])
        loss.backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        return loss

    ref_label = "nanoGPT-style reference" + (", compiled" if compile_reference else ", eager")
    variants[ref_label] = ref_step
    times = interleaved_medians(variants, steps, windows, dev, warmup=3 if compile_reference else 2)
    peak = matmul_tflops(dev, amp or torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    flops_per_token = 6 * n_params + 12 * layers * hidden * seq
    tokens = batch * seq
    res = {**_header(dev), "size": size, "shape": f"GPT ({hidden}, {4 * hidden}, {heads} heads, {layers} layers)",
           "seq_len": seq, "vocab": vocab, "batch": batch, "parameters": n_params,
           "dtype": "bf16 autocast" if amp else "fp32", "matmul_tflops": round(peak, 3),
           "steps_per_window": steps, "windows": windows, "rows": []}
    base = statistics.median(times["plain PyTorch loop, same model and batches"])
    ref_ms = statistics.median(times[ref_label])
    for label, ts in times.items():
        med = statistics.median(ts)
        tok_s = tokens / (med * 1e-3)
        res["rows"].append({"variant": label, "step_ms": round(med, 3), "tokens_per_s": round(tok_s),
                            "mfu": round(tok_s * flops_per_token / (peak * 1e12), 4),
                            "vs_plain_loop": round(med / base, 3), "reference_speed": round(ref_ms / med, 3),
                            "windows_ms": [round(t, 3) for t in ts]})
    lines = [f"{res['shape']}, seq {seq}, vocab {vocab}, batch {batch}, {res['dtype']}; {res['device']}, torch "
             f"{res['torch']}; matmul ceiling {peak:.2f} TFLOP/s; median of {windows} windows x {steps} steps", "",
             "| step | ms | tokens/s | MFU | time vs plain loop | speed vs reference |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['variant']} | {r['step_ms']:.2f} | {r['tokens_per_s']:,} | {100 * r['mfu']:.1f}% | "
              f"{r['vs_plain_loop']:.3f}x | {r['reference_speed']:.3f}x |" for r in res["rows"]]
    md = "\n".join(lines) + "\n"
    _write(out_dir, f"train_{size}", res, md)
    log(md)
    for t in (trainer, ramped):
        t.metrics.close()
    shutil.rmtree(scratch, ignore_errors=True)
    return res
