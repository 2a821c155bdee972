"""Kernel dispatch and mask folding: plain PyTorch, runs anywhere."""
import pytest
import torch
import torch.nn.functional as F

from megatron_msg import kernels
from megatron_msg.kernels.backend import resolve
from megatron_msg.kernels.reference import masked_layer_norm_reference


def test_auto_backend_on_cpu_is_reference(monkeypatch):
    monkeypatch.delenv("MSG_KERNEL_BACKEND", raising=False)
    assert resolve(torch.zeros(2)) == "reference"


def test_env_var_selects_backend(monkeypatch):
    monkeypatch.setenv("MSG_KERNEL_BACKEND", "reference")
    assert resolve(torch.zeros(2)) == "reference"
    monkeypatch.setenv("MSG_KERNEL_BACKEND", "bogus")
    with pytest.raises(ValueError):
        resolve(torch.zeros(2))


def test_cuda_backend_refuses_cpu_tensors():
    with pytest.raises(RuntimeError):
        resolve(torch.zeros(2), "cuda")


def test_reference_dispatch_matches_definition():
    x = torch.randn(4, 10)
    w, b = torch.randn(10), torch.randn(10)
    c = torch.ones(10)
    c[7:] = 0.5
    y = kernels.masked_layer_norm(x, w, b, c, 1e-5, backend="reference")
    torch.testing.assert_close(y, masked_layer_norm_reference(x, w, b, c, 1e-5))
    y2, h = kernels.add_masked_layer_norm(x, x, w, b, c, 1e-5, backend="reference")
    torch.testing.assert_close(h, 2 * x)
    torch.testing.assert_close(y2, masked_layer_norm_reference(2 * x, w, b, c, 1e-5))


def test_depth_ops_reference():
    x, h, f = (torch.randn(3, 4) for _ in range(3))
    c = torch.tensor(0.25)
    torch.testing.assert_close(kernels.depth_mix(x, h, c), x + 0.25 * (h - x))
    torch.testing.assert_close(kernels.depth_residual_add(x, h, f, c, backend="reference"), x + 0.25 * (h + f - x))


def test_scale_heads():
    o = torch.randn(2, 3, 4, 5)
    m = torch.tensor([1.0, 0.0, 0.5])
    torch.testing.assert_close(kernels.scale_heads(o, m), o * m.view(1, 3, 1, 1))


@pytest.mark.parametrize("use_in,use_out", [(True, False), (False, True), (True, True)])
def test_masked_linear_folds_masks_exactly(use_in, use_out):
    """Folding the masks into the weight gives the masked function and its gradients."""
    torch.manual_seed(0)
    n_in, n_out = 12, 8
    x = torch.randn(5, n_in, dtype=torch.float64, requires_grad=True)
    w = torch.randn(n_out, n_in, dtype=torch.float64, requires_grad=True)
    b = torch.randn(n_out, dtype=torch.float64, requires_grad=True)
    mi = torch.rand(n_in, dtype=torch.float64) if use_in else None
    mo = torch.rand(n_out, dtype=torch.float64) if use_out else None
    y = kernels.masked_linear(x, w, b, in_mask=mi, out_mask=mo)
    xm = x * mi if use_in else x
    yr = F.linear(xm, w, b)
    yr = yr * mo if use_out else yr
    torch.testing.assert_close(y, yr)
    dy = torch.randn_like(y)
    gs = torch.autograd.grad(y, (x, w, b), dy)
    grs = torch.autograd.grad(yr, (x, w, b), dy)
    for g, gr in zip(gs, grs):
        torch.testing.assert_close(g, gr)


def test_head_mask_folded_into_output_projection():
    """scale_heads then out-proj == out-proj with the head mask folded into its columns."""
    torch.manual_seed(1)
    B, H, T, D, C = 2, 3, 4, 5, 6
    o = torch.randn(B, H, T, D, dtype=torch.float64)
    hm = torch.tensor([1.0, 0.0, 0.4], dtype=torch.float64)
    w, b = torch.randn(C, H * D, dtype=torch.float64), torch.randn(C, dtype=torch.float64)
    flat = lambda t: t.transpose(1, 2).reshape(B, T, H * D)  # noqa: E731
    y_ref = F.linear(flat(kernels.scale_heads(o, hm)), w, b)
    y = kernels.masked_linear(flat(o), w, b, in_mask=kernels.head_columns(hm, D))
    torch.testing.assert_close(y, y_ref)


def test_cuda_extension_unavailable_without_cuda():
    from megatron_msg.kernels import cuda_ext
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    assert cuda_ext.available() is False


@pytest.mark.parametrize("kw, msg", [({"variant": "fast"}, "variant must be one of"),
                                     ({"stages": -1}, r"must be 0 \(default\) or 4..12"),
                                     ({"stages": 2}, r"must be 0 \(default\) or 4..12"),
                                     ({"stages": 13}, r"must be 0 \(default\) or 4..12")])
def test_cuda_forward_launcher_rejects_bad_arguments_before_building(kw, msg):
    from megatron_msg.kernels import cuda_ext
    x = torch.zeros(2, 8)
    with pytest.raises(ValueError, match=msg):
        cuda_ext.fwd(x, torch.ones(8), torch.zeros(8), torch.ones(8), 1e-5, **kw)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
@pytest.mark.parametrize("sub", ["kernels", "kernel-sweep", "mask-overhead"])
def test_msg_bench_without_a_gpu_says_so(sub, tmp_path):
    from megatron_msg.cli.bench import main
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        main([sub, "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())  # nothing half-written
