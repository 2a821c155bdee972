"""Fused MSG kernels on a CUDA GPU (skipped without one): bf16/fp16/fp32, Triton and CUDA backends,
and the custom ops (opcheck, torch.compile fullgraph with Inductor, CUDA-graph capture)."""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from megatron_msg import kernels  # noqa: E402
from megatron_msg.kernels import cuda_ext  # noqa: E402
from megatron_msg.kernels.backend import resolve  # noqa: E402
from megatron_msg.kernels.reference import masked_layer_norm_reference as ref  # noqa: E402

DEV = "cuda"
EPS = 1e-5
# bf16/fp16 I/O: output rounding dominates; grads of w/b sum over many rows
TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-3, 5e-3), torch.bfloat16: (1.6e-2, 3e-2)}


def backends():
    out = ["triton"]
    if cuda_ext.available():
        out.append("cuda")
    return out


def make_mask(kind, n):
    c = torch.ones(n, device=DEV)
    if kind == "zeros":
        c[n * 3 // 4:] = 0
    elif kind == "ramp":
        c[n * 3 // 4:] = 0.3
    return c


def rel_err(a, b):
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm().clamp_min(1e-30))


def test_auto_dispatch_is_triton_on_cuda(monkeypatch):
    monkeypatch.delenv("MSG_KERNEL_BACKEND", raising=False)
    assert resolve(torch.zeros(1, device=DEV)) == "triton"


def test_cuda_extension_builds():
    cuda_ext.load(verbose=False)
    assert cuda_ext.available()


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [64, 100, 768, 1000, 4096, 10240])
@pytest.mark.parametrize("mask_kind", ["ones", "zeros", "ramp"])
def test_masked_ln_matches_fp64(backend, dtype, n, mask_kind):
    if backend not in backends():
        pytest.skip("CUDA extension not built")
    torch.manual_seed(n)
    m = 257
    x64 = torch.randn(m, n, device=DEV, dtype=torch.float64) * 2 + 0.5
    w64, b64 = torch.randn(n, device=DEV, dtype=torch.float64), torch.randn(n, device=DEV, dtype=torch.float64)
    dy64 = torch.randn(m, n, device=DEV, dtype=torch.float64)
    c = make_mask(mask_kind, n)
    x = x64.to(dtype).requires_grad_()
    w, b = w64.float().requires_grad_(), b64.float().requires_grad_()
    y = kernels.masked_layer_norm(x, w, b, c, EPS, backend=backend)
    assert y.dtype == dtype
    y.backward(dy64.to(dtype))
    xr, wr, br = (t.clone().requires_grad_() for t in (x.detach().double(), w64, b64))
    yr = ref(xr, wr, br, c.double(), EPS)
    yr.backward(dy64.to(dtype).double())
    tol_y, tol_g = TOL[dtype]
    assert rel_err(y, yr) < tol_y
    assert rel_err(x.grad, xr.grad) < tol_g
    assert rel_err(w.grad, wr.grad) < tol_g
    assert rel_err(b.grad, br.grad) < tol_g
    if mask_kind == "zeros":
        assert torch.all(y[:, n * 3 // 4:] == 0)


@pytest.mark.parametrize("variant", ["rows", "split", "chunked"])
@pytest.mark.parametrize("n", [1000, 5120, 10240])
def test_triton_launch_variants_match_fp64(variant, n):
    """Every Triton kernel variant (the sweep in msg-bench picks among them), bf16, fwd + bwd."""
    from megatron_msg.kernels import triton_masked_ln as tml
    torch.manual_seed(n)
    m = 300
    x = (torch.randn(m, n, device=DEV, dtype=torch.float64) * 2 + 3).to(torch.bfloat16)
    w, b, dy = torch.randn(n, device=DEV), torch.randn(n, device=DEV), torch.randn_like(x)
    c = make_mask("ramp", n)
    y, mean, rstd, _ = tml.masked_ln_fwd(x, w, b, c, EPS, variant=variant)
    dx, dw, db = tml.masked_ln_bwd(dy, x, w, c, mean, rstd, variant=variant)
    xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
    yr = ref(xr, wr, br, c.double(), EPS)
    yr.backward(dy.double())
    assert rel_err(y, yr) < TOL[torch.bfloat16][0]
    for got, want in ((dx, xr.grad), (dw, wr.grad), (db, br.grad)):
        assert rel_err(got, want) < TOL[torch.bfloat16][1]


def staged_available() -> bool:
    return "cuda" in backends() and torch.cuda.get_device_capability()[0] >= 9


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1000, 4104, 10240, 16384])
@pytest.mark.parametrize("m", [1, 131, 3001])
@pytest.mark.parametrize("stages", [0, 5])
@pytest.mark.parametrize("variant,hold", [("staged", False), ("staged_bulk_y", False), ("staged_bulk_y", True)])
def test_cuda_staged_forward_matches_fp64(dtype, n, m, stages, variant, hold):
    """The sm_90 staged forward (bulk copies into a shared-memory ring): fewer rows than SMs, rows not
    a multiple of the grid, many rows per persistent block; widths whose vectors do not fill the block."""
    if not staged_available():
        pytest.skip("needs the CUDA extension on an sm_90+ GPU")
    torch.manual_seed(n + m)
    x64 = torch.randn(m, n, device=DEV, dtype=torch.float64) * 2 + 0.5
    w, b = torch.randn(n, device=DEV), torch.randn(n, device=DEV)
    c = make_mask("zeros", n)
    c[n // 2: n * 3 // 4] = 0.3
    x = x64.to(dtype)
    if n * x.element_size() * 4 > torch.cuda.get_device_properties(DEV).shared_memory_per_block_optin:
        with pytest.raises(RuntimeError, match="room for 4"):  # e.g. fp32 16384: 4 rows need 256 KiB
            cuda_ext.fwd(x, w, b, c, EPS, variant=variant, stages=stages, hold=hold)
        return
    y, mean, rstd = cuda_ext.fwd(x, w, b, c, EPS, variant=variant, stages=stages, hold=hold)
    yr = ref(x.double(), w.double(), b.double(), c.double(), EPS)
    assert y.dtype == dtype and y.shape == x.shape
    assert rel_err(y, yr) < TOL[dtype][0]
    cd = c.double()
    mu = (x.double() * cd).sum(-1) / cd.sum()
    var = (((x.double() - mu[:, None]) ** 2) * cd).sum(-1) / cd.sum()
    assert rel_err(mean, mu) < 1e-5
    assert rel_err(rstd, (var + EPS).rsqrt()) < 1e-5
    assert torch.all(y[:, n * 3 // 4:] == 0)
    y_reg = cuda_ext.fwd(x, w, b, c, EPS, variant="registers")[0]
    assert rel_err(y, y_reg) < TOL[dtype][0]


@pytest.mark.parametrize("n", [4096, 10240])
def test_cuda_staged_forward_with_pdl_waits_for_the_previous_kernel(n):
    """Programmatic dependent launch: each call starts while the previous one may still run, so
    a chain whose every input is the previous call's output is right only if the kernel reads
    nothing before griddepcontrol.wait."""
    if not staged_available():
        pytest.skip("needs the CUDA extension on an sm_90+ GPU")
    torch.manual_seed(n)
    w, b = torch.rand(n, device=DEV) + 0.5, torch.randn(n, device=DEV)
    c = make_mask("ramp", n)
    x = torch.randn(4096, n, device=DEV, dtype=torch.bfloat16)
    want = x
    for _ in range(4):
        want = cuda_ext.fwd(want, w, b, c, EPS, variant="staged_bulk_y", pdl=False)[0]
    for _ in range(3):  # the chain in a CUDA graph too (how msg-bench times it)
        got = x
        for _ in range(4):
            got = cuda_ext.fwd(got, w, b, c, EPS, variant="staged_bulk_y", pdl=True)[0]
        assert torch.equal(got, want)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        got = x
        for _ in range(4):
            got = cuda_ext.fwd(got, w, b, c, EPS, variant="staged_bulk_y", pdl=True)[0]
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(got, want)


@pytest.mark.parametrize("n, wide", [(1024, False), (4096, True), (10240, True)])
def test_cuda_forward_auto_picks_staged_for_wide_rows(n, wide):
    """auto = the bulk-copy staged kernel from 8 KiB rows up on sm_90, the registers kernel below;
    the kernels are deterministic, so auto's output equals the chosen one's bit for bit."""
    if "cuda" not in backends():
        pytest.skip("CUDA extension not built")
    x = torch.randn(300, n, device=DEV, dtype=torch.bfloat16)
    w, b, c = torch.randn(n, device=DEV), torch.randn(n, device=DEV), make_mask("ramp", n)
    chosen = "staged_bulk_y" if wide and staged_available() else "registers"
    other = "registers" if chosen != "registers" else "staged_bulk_y"
    y_auto = cuda_ext.fwd(x, w, b, c, EPS)[0]
    assert torch.equal(y_auto, cuda_ext.fwd(x, w, b, c, EPS, variant=chosen)[0])
    if staged_available():  # the two kernels round differently: auto really took `chosen`
        assert not torch.equal(y_auto, cuda_ext.fwd(x, w, b, c, EPS, variant=other)[0])


def test_cuda_staged_forward_rejects_what_it_cannot_run():
    if not staged_available():
        pytest.skip("needs the CUDA extension on an sm_90+ GPU")
    n = 100  # a bf16 row of 200 bytes: not a whole number of 16-byte bulk-copy units
    x = torch.randn(8, n, device=DEV, dtype=torch.bfloat16)
    w, b, c = torch.randn(n, device=DEV), torch.randn(n, device=DEV), torch.ones(n, device=DEV)
    with pytest.raises(RuntimeError, match="staged kernel needs"):
        cuda_ext.fwd(x, w, b, c, EPS, variant="staged")


@pytest.mark.parametrize("variant", ["registers", "staged"])
def test_cuda_forward_with_unaligned_weight_views(variant):
    """w/b/c that are views starting mid-vector: the registers kernel falls back to scalar loads;
    the staged kernel (vector loads only) refuses with a clear error instead of faulting."""
    if "cuda" not in backends() or (variant == "staged" and not staged_available()):
        pytest.skip("CUDA extension (staged: sm_90+) not available")
    n = 1024
    x = torch.randn(64, n, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(n + 1, device=DEV)[1:]
    b, c = torch.randn(n, device=DEV), make_mask("ramp", n)
    if variant == "staged":
        with pytest.raises(RuntimeError, match="aligned=0"):
            cuda_ext.fwd(x, w, b, c, EPS, variant=variant)
        return
    y = cuda_ext.fwd(x, w, b, c, EPS, variant=variant)[0]
    assert rel_err(y, ref(x.double(), w.double(), b.double(), c.double(), EPS)) < TOL[torch.bfloat16][0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_and_cuda_agree(dtype):
    if "cuda" not in backends():
        pytest.skip("CUDA extension not built")
    n, m = 1024, 4099
    x = torch.randn(m, n, device=DEV, dtype=dtype)
    w, b, c = torch.randn(n, device=DEV), torch.randn(n, device=DEV), make_mask("ramp", n)
    outs = []
    for be in ("triton", "cuda"):
        xx, ww, bb = (t.clone().requires_grad_() for t in (x, w, b))
        y = kernels.masked_layer_norm(xx, ww, bb, c, EPS, backend=be)
        y.backward(torch.ones_like(y))
        outs.append((y, xx.grad, ww.grad, bb.grad))
    for a, r in zip(*outs):
        assert rel_err(a, r) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_add_layer_norm_and_depth_residual_bf16():
    n, m = 768, 512
    x = torch.randn(m, n, device=DEV, requires_grad=True)  # fp32 residual stream (autocast)
    a = torch.randn(m, n, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    w, b, c = torch.randn(n, device=DEV), torch.randn(n, device=DEV), make_mask("ramp", n)
    y, h = kernels.add_masked_layer_norm(x, a, w, b, c, EPS)
    hr = x.detach() + a.detach()
    assert rel_err(h, hr) < 1e-6 and rel_err(y, ref(hr, w, b, c, EPS)) < 1e-5
    f = torch.randn(m, n, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    d = torch.tensor(0.4, device=DEV)
    out = kernels.depth_residual_add(x, h, f, d)
    assert rel_err(out, x + 0.4 * (h + f.float() - x)) < 1e-5
    out.sum().backward()
    assert a.grad.dtype == torch.bfloat16 and f.grad.dtype == torch.bfloat16


def test_compiled_model_path_fullgraph():
    """Under torch.compile the auto backend traces the reference (Inductor fuses it), fullgraph."""
    n = 768
    x = torch.randn(64, n, device=DEV)
    w, b, c = torch.randn(n, device=DEV), torch.randn(n, device=DEV), make_mask("ramp", n)
    f = torch.compile(lambda x: kernels.masked_layer_norm(x, w, b, c, EPS), fullgraph=True)
    assert rel_err(f(x), ref(x, w, b, c, EPS)) < 1e-5


# ---------------------------------------------------------------------------
# the custom ops (megatron_msg/kernels/ops.py): opcheck, torch.compile, CUDA graphs

OPS = torch.ops.megatron_msg


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_cuda_ops(backend, dtype):
    if backend not in backends():
        pytest.skip("CUDA extension not built")
    from torch.library import opcheck
    n = 256
    x = torch.randn(4, 33, n, device=DEV, dtype=dtype, requires_grad=True)
    w, b = (torch.randn(n, device=DEV, requires_grad=True) for _ in range(2))
    c = make_mask("ramp", n)
    opcheck(OPS.masked_layer_norm_fwd, (x, w, b, c, EPS, backend))
    y, mean, rstd = OPS.masked_layer_norm_fwd(x, w, b, c, EPS, backend)
    assert mean.dtype == torch.float32 and mean.shape == x.shape[:-1]
    dy = torch.randn_like(y)
    opcheck(OPS.masked_layer_norm_bwd, (dy, x.detach(), w.detach(), c, mean, rstd, None, torch.float32, backend))
    opcheck(OPS.masked_layer_norm_bwd, (dy, x.detach(), w.detach(), c, mean, rstd, torch.randn_like(dy),
                                        torch.float32, backend))
    xf = x.detach().float().requires_grad_()
    opcheck(OPS.add_masked_layer_norm_fwd, (xf, x, w, b, c, EPS, backend))
    opcheck(OPS.depth_residual_add, (xf, xf.detach() * 2, x, torch.tensor(0.3, device=DEV), backend))
    opcheck(OPS.depth_residual_add_bwd, (dy, torch.tensor(0.3, device=DEV), backend))


# two Inductor compiles, not four: tools/gpu_kernels.sh gives this whole file 240 s
@pytest.mark.parametrize("backend,dtype", [("triton", torch.bfloat16), ("cuda", torch.float32)])
def test_compile_fullgraph_with_fused_ops_matches_eager(backend, dtype):
    """Inductor with the fused kernels as custom ops in the graph (fwd + bwd) equals eager."""
    if backend not in backends():
        pytest.skip("CUDA extension not built")
    n, heads = 768, 12
    torch.manual_seed(0)
    x = torch.randn(4, 64, n, device=DEV, requires_grad=True)  # fp32 residual stream
    a = torch.randn(4, 64, n, device=DEV, dtype=dtype, requires_grad=True)
    o = torch.randn(4, heads, 64, n // heads, device=DEV, dtype=dtype, requires_grad=True)
    w, b = (torch.randn(n, device=DEV, requires_grad=True) for _ in range(2))
    c, head_mask, depth = make_mask("ramp", n), torch.rand(heads, device=DEV), torch.tensor(0.4, device=DEV)

    def f(x, a, o, w, b):
        y = kernels.masked_layer_norm(x, w, b, c, EPS, backend=backend)
        y2, h = kernels.add_masked_layer_norm(x, a, w, b, c, EPS, backend=backend)
        oh = kernels.scale_heads(o, head_mask).transpose(1, 2).reshape(4, 64, n)
        out = kernels.depth_residual_add(x, h, (y2 + oh).to(dtype), depth, backend=backend)
        return kernels.depth_mix(x, out + y, depth)

    seen = []

    def backend_fn(gm, example_inputs):
        seen.extend(str(nd.target) for nd in gm.graph.nodes if nd.op == "call_function")
        from torch._inductor.compile_fx import compile_fx
        return compile_fx(gm, example_inputs)

    params = (x, a, o, w, b)
    torch._dynamo.reset()
    cf = torch.compile(f, backend=backend_fn, fullgraph=True)
    dy = torch.randn(4, 64, n, device=DEV)
    out = cf(*params)
    grads = torch.autograd.grad(out, params, dy)
    out_ref = f(*params)
    grads_ref = torch.autograd.grad(out_ref, params, dy)
    assert "megatron_msg.masked_layer_norm_fwd.default" in seen
    assert "megatron_msg.depth_residual_add.default" in seen
    if backend == "triton":
        assert "megatron_msg.add_masked_layer_norm_fwd.default" in seen
    # bf16: Inductor keeps fused bf16 intermediates (scale_heads) in fp32, eager rounds them
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(out.detach(), out_ref.detach()) < tol
    for g, gr in zip(grads, grads_ref):
        assert rel_err(g, gr) < tol


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_ops_capture_in_cuda_graph(backend):
    """Forward and backward ops replay from a CUDA graph; new mask values take effect (Σc on device)."""
    if backend not in backends():
        pytest.skip("CUDA extension not built")
    n, m = 1024, 512
    torch.manual_seed(1)
    x, dy = torch.randn(m, n, device=DEV), torch.randn(m, n, device=DEV)
    w, b = torch.randn(n, device=DEV), torch.randn(n, device=DEV)
    c, depth = make_mask("ramp", n), torch.tensor(0.3, device=DEV)

    def step():
        y, mean, rstd = OPS.masked_layer_norm_fwd(x, w, b, c, EPS, backend)
        dx, dw, db = OPS.masked_layer_norm_bwd(dy, x, w, c, mean, rstd, None, torch.float32, backend)
        out = OPS.depth_residual_add(x, y, dx, depth, backend)
        ddx, ddy = OPS.depth_residual_add_bwd(dy, depth, backend)
        return y, dx, dw, db, out, ddx, ddy

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up: Triton JIT, extension load, allocator
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        captured = step()
    c[n // 2:] = 0.7  # a ramp step: new values, same tensors
    depth.fill_(0.8)
    x.copy_(torch.randn(m, n, device=DEV))
    g.replay()
    torch.cuda.synchronize()
    for a, r in zip(captured, step()):
        assert rel_err(a, r) < 1e-6


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_model_ramp_step_fused_matches_reference(arch, monkeypatch):
    """A model mid-ramp under bf16 autocast: the masked path with the fused kernels (auto = Triton)
    gives the reference backend's loss and gradients to bf16 rounding."""
    from megatron_msg.config import ModelConfig
    from megatron_msg.model import build_model
    from tests.helpers import make_batch, outputs
    cfg = ModelConfig(arch=arch, hidden=256, ffn=1024, heads=4, head_dim=64, layers=2, vocab_size=512, seq_len=128)
    torch.manual_seed(0)
    model = build_model(cfg).to(DEV)
    with torch.no_grad():
        for name, buf in model.mask_buffers().items():
            buf.fill_(0.6) if buf.dim() == 0 else buf[buf.numel() * 3 // 4:].fill_(0.3)
    model.set_masked(True)
    batch = {k: v.to(DEV) for k, v in make_batch(arch, cfg, batch=4).items()}
    results = {}
    for backend in ("reference", "auto"):
        monkeypatch.setenv("MSG_KERNEL_BACKEND", backend)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", torch.bfloat16):
            _, loss = outputs(model, arch, batch)
        loss.backward()
        results[backend] = (float(loss), {n: p.grad.clone() for n, p in model.named_parameters()})
    (loss_r, grads_r), (loss_f, grads_f) = results["reference"], results["auto"]
    assert abs(loss_f - loss_r) < 1e-2 * abs(loss_r)
    for name, g in grads_r.items():
        assert rel_err(grads_f[name], g) < 5e-2, name
