"""Benchmarks behind ``msg-bench kernels`` and ``msg-bench mask-overhead`` (GPU only).

kernels: masked LayerNorm forward and forward+backward, bf16 activations, fp32
weight/bias/mask, rows x hidden with ~64 MiB of input, for every implementation
in one process so that ratios are side by side.  Bytes are counted as in
../shared/bench/anchor_baselines.py: forward = read x + write y, forward+backward
adds read x, read dy, write dx (weights and statistics are negligible).

mask-overhead: one GPT-2-small training step (bf16 autocast, fused AdamW) with
the masks of a growth ramp active against the same model with the masks removed.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from megatron_msg import kernels
from megatron_msg.model.masked_norm import masked_layer_norm_reference

WIDTHS = (768, 1024, 4096, 10240)
INPUT_BYTES = 2 ** 26  # ~64 MiB of bf16 input, as the anchor


def _bench(fn, grad_to_none=None) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")


def _make_mask(n: int, device) -> torch.Tensor:
    c = torch.ones(n, device=device)
    c[n * 3 // 4:] = 0.3  # a ramp in progress on the newest quarter of the units
    return c


def ln_impls(n: int):
    """name -> callable(x, w, b, c, wb, bb) building the forward; None when unavailable."""
    eps = 1e-5
    impls = {
        "triton": lambda x, w, b, c, wb, bb: kernels.masked_layer_norm(x, w, b, c, eps, backend="triton"),
    }
    try:
        from megatron_msg.kernels import cuda_ext
        cuda_ext.load()
        impls["cuda"] = lambda x, w, b, c, wb, bb: kernels.masked_layer_norm(x, w, b, c, eps, backend="cuda")
    except Exception as exc:  # reported, not fatal
        impls["cuda"] = f"unavailable: {exc!r}"[:300]
    impls["torch_ln"] = lambda x, w, b, c, wb, bb: F.layer_norm(x, (n,), wb, bb, eps)
    impls["eager_masked"] = lambda x, w, b, c, wb, bb: masked_layer_norm_reference(x, w, b, c, eps)
    compiled = torch.compile(masked_layer_norm_reference)
    impls["compiled_masked"] = lambda x, w, b, c, wb, bb: compiled(x, w, b, c, eps)
    try:
        from apex.normalization import FusedLayerNorm  # noqa: F401
        from apex.normalization.fused_layer_norm import fused_layer_norm_affine
        impls["apex_ln"] = lambda x, w, b, c, wb, bb: fused_layer_norm_affine(x, wb, bb, (n,), eps)
    except Exception:
        impls["apex_ln"] = "unavailable: apex not importable"
    return impls


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
        byt_f = 2 * m * n * elt
        byt_fb = byt_f + 3 * m * n * elt
        # fp32 reference on a sample of rows for the error column
        with torch.no_grad():
            ref_y = masked_layer_norm_reference(x[:4096].float(), w, b, c, 1e-5)
        row = {"N": n, "M": m}
        for name, make in ln_impls(n).items():
            if only and name not in only:
                continue
            if isinstance(make, str):
                row[name] = make
                continue
            try:
                fn = lambda: make(x, w, b, c, wb, bb)  # noqa: E731
                y = fn()
                err = None
                if name not in ("torch_ln", "apex_ln"):
                    err = float((y[:4096].detach().float() - ref_y).abs().max())
                f_ms = _bench(fn)

                def fb():
                    fn().backward(dy)
                fb_ms = _bench(fb, grad_to_none=[x, w, b, wb, bb])
                row[name] = {"fwd_ms": round(f_ms, 4), "fwd_GBps": round(byt_f / f_ms / 1e6),
                             "fb_ms": round(fb_ms, 4), "fb_GBps": round(byt_fb / fb_ms / 1e6),
                             "max_abs_err_vs_fp32": err}
            except Exception as exc:
                row[name] = f"error: {exc!r}"[:300]
        rows.append(row)
        log(json.dumps(row))
        del x, dy
        torch.cuda.empty_cache()
    return rows


def copy_bandwidth() -> float:
    x = torch.empty(2 ** 30, dtype=torch.bfloat16, device="cuda").normal_()
    y = torch.empty_like(x)
    ms = _bench(lambda: y.copy_(x))
    del x, y
    torch.cuda.empty_cache()
    return 2 * 2 ** 30 * 2 / ms / 1e6


def sweep_triton(widths=WIDTHS, log=print) -> list[dict]:
    """Forward/backward launch configurations of the Triton kernel (used to set the heuristics)."""
    from megatron_msg.kernels import triton_masked_ln as tml
    out = []
    for n in widths:
        m = INPUT_BYTES // (n * 2)
        x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, device="cuda")
        b = torch.randn(n, device="cuda")
        c = _make_mask(n, "cuda")
        dy = torch.randn_like(x)
        _, mean, rstd, _ = tml.masked_ln_fwd(x, w, b, c, 1e-5)
        bn = 1 << (n - 1).bit_length()
        for bm in (1, 2, 4, 8, 16):
            if bm * bn > 16384:
                continue
            for nw in (4, 8, 16):
                try:
                    ms = _bench(lambda: tml.masked_ln_fwd(x, w, b, c, 1e-5, block_m=bm, num_warps=nw))
                    out.append({"N": n, "pass": "fwd", "block_m": bm, "num_warps": nw, "ms": round(ms, 4),
                                "GBps": round(2 * m * n * 2 / ms / 1e6)})
                except Exception as exc:
                    out.append({"N": n, "pass": "fwd", "block_m": bm, "num_warps": nw, "error": repr(exc)[:200]})
                for per_sm in (1, 2, 4):
                    if bm * bn > 8192 and bm > 1:
                        continue
                    g = torch.cuda.get_device_properties(0).multi_processor_count * per_sm
                    try:
                        ms = _bench(lambda: tml.masked_ln_bwd(dy, x, w, c, mean, rstd, block_m=bm, num_warps=nw,
                                                              programs=g))
                        out.append({"N": n, "pass": "bwd", "block_m": bm, "num_warps": nw, "per_sm": per_sm,
                                    "ms": round(ms, 4), "GBps": round(3 * m * n * 2 / ms / 1e6)})
                    except Exception as exc:
                        out.append({"N": n, "pass": "bwd", "block_m": bm, "num_warps": nw, "per_sm": per_sm,
                                    "error": repr(exc)[:200]})
        for p in ("fwd", "bwd"):
            mine = sorted((r for r in out if r["N"] == n and r["pass"] == p and "GBps" in r),
                          key=lambda r: -r["GBps"])
            log(json.dumps({"N": n, "pass": p, "top3": mine[:3]}))
        del x, dy
        torch.cuda.empty_cache()
    return out


def markdown_table(res: dict) -> str:
    names = ["triton", "cuda", "torch_ln", "eager_masked", "compiled_masked", "apex_ln"]
    lines = [f"Device: {res['device']}; torch {res['torch']}, triton {res['triton']}; "
             f"copy bandwidth {res['copy_GBps']:.0f} GB/s (read+write).", "",
             "Timing: triton.testing.do_bench (median, L2 flushed before each call); it includes host "
             "launch overhead whenever the host is slower than the GPU.", "",
             "| hidden | rows | impl | fwd ms | fwd GB/s | fwd+bwd ms | fwd+bwd GB/s | max abs err |",
             "|---:|---:|---|---:|---:|---:|---:|---:|"]
    for row in res["layernorm"]:
        for name in names:
            v = row.get(name)
            if v is None:
                continue
            if isinstance(v, str):
                lines.append(f"| {row['N']} | {row['M']} | {name} | {v[:60]} | | | | |")
                continue
            err = "" if v["max_abs_err_vs_fp32"] is None else f"{v['max_abs_err_vs_fp32']:.3g}"
            lines.append(f"| {row['N']} | {row['M']} | {name} | {v['fwd_ms']:.4f} | {v['fwd_GBps']} | "
                         f"{v['fb_ms']:.4f} | {v['fb_GBps']} | {err} |")
    for key, title in (("fb_ms", "do_bench"),):
        lines += ["", f"Ratios ({title}, same run): fwd+bwd time of F.layer_norm / ours, eager masked / ours.", "",
                  "| hidden | triton fwd GB/s | cuda fwd GB/s | torch_ln fb / triton fb | torch_ln fb / cuda fb "
                  "| eager fb / triton fb | eager fb / cuda fb |", "|---:|---:|---:|---:|---:|---:|---:|"]
        lines += _ratio_rows(res, key)
    return "\n".join(lines) + "\n"


def _ratio_rows(res: dict, key: str) -> list[str]:
    fkey = "fwd_GBps"
    lines = []
    for row in res["layernorm"]:
        def get(name, k):
            v = row.get(name)
            return v.get(k) if isinstance(v, dict) else None

        def ratio(a, b):
            return f"{a / b:.2f}x" if a and b else "n/a"
        lines.append(f"| {row['N']} | {get('triton', fkey)} | {get('cuda', fkey)} | "
                     f"{ratio(get('torch_ln', key), get('triton', key))} | "
                     f"{ratio(get('torch_ln', key), get('cuda', key))} | "
                     f"{ratio(get('eager_masked', key), get('triton', key))} | "
                     f"{ratio(get('eager_masked', key), get('cuda', key))} |")
    return lines


def run_kernels(out_dir: str, widths=WIDTHS, sweep: bool = False, only=None) -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("msg-bench kernels needs a CUDA GPU")
    import triton
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "date": time.strftime("%Y-%m-%d"), "dtype": "bfloat16", "input_bytes": INPUT_BYTES}
    res["copy_GBps"] = copy_bandwidth()
    print(f"copy {res['copy_GBps']:.0f} GB/s", flush=True)
    if sweep:
        res["triton_sweep"] = sweep_triton(widths, log=lambda s: print(s, flush=True))
    res["layernorm"] = bench_layernorm(widths, only=only, log=lambda s: print(s, flush=True))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels.json").write_text(json.dumps(res, indent=1))
    md = markdown_table(res)
    (out / "kernels.md").write_text(md)
    print(md, flush=True)
    return res


# ---------------------------------------------------------------------------
# GPT-2-small step with and without masks

def _fused_pre(layer, x, c, fm, hm, depth_c):
    """Pre-LN layer with every mask fused (a drop-in for transformer.Layer._pre + depth_mix).

    LN1 -> masked LN kernel; head mask and hidden mask folded into the output
    projection; residual add fused into LN2; FFN and hidden masks folded into
    fc2; the final residual add fused with the depth mix.
    """
    attn, mlp = layer.attn, layer.mlp
    bsz, t, _ = x.shape
    y1 = kernels.masked_layer_norm(x, layer.ln1.weight, layer.ln1.bias, c, layer.ln1.eps)
    q, k, v = attn.qkv(y1).view(bsz, t, 3, attn.heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    o = o.transpose(1, 2).reshape(bsz, t, attn.heads * attn.head_dim)
    a = kernels.masked_linear(o, attn.proj.weight, attn.proj.bias,
                              in_mask=kernels.head_columns(hm, attn.head_dim), out_mask=c)
    y2, h = kernels.add_masked_layer_norm(x, a, layer.ln2.weight, layer.ln2.bias, c, layer.ln2.eps)
    u = mlp.act(mlp.fc1(y2))
    f = kernels.masked_linear(u, mlp.fc2.weight, mlp.fc2.bias, in_mask=fm, out_mask=c)
    return kernels.depth_residual_add(x, h, f, depth_c)


def _install_fused_forward(model) -> None:
    """Route the model's masked path through _fused_pre (benchmark only; the model's own code is unchanged)."""
    import types

    def layer_forward(self, x, hidden_mask, attn_mask=None):
        if hidden_mask is None or attn_mask is not None or not self.pre_ln:
            return type(self).forward(self, x, hidden_mask, attn_mask)
        return _fused_pre(self, x, hidden_mask, self.ffn_mask, self.head_mask, self.depth_mask)
    for layer in model.layers:
        layer.forward = types.MethodType(layer_forward, layer)


def run_mask_overhead(out_dir: str, batch: int = 16, steps: int = 20, log=print) -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("msg-bench mask-overhead needs a CUDA GPU")
    from megatron_msg.config import ModelConfig
    from megatron_msg.model.gpt import GPT
    cfg = ModelConfig(arch="gpt", hidden=768, ffn=3072, heads=12, head_dim=64, layers=12,
                      vocab_size=50304, seq_len=1024)
    dev = "cuda"
    res = {"device": torch.cuda.get_device_name(), "config": "GPT-2 small (768, 3072, 12, 12), T=1024",
           "batch": batch, "date": time.strftime("%Y-%m-%d"), "rows": []}

    def measure(label, masked, backend, fused):
        torch.manual_seed(0)
        model = GPT(cfg).to(dev)
        with torch.no_grad():  # masks of a ramp in progress: newest quarter of each dim at 0.3
            for name, buf in model.mask_buffers().items():
                if buf.dim() == 1:
                    buf[buf.numel() * 3 // 4:] = 0.3
        model.set_masked(masked)
        if fused:
            _install_fused_forward(model)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
        idx = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len), device=dev)
        tgt = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len), device=dev)
        old = os.environ.get("MSG_KERNEL_BACKEND")
        if backend:
            os.environ["MSG_KERNEL_BACKEND"] = backend
        try:
            def step():
                with torch.autocast("cuda", torch.bfloat16):
                    _, loss = model(idx, tgt)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss
            for _ in range(3):
                loss = step()
            times = []
            for _ in range(3):  # three timed windows; the median is reported
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(steps):
                    loss = step()
                torch.cuda.synchronize()
                times.append((time.perf_counter() - t0) / steps * 1e3)
        finally:
            if backend:
                if old is None:
                    os.environ.pop("MSG_KERNEL_BACKEND", None)
                else:
                    os.environ["MSG_KERNEL_BACKEND"] = old
        row = {"label": label, "step_ms": round(sorted(times)[1], 2), "windows_ms": [round(t, 2) for t in times],
               "loss": float(loss)}
        log(json.dumps(row))
        del model, opt
        torch.cuda.empty_cache()
        return row

    # Function preservation of the fused path (same outputs as the model's own masked path)
    torch.manual_seed(0)
    m1 = GPT(cfg).to(dev)
    with torch.no_grad():
        for name, buf in m1.mask_buffers().items():
            if buf.dim() == 1:
                buf[buf.numel() * 3 // 4:] = 0.3
            else:
                buf.fill_(0.6)
    m1.set_masked(True)
    idx = torch.randint(0, cfg.vocab_size, (2, 256), device=dev)
    with torch.no_grad():
        ref_logits = m1(idx)
        _install_fused_forward(m1)
        fused_logits = m1(idx)
    res["fused_vs_model_max_abs_logit_diff_fp32"] = float((ref_logits - fused_logits).abs().max())
    log(f"fused path vs model masked path, fp32 logits max |diff| = {res['fused_vs_model_max_abs_logit_diff_fp32']:.3g}")
    del m1
    torch.cuda.empty_cache()

    res["rows"].append(measure("no masks (fast path)", False, None, False))
    res["rows"].append(measure("masks, model as written, reference kernels", True, "reference", False))
    res["rows"].append(measure("masks, model as written, triton kernels", True, None, False))
    res["rows"].append(measure("masks, fused path (folded masks + fused kernels)", True, None, True))
    res["rows"].append(measure("no masks (fast path, repeat)", False, None, False))
    base = min(res["rows"][0]["step_ms"], res["rows"][-1]["step_ms"])
    for r in res["rows"]:
        r["overhead_vs_nomask"] = round(r["step_ms"] / base - 1, 4)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mask_overhead.json").write_text(json.dumps(res, indent=1))
    lines = ["| variant | step ms | overhead vs no masks |", "|---|---:|---:|"]
    lines += [f"| {r['label']} | {r['step_ms']} | {100 * r['overhead_vs_nomask']:+.1f}% |" for r in res["rows"]]
    md = "\n".join(lines) + "\n"
    (out / "mask_overhead.md").write_text(md)
    log(md)
    return res
