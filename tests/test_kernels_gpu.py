"""Fused MSG kernels on a CUDA GPU (skipped without one): bf16/fp16/fp32, Triton and CUDA backends."""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from megatron_msg import kernels  # noqa: E402
from megatron_msg.kernels import cuda_ext  # noqa: E402
from megatron_msg.kernels.backend import resolve  # noqa: E402
from megatron_msg.model.masked_norm import masked_layer_norm_reference as ref  # noqa: E402

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
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


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
    """Under torch.compile the auto backend traces the reference, so fullgraph compiles."""
    n = 768
    x = torch.randn(64, n, device=DEV)
    w, b, c = torch.randn(n, device=DEV), torch.randn(n, device=DEV), make_mask("ramp", n)
    f = torch.compile(lambda x: kernels.masked_layer_norm(x, w, b, c, EPS), fullgraph=True)
    assert rel_err(f(x), ref(x, w, b, c, EPS)) < 1e-5
