"""Benchmarks behind ``msg-bench kernels`` and ``msg-bench mask-overhead`` (GPU only).

kernels: masked LayerNorm forward and forward+backward, bf16 activations, fp32
weight/bias/mask, rows x hidden with ~64 MiB of input, for every implementation
in one process so that ratios are side by side.  Bytes are counted as in
../shared/bench/anchor_baselines.py: forward = read x + write y, forward+backward
adds read x, read dy, write dx (weights and statistics are negligible).

Two timings per implementation:

* **device** (the headline): the call (forward, or forward + ``autograd.grad``)
  captured ``CALLS`` times in one CUDA graph and replayed; the median per call
  over the replays.  This is the GPU's time with host launch overhead removed for
  every implementation alike, which is what a training step sees when the host
  runs ahead of the GPU (as it does in a real step, and under CUDA graphs).
* **host-inclusive**: ``triton.testing.do_bench`` of one eager call with the L2
  flushed before it.  When the host's Python + launch time exceeds the GPU time
  this measures the host (docs/kernel_notes.md); kept for comparison.

mask-overhead: one GPT-2-small training step (bf16 autocast, fused AdamW) of the
model itself with the masks of a growth ramp active, against the same model with
the masks removed; the variants' timing windows are interleaved so drift hits all alike.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from megatron_msg import kernels
from megatron_msg.kernels.reference import masked_layer_norm_reference

WIDTHS = (768, 1024, 4096, 10240)
INPUT_BYTES = 2 ** 26  # ~64 MiB of bf16 input, as the anchor
EPS = 1e-5
CALLS = 20     # calls captured per CUDA graph
REPLAYS = 15   # graph replays timed (median reported)


def host_inclusive_ms(fn, grad_to_none=None) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")


def device_ms(fn, calls: int = CALLS, replays: int = REPLAYS) -> float:
    """Median GPU time per call of ``fn`` from CUDA-graph replays (no host launch overhead).

    Warm-up runs on a side stream (Triton JIT, allocator), as graph capture requires.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    del graph
    return statistics.median(times)


def _make_mask(n: int, device) -> torch.Tensor:
    c = torch.ones(n, device=device)
    c[n * 3 // 4:] = 0.3  # a ramp in progress on the newest quarter of the units
    return c


def ln_impls(n: int):
    """name -> callable(x, w, b, c, wb, bb) building the forward; a string when unavailable.

    Ours and the masked references take fp32 w/b (the model's parameters);
    F.layer_norm and apex take bf16 copies (wb, bb), as an unmasked bf16 model would.
    """
    impls = {
        "triton": lambda x, w, b, c, wb, bb: kernels.masked_layer_norm(x, w, b, c, EPS, backend="triton"),
    }
    try:
        from megatron_msg.kernels import cuda_ext
        cuda_ext.load()
        impls["cuda"] = lambda x, w, b, c, wb, bb: kernels.masked_layer_norm(x, w, b, c, EPS, backend="cuda")
    except Exception as exc:  # reported, not fatal
        impls["cuda"] = f"unavailable: {exc!r}"[:300]
    impls["torch_ln"] = lambda x, w, b, c, wb, bb: F.layer_norm(x, (n,), wb, bb, EPS)
    impls["eager_masked"] = lambda x, w, b, c, wb, bb: masked_layer_norm_reference(x, w, b, c, EPS)
    compiled = torch.compile(masked_layer_norm_reference)
    impls["compiled_masked"] = lambda x, w, b, c, wb, bb: compiled(x, w, b, c, EPS)
    try:
        from apex.normalization.fused_layer_norm import fused_layer_norm_affine
        impls["apex_ln"] = lambda x, w, b, c, wb, bb: fused_layer_norm_affine(x, wb, bb, (n,), EPS)
    except Exception:
        impls["apex_ln"] = "unavailable: apex not importable"
    return impls


UNMASKED = ("torch_ln", "apex_ln")


def bench_layernorm(widths=WIDTHS, dtype=torch.bfloat16, only=None, log=print) -> list[dict]:
    dev = "cuda"
    rows = []
    for n in widths:
        m = INPUT_BYTES // (n * torch.tensor([], dtype=dtype).element_size())
        torch.manual_seed(n)
        x = torch.randn(m, n, device=dev, dtype=dtype, requires_grad=True)
        w = torch.randn(n, device=dev, requires_grad=True)
        b = torch.randn(n, device=dev, requires_grad=True)
        wb = w.detach().to(dtype).requires_grad_()
        bb = b.detach().to(dtype).requires_grad_()
        c = _make_mask(n, dev)
        dy = torch.randn(m, n, device=dev, dtype=dtype)
        elt = x.element_size()
        bytes_f = 2 * m * n * elt
        bytes_fb = bytes_f + 3 * m * n * elt
        with torch.no_grad():  # fp32 reference on a sample of rows for the error column
            ref_y = masked_layer_norm_reference(x[:4096].float(), w, b, c, EPS)
        row = {"N": n, "M": m}
        for name, make in ln_impls(n).items():
            if only and name not in only:
                continue
            if isinstance(make, str):
                row[name] = make
                continue
            row[name] = _bench_one(name, make, (x, w, b, c, wb, bb), dy, ref_y, bytes_f, bytes_fb)
        rows.append(row)
        log(json.dumps(row))
        x = dy = None  # free before empty_cache
        torch.cuda.empty_cache()
    return rows


def _bench_one(name, make, args, dy, ref_y, bytes_f, bytes_fb) -> dict | str:
    x, w, b, c, wb, bb = args
    wrt = (x, wb, bb) if name in UNMASKED else (x, w, b)

    def fwd():
        return make(*args)

    def fwd_bwd():
        return torch.autograd.grad(make(*args), wrt, dy)

    try:
        y = fwd()
        err = None if name in UNMASKED else float((y[:4096].detach().float() - ref_y).abs().max())
        del y
        res = {"max_abs_err_vs_fp32": err}
        for key, fn, nbytes in (("fwd", fwd, bytes_f), ("fb", fwd_bwd, bytes_fb)):
            try:
                ms = device_ms(fn)
                res[f"{key}_ms"], res[f"{key}_GBps"] = round(ms, 4), round(nbytes / ms / 1e6)
            except Exception as exc:  # a graph that cannot be captured is reported, not fatal
                res[f"{key}_error"] = f"graph: {exc!r}"[:200]
            ms = host_inclusive_ms(fn)
            res[f"{key}_host_ms"], res[f"{key}_host_GBps"] = round(ms, 4), round(nbytes / ms / 1e6)
        return res
    except Exception as exc:
        return f"error: {exc!r}"[:300]


def copy_bandwidth() -> float:
    x = torch.empty(2 ** 30, dtype=torch.bfloat16, device="cuda").normal_()
    y = torch.empty_like(x)
    ms = host_inclusive_ms(lambda: y.copy_(x))
    x = y = None  # free before empty_cache
    torch.cuda.empty_cache()
    return 2 * 2 ** 30 * 2 / ms / 1e6


# ---------------------------------------------------------------------------
# launch-configuration sweep of the Triton kernels (sets the heuristics in triton_masked_ln)

def _fwd_candidates(n: int) -> list[dict]:
    import triton
    bn = triton.next_power_of_2(n)
    out = [{"variant": "rows", "block_m": bm, "num_warps": nw}
           for bm in (1, 2, 4, 8) for nw in (4, 8) if bm * bn <= 16384]
    if n > 1024:
        out += [{"variant": "split", "block_m": bm, "num_warps": nw} for bm in (1, 2) for nw in (4, 8)]
        out += [{"variant": "chunked", "chunk": ch, "num_warps": nw} for ch, nw in ((1024, 4), (2048, 8))]
    return out


def _bwd_candidates(n: int) -> list[dict]:
    import triton
    bn = triton.next_power_of_2(n)
    out = [{"variant": "rows", "block_m": bm, "num_warps": nw, "per_sm": ps}
           for bm in (1, 2, 4) for nw in (4, 8) for ps in (1, 2) if bm * bn <= 8192]
    if n > 1024:
        out += [{"variant": "split", "block_m": 1, "num_warps": nw, "per_sm": ps} for nw in (4, 8) for ps in (1, 2)]
        out += [{"variant": "chunked", "chunk": 2048, "num_warps": 16, "per_sm": 1}]
    return out


def _sweep_inputs(n: int):
    """(rows, x bf16, w, b, c fp32) of ~64 MiB for width n, the same in every sweep."""
    m = INPUT_BYTES // (n * 2)
    torch.manual_seed(n)
    x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    w, b = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")
    return m, x, w, b, _make_mask(n, "cuda")


def sweep_triton(widths=WIDTHS, log=print) -> list[dict]:
    """Device time (CUDA graphs) of each candidate launch, calling the launchers directly."""
    from megatron_msg.kernels import triton_masked_ln as tml
    out = []
    for n in widths:
        m, x, w, b, c = _sweep_inputs(n)
        dy = torch.randn_like(x)
        y_ref, mean, rstd, _ = tml.masked_ln_fwd(x, w, b, c, EPS)
        dx_ref = tml.masked_ln_bwd(dy, x, w, c, mean, rstd)[0]
        for kw in _fwd_candidates(n):
            rec = {"N": n, "pass": "fwd", **kw}
            try:
                y = tml.masked_ln_fwd(x, w, b, c, EPS, **kw)[0]
                rec["max_abs_diff_vs_default"] = float((y.float() - y_ref.float()).abs().max())
                ms = device_ms(lambda: tml.masked_ln_fwd(x, w, b, c, EPS, **kw))
                rec.update(ms=round(ms, 4), GBps=round(2 * m * n * 2 / ms / 1e6))
            except Exception as exc:
                rec["error"] = repr(exc)[:200]
            out.append(rec)
        for kw in _bwd_candidates(n):
            rec = {"N": n, "pass": "bwd", **kw}
            try:
                dx = tml.masked_ln_bwd(dy, x, w, c, mean, rstd, **kw)[0]
                rec["max_abs_diff_vs_default"] = float((dx.float() - dx_ref.float()).abs().max())
                ms = device_ms(lambda: tml.masked_ln_bwd(dy, x, w, c, mean, rstd, **kw))
                rec.update(ms=round(ms, 4), GBps=round(3 * m * n * 2 / ms / 1e6))
            except Exception as exc:
                rec["error"] = repr(exc)[:200]
            out.append(rec)
        for p in ("fwd", "bwd"):
            ranked = sorted((r for r in out if r["N"] == n and r["pass"] == p and "GBps" in r),
                            key=lambda r: -r["GBps"])
            log(json.dumps({"N": n, "pass": p, "top3": ranked[:3]}))
        x = dy = None  # free before empty_cache
        torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------------------
# report

IMPLS = ["triton", "cuda", "torch_ln", "eager_masked", "compiled_masked", "apex_ln"]


def markdown_table(res: dict) -> str:
    lines = [f"Device: {res['device']}; torch {res['torch']}, triton {res['triton']}; "
             f"copy bandwidth {res['copy_GBps']:.0f} GB/s (read+write).", "",
             f"device = median GPU time per call over CUDA-graph replays ({CALLS} calls per graph, "
             f"{REPLAYS} replays); host = do_bench of one eager call (L2 flushed), which includes host "
             "launch time when the host is the slower side.", "",
             "| hidden | rows | impl | fwd ms | fwd GB/s | fwd+bwd ms | fwd+bwd GB/s | host fwd ms | host fwd+bwd ms "
             "| max abs err |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in res["layernorm"]:
        for name in IMPLS:
            v = row.get(name)
            if v is None:
                continue
            if isinstance(v, str):
                lines.append(f"| {row['N']} | {row['M']} | {name} | {v[:60]} | | | | | | |")
                continue
            err = "" if v.get("max_abs_err_vs_fp32") is None else f"{v['max_abs_err_vs_fp32']:.3g}"
            lines.append(f"| {row['N']} | {row['M']} | {name} | {v.get('fwd_ms', 'n/a')} | "
                         f"{v.get('fwd_GBps', 'n/a')} | {v.get('fb_ms', 'n/a')} | {v.get('fb_GBps', 'n/a')} | "
                         f"{v.get('fwd_host_ms')} | {v.get('fb_host_ms')} | {err} |")
    lines += ["", "Ratios (device times, same run): F.layer_norm fwd+bwd / ours, eager masked fwd+bwd / ours.", "",
              "| hidden | triton fwd GB/s | cuda fwd GB/s | torch_ln fb / triton fb | torch_ln fb / cuda fb "
              "| eager fb / triton fb | eager fb / cuda fb |", "|---:|---:|---:|---:|---:|---:|---:|"]
    lines += _ratio_rows(res)
    return "\n".join(lines) + "\n"


def _ratio_rows(res: dict) -> list[str]:
    lines = []
    for row in res["layernorm"]:
        def get(name, k):
            v = row.get(name)
            return v.get(k) if isinstance(v, dict) else None

        def ratio(a, b):
            return f"{get(a, 'fb_ms') / get(b, 'fb_ms'):.2f}x" if get(a, "fb_ms") and get(b, "fb_ms") else "n/a"
        lines.append(f"| {row['N']} | {get('triton', 'fwd_GBps') or 'n/a'} | {get('cuda', 'fwd_GBps') or 'n/a'} | "
                     f"{ratio('torch_ln', 'triton')} | {ratio('torch_ln', 'cuda')} | "
                     f"{ratio('eager_masked', 'triton')} | {ratio('eager_masked', 'cuda')} |")
    return lines


def _require_gpu(what: str) -> None:
    if not torch.cuda.is_available():
        raise SystemExit(f"msg-bench {what} needs a CUDA GPU")


def _header() -> dict:
    import triton
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d"), "dtype": "bfloat16", "input_bytes": INPUT_BYTES}


def _write_json(path: Path, obj) -> None:
    """Atomic: a run killed mid-write leaves the previous file, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def run_kernels(out_dir: str, widths=WIDTHS, only=None) -> dict:
    _require_gpu("kernels")
    res = _header()
    res["copy_GBps"] = copy_bandwidth()
    print(f"copy {res['copy_GBps']:.0f} GB/s", flush=True)
    res["layernorm"] = bench_layernorm(widths, only=only, log=lambda s: print(s, flush=True))
    out = Path(out_dir)
    _write_json(out / "kernels.json", res)
    md = markdown_table(res)
    (out / "kernels.md").write_text(md)
    print(md, flush=True)
    return res


CUDA_FWD_CANDIDATES = ({"variant": "registers"},) + tuple(
    {"variant": "staged", "stages": s, "hold": False} for s in (4, 6)) + tuple(
    {"variant": "staged_bulk_y", "stages": s, "hold": h, "pdl": p}
    for s in (6, 8) for h in (False, True) for p in (False, True)) + ({"variant": "auto"},)


def _forward_references(n, x, w, b, c) -> dict:
    """Same-input forward baselines timed next to the CUDA candidates: a plain copy of x
    (the bandwidth ceiling at this size), F.layer_norm, and our Triton forward."""
    from megatron_msg.kernels import triton_masked_ln as tml
    wb, bb = w.bfloat16(), b.bfloat16()
    return {"copy": lambda: x.clone(),
            "torch_ln": lambda: F.layer_norm(x, (n,), wb, bb, EPS),
            "triton": lambda: tml.masked_ln_fwd(x, w, b, c, EPS)}


def sweep_cuda_fwd(widths=WIDTHS, log=print) -> list[dict]:
    """Device time of the CUDA extension's forward kernels (sets its ``auto`` rule in csrc/)."""
    from megatron_msg.kernels import cuda_ext
    try:
        cuda_ext.load()
    except Exception as exc:  # reported, not fatal: the Triton sweep stands alone
        return [{"impl": "cuda", "error": f"unavailable: {exc!r}"[:300]}]
    out = []
    for n in widths:
        m, x, w, b, c = _sweep_inputs(n)
        with torch.no_grad():
            y_ref = masked_layer_norm_reference(x[:4096].float(), w, b, c, EPS)
        for name, fn in _forward_references(n, x, w, b, c).items():
            ms = device_ms(fn)
            rec = {"N": n, "pass": "fwd", "impl": name, "ms": round(ms, 4), "GBps": round(2 * m * n * 2 / ms / 1e6)}
            out.append(rec)
            log(json.dumps(rec))
        for kw in CUDA_FWD_CANDIDATES:
            rec = {"N": n, "pass": "fwd", "impl": "cuda", **kw}
            try:
                y = cuda_ext.fwd(x, w, b, c, EPS, **kw)[0]
                rec["max_abs_err_vs_fp32"] = float((y[:4096].float() - y_ref).abs().max())
                ms = device_ms(lambda: cuda_ext.fwd(x, w, b, c, EPS, **kw))
                rec.update(ms=round(ms, 4), GBps=round(2 * m * n * 2 / ms / 1e6))
            except Exception as exc:
                rec["error"] = repr(exc)[:200]
            out.append(rec)
            log(json.dumps(rec))
        x = None  # free before empty_cache
        torch.cuda.empty_cache()
    return out


def run_sweep(out_dir: str, widths=WIDTHS, cuda_only: bool = False) -> dict:
    _require_gpu("kernel-sweep")
    res = _header()
    if not cuda_only:
        res["sweep"] = sweep_triton(widths, log=lambda s: print(s, flush=True))
    res["sweep_cuda_fwd"] = sweep_cuda_fwd(widths, log=lambda s: print(s, flush=True))
    _write_json(Path(out_dir) / ("sweep_cuda.json" if cuda_only else "sweep.json"), res)
    return res


# ---------------------------------------------------------------------------
# GPT-2-small step with and without masks

def _ramp_masks(model) -> None:
    """Masks of a ramp in progress: the newest quarter of each dimension at 0.3, depth masks 1."""
    with torch.no_grad():
        for buf in model.mask_buffers().values():
            if buf.dim() == 1:
                buf[buf.numel() * 3 // 4:] = 0.3


def run_mask_overhead(out_dir: str, batch: int = 16, steps: int = 20, windows: int = 5,
                      compile_model: bool = False, log=print) -> dict:
    """Training-step time of the model mid-ramp (masked path) vs the same model unmasked.

    One model and optimizer; each variant flips ``model.masked`` and the kernel
    backend (``MSG_KERNEL_BACKEND``) and runs ``steps`` timed steps per window, the
    variants' windows interleaved; the median window per variant is reported.
    """
    _require_gpu("mask-overhead")
    from megatron_msg.config import ModelConfig
    from megatron_msg.model.gpt import GPT
    cfg = ModelConfig(arch="gpt", hidden=768, ffn=3072, heads=12, head_dim=64, layers=12,
                      vocab_size=50304, seq_len=1024)
    dev = "cuda"
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "config": "GPT-2 small (768, 3072, 12, 12), T=1024, bf16 autocast, fused AdamW",
           "batch": batch, "steps_per_window": steps, "windows": windows, "date": time.strftime("%Y-%m-%d"),
           "compiled": compile_model, "rows": []}
    torch.manual_seed(0)
    model = GPT(cfg).to(dev)
    _ramp_masks(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    idx = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len), device=dev)
    tgt = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len), device=dev)
    fwd = torch.compile(model) if compile_model else model

    def step():
        with torch.autocast("cuda", torch.bfloat16):
            _, loss = fwd(idx, tgt)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    # (label, masked, MSG_KERNEL_BACKEND); under torch.compile "auto" traces the reference
    # and Inductor fuses it, "triton" puts the fused kernels in the graph as custom ops.
    variants = [("no masks (fast path)", False, "auto"),
                ("ramp, fused kernels (auto: Triton)" if not compile_model else "ramp, auto (Inductor-fused reference)",
                 True, "auto")]
    if compile_model:
        variants.append(("ramp, Triton custom ops", True, "triton"))
    else:
        variants.append(("ramp, reference kernels (PyTorch)", True, "reference"))
        try:
            from megatron_msg.kernels import cuda_ext
            cuda_ext.load()
            variants.append(("ramp, CUDA-extension LayerNorm", True, "cuda"))
        except Exception as exc:
            log(f"cuda extension unavailable: {exc!r}"[:300])
    # Eager: every variant's windows interleaved in one phase.  Compiled: the backend is
    # read while tracing and is not a guard, so each backend is its own phase after a
    # dynamo reset (``model.masked`` is guarded: both values stay cached within a phase).
    phases = [variants] if not compile_model else \
        [[v for v in variants if v[2] == be] for be in dict.fromkeys(v[2] for v in variants)]
    old = os.environ.get("MSG_KERNEL_BACKEND")
    times: dict[str, list[float]] = {v[0]: [] for v in variants}
    losses: dict[str, float] = {}
    try:
        for phase in phases:
            if compile_model:
                torch._dynamo.reset()
            for label, masked, backend in phase:  # warm-up (and compiles) per variant
                model.set_masked(masked)
                os.environ["MSG_KERNEL_BACKEND"] = backend
                for _ in range(3):
                    step()
            for _ in range(windows):
                for label, masked, backend in phase:
                    model.set_masked(masked)
                    os.environ["MSG_KERNEL_BACKEND"] = backend
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    for _ in range(steps):
                        loss = step()
                    torch.cuda.synchronize()
                    times[label].append((time.perf_counter() - t0) / steps * 1e3)
                    losses[label] = float(loss.detach())
    finally:
        if old is None:
            os.environ.pop("MSG_KERNEL_BACKEND", None)
        else:
            os.environ["MSG_KERNEL_BACKEND"] = old
    base = statistics.median(times[variants[0][0]])
    for label, _, backend in variants:
        med = statistics.median(times[label])
        row = {"label": label, "backend": backend, "step_ms": round(med, 2),
               "windows_ms": [round(t, 2) for t in times[label]], "overhead_vs_nomask": round(med / base - 1, 4),
               "last_loss": losses[label]}
        res["rows"].append(row)
        log(json.dumps(row))
    out = Path(out_dir)
    suffix = "_compiled" if compile_model else ""
    _write_json(out / f"mask_overhead{suffix}.json", res)
    lines = ["| variant | step ms (median window) | overhead vs no masks | windows ms |", "|---|---:|---:|---|"]
    lines += [f"| {r['label']} | {r['step_ms']} | {100 * r['overhead_vs_nomask']:+.1f}% | "
              f"{', '.join(str(t) for t in r['windows_ms'])} |" for r in res["rows"]]
    md = "\n".join(lines) + "\n"
    (out / f"mask_overhead{suffix}.md").write_text(md)
    log(md)
    return res
