"""Fused MSG kernels on the CPU, through the Triton interpreter, against an fp64 reference.

The Triton kernels compute in fp32 whatever their I/O dtype; the interpreter
gets bf16 arithmetic wrong, so every check here runs fp32 I/O against the fp64
PyTorch reference (masked_layer_norm_reference), which defines the op.
The custom ops (kernels/ops.py) with the Triton implementation are checked
here too: opcheck, and torch.compile(fullgraph=True) with backend="triton".
On a CUDA machine this module skips: tests/test_kernels_gpu.py covers the
compiled kernels there, and TRITON_INTERPRET must not leak into them.
"""
import importlib
import os
import sys

import pytest
import torch

if torch.cuda.is_available():  # pragma: no cover - GPU machines run test_kernels_gpu.py
    pytest.skip("interpreter tests run on CPU-only machines", allow_module_level=True)

# TRITON_INTERPRET must be set before triton itself is first imported (its
# language library is bound then) and before our kernels are decorated.  If
# another test already imported triton compiled-mode, run this file again in a
# child process with the interpreter on (test_in_interpreter_subprocess).
_IN_PROCESS = os.environ.get("TRITON_INTERPRET") == "1" or "triton" not in sys.modules
if _IN_PROCESS:
    os.environ["TRITON_INTERPRET"] = "1"
    for _mod in ("megatron_msg.kernels.triton_masked_ln", "megatron_msg.kernels.triton_elementwise"):
        if _mod in sys.modules:
            importlib.reload(sys.modules[_mod])
pytest.importorskip("triton")


@pytest.mark.skipif(_IN_PROCESS, reason="interpreter tests run in this process")
def test_in_interpreter_subprocess():  # pragma: no cover - depends on test ordering
    import subprocess
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


@pytest.fixture(autouse=True)
def _only_under_interpreter(request):
    if not _IN_PROCESS and request.node.name != "test_in_interpreter_subprocess":
        pytest.skip("covered by test_in_interpreter_subprocess")

from megatron_msg import kernels  # noqa: E402
from megatron_msg.kernels import triton_masked_ln as tml  # noqa: E402
from megatron_msg.kernels.reference import masked_layer_norm_reference as ref  # noqa: E402

EPS = 1e-5
# Hidden sizes that are not powers of two (and one that is), small enough for the interpreter.
WIDTHS = (7, 96, 100, 130)


def make_mask(kind: str, n: int) -> torch.Tensor:
    c = torch.ones(n, dtype=torch.float64)
    new = slice(n - max(1, n // 4), n)  # the last quarter are "new units"
    if kind == "zeros":
        c[new] = 0.0
    elif kind == "ramp":
        c[new] = 0.3
    elif kind == "random":
        c = torch.rand(n, dtype=torch.float64) * 0.9 + 0.1
    return c


MASKS = ("ones", "zeros", "ramp", "random")


def inputs(shape, seed):
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5
    w = torch.randn(n, generator=g, dtype=torch.float64)
    b = torch.randn(n, generator=g, dtype=torch.float64)
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    return x, w, b, dy


def run_both(fn_fused, fn_ref, tensors, dy):
    """Forward + backward of a fused fp32 op and of the fp64 reference; returns both."""
    f32 = [t.float().clone().requires_grad_() for t in tensors]
    f64 = [t.clone().requires_grad_() for t in tensors]
    y = fn_fused(*f32)
    yr = fn_ref(*f64)
    y.backward(dy.float())
    yr.backward(dy)
    return y, yr, [t.grad for t in f32], [t.grad for t in f64]


def assert_close(a, b, rtol=1e-5, atol=1e-5):
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("n", WIDTHS)
@pytest.mark.parametrize("mask_kind", MASKS)
def test_masked_ln_forward_backward_matches_fp64(n, mask_kind):
    x, w, b, dy = inputs((3, 11, n), seed=n)
    c = make_mask(mask_kind, n)
    y, yr, grads, grads_ref = run_both(
        lambda x, w, b: kernels.masked_layer_norm(x, w, b, c.float(), EPS, backend="triton"),
        lambda x, w, b: ref(x, w, b, c, EPS), (x, w, b), dy)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert_close(y, yr)
    for gk, gr in zip(grads, grads_ref):
        assert_close(gk, gr, rtol=1e-4, atol=1e-4)


def test_zero_mask_units_are_function_preserving():
    """c = 0 on new units: old outputs are LayerNorm over old units, whatever the new values hold."""
    n_old, n = 96, 130
    x, w, b, _ = inputs((4, n), seed=1)
    c = torch.zeros(n)
    c[:n_old] = 1
    x2 = x.clone()
    x2[:, n_old:] = 1e3 * torch.randn(4, n - n_old, dtype=torch.float64)  # arbitrary new units
    for xx in (x, x2):
        y = kernels.masked_layer_norm(xx.float(), w.float(), b.float(), c, EPS, backend="triton")
        expect = torch.nn.functional.layer_norm(xx[:, :n_old], (n_old,), w[:n_old], b[:n_old], EPS)
        assert_close(y[:, :n_old], expect)
        assert torch.all(y[:, n_old:] == 0)


def test_backward_partials_over_many_programs_and_tiles():
    """dw/db are per-program partials summed on the device: exercise several tiles per program."""
    n = 100
    x, w, b, dy = inputs((37, n), seed=2)
    c = make_mask("ramp", n)
    xf, wf, bf, cf = x.float(), w.float(), b.float(), c.float()
    _, mean, rstd, _ = tml.masked_ln_fwd(xf, wf, bf, cf, EPS)
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    ref(xr, wr, br, c, EPS).backward(dy)
    for programs, block_m in ((1, 4), (2, 4), (5, 2), (3, 16)):
        dx, dw, db = tml.masked_ln_bwd(dy.float(), xf, wf, cf, mean, rstd, programs=programs, block_m=block_m)
        assert_close(dx, xr.grad, rtol=1e-4, atol=1e-4)
        assert_close(dw, wr.grad, rtol=1e-4, atol=1e-4)
        assert_close(db, br.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mask_kind", MASKS)
def test_wide_row_forward_in_chunks(mask_kind):
    """The chunked forward used for hidden > 4096 (Chan's merge of chunk statistics), forced small.

    chunk=32 on n=130 gives five chunks; with the "zeros" mask the last ones hold only new units.
    """
    n = 130
    x, w, b, _ = inputs((6, n), seed=10)
    x = x + 50.0  # a large mean: the merge must not lose the variance
    c = make_mask(mask_kind, n)
    y, mean, rstd, _ = tml.masked_ln_fwd(x.float(), w.float(), b.float(), c.float(), EPS, variant="chunked", chunk=32)
    assert_close(y, ref(x, w, b, c, EPS), rtol=1e-4, atol=1e-4)
    d = torch.randn_like(x)
    y2, _, _, h = tml.masked_ln_fwd(x.float(), w.float(), b.float(), c.float(), EPS, delta=d.float(),
                                    variant="chunked", chunk=32)
    assert_close(h, x + d)
    assert_close(y2, ref(x + d, w, b, c, EPS), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dres", (False, True))
def test_wide_row_backward_in_chunks(dres):
    """The chunked backward used for hidden > 4096, forced on a small row with several chunks."""
    n = 130
    x, w, b, dy = inputs((11, n), seed=9)
    c = make_mask("ramp", n)
    r = torch.randn_like(x) if dres else None
    xf, wf, bf, cf = x.float(), w.float(), b.float(), c.float()
    _, mean, rstd, _ = tml.masked_ln_fwd(xf, wf, bf, cf, EPS)
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    ref(xr, wr, br, c, EPS).backward(dy)
    dx, dw, db = tml.masked_ln_bwd(dy.float(), xf, wf, cf, mean, rstd, variant="chunked", chunk=32, programs=3,
                                   dres=r.float() if dres else None)
    assert_close(dx, xr.grad + (r if dres else 0), rtol=1e-4, atol=1e-4)
    assert_close(dw, wr.grad, rtol=1e-4, atol=1e-4)
    assert_close(db, br.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n", (96, 100, 130, 64))
@pytest.mark.parametrize("block_m", (1, 2))
def test_split_row_kernels(n, block_m):
    """The two-tile kernels used for wide rows, forced on small ones.

    96 = 64 + 32 (two exact tiles), 100 = 64 + 36 (masked tail), 130 = 128 + 2,
    64 = a power of two (the tail tile holds no column).  Forward with and without the
    fused residual add; backward with several persistent programs and a residual gradient.
    """
    x, w, b, dy = inputs((7, n), seed=n + block_m)
    x = x + 20.0  # a large mean
    c = make_mask("ramp", n)
    xf, wf, bf, cf = x.float(), w.float(), b.float(), c.float()
    y, mean, rstd, _ = tml.masked_ln_fwd(xf, wf, bf, cf, EPS, variant="split", block_m=block_m)
    assert_close(y, ref(x, w, b, c, EPS), rtol=1e-4, atol=1e-4)
    d = torch.randn_like(x)
    y2, _, _, h = tml.masked_ln_fwd(xf, wf, bf, cf, EPS, delta=d.float(), variant="split", block_m=block_m)
    assert_close(h, x + d)
    assert_close(y2, ref(x + d, w, b, c, EPS), rtol=1e-4, atol=1e-4)
    r = torch.randn_like(x)
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    ref(xr, wr, br, c, EPS).backward(dy)
    dx, dw, db = tml.masked_ln_bwd(dy.float(), xf, wf, cf, mean, rstd, variant="split", block_m=block_m,
                                   programs=3, dres=r.float())
    assert_close(dx, xr.grad + r, rtol=1e-4, atol=1e-4)
    assert_close(dw, wr.grad, rtol=1e-4, atol=1e-4)
    assert_close(db, br.grad, rtol=1e-4, atol=1e-4)


def test_unknown_variant_is_an_error():
    x, w, b, _ = inputs((2, 8), seed=0)
    with pytest.raises(ValueError, match="unknown kernel variant 'tiles'"):
        tml.masked_ln_fwd(x.float(), w.float(), b.float(), torch.ones(8), EPS, variant="tiles")


@pytest.mark.parametrize("block_m", (1, 2, 8))
def test_forward_tilings_agree(block_m):
    n = 130
    x, w, b, _ = inputs((9, n), seed=3)
    c = make_mask("random", n)
    y, mean, rstd, _ = tml.masked_ln_fwd(x.float(), w.float(), b.float(), c.float(), EPS, block_m=block_m)
    assert_close(y, ref(x, w, b, c, EPS))
    xf = x.float()
    mu = (xf * c.float()).sum(-1) / c.float().sum()
    assert_close(mean, mu)


def test_finite_difference_directional_derivative():
    """gradcheck-style: <grad, v> of the fused op against central differences of the fused forward."""
    n = 96
    x, w, b, dy = inputs((5, n), seed=4)
    c = make_mask("ramp", n).float()
    xs, ws, bs = (t.float().requires_grad_() for t in (x, w, b))
    y = kernels.masked_layer_norm(xs, ws, bs, c, EPS, backend="triton")
    (y * dy.float()).sum().backward()
    g = torch.Generator().manual_seed(5)
    for t, grad in ((xs, xs.grad), (ws, ws.grad), (bs, bs.grad)):
        v = torch.randn(t.shape, generator=g)
        h = 1e-2

        def f(delta):
            args = [xs.detach(), ws.detach(), bs.detach()]
            i = [id(xs), id(ws), id(bs)].index(id(t))
            args[i] = args[i] + delta
            return (kernels.masked_layer_norm(*args, c, EPS, backend="triton").double() * dy).sum()

        fd = (f(h * v) - f(-h * v)) / (2 * h)
        an = (grad.double() * v.double()).sum()
        assert abs(fd - an) <= 2e-2 * max(1.0, abs(an)), (fd, an)


def test_non_contiguous_input():
    n = 100
    _, w, b, _ = inputs((1, n), seed=6)
    x = torch.randn(n, 6, dtype=torch.float64)
    xt = x.float().t()  # [6, n], last dim strided
    c = make_mask("ramp", n)
    y = kernels.masked_layer_norm(xt, w.float(), b.float(), c.float(), EPS, backend="triton")
    assert_close(y, ref(x.t(), w, b, c, EPS))


@pytest.mark.parametrize("mask_kind", ("ones", "zeros", "ramp"))
def test_add_masked_layer_norm(mask_kind):
    n = 100
    x, w, b, dy = inputs((2, 7, n), seed=7)
    delta = torch.randn_like(x)
    dh = torch.randn_like(x)
    c = make_mask(mask_kind, n)

    def fused(x, delta, w, b):
        y, h = kernels.add_masked_layer_norm(x, delta, w, b, c.float(), EPS, backend="triton")
        return y, h

    def unfused(x, delta, w, b):
        h = x + delta
        return ref(h, w, b, c, EPS), h

    f32 = [t.float().clone().requires_grad_() for t in (x, delta, w, b)]
    f64 = [t.clone().requires_grad_() for t in (x, delta, w, b)]
    y, h = fused(*f32)
    yr, hr = unfused(*f64)
    assert_close(y, yr)
    assert_close(h, hr)
    # h feeds a later residual too: its gradient must be added to the LN's
    ((y.double() * dy).sum() + (h.double() * dh).sum()).backward()
    ((yr * dy).sum() + (hr * dh).sum()).backward()
    for a, r in zip(f32, f64):
        assert_close(a.grad, r.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cval", (0.0, 0.37, 1.0))
def test_depth_residual_add(cval):
    shape = (3, 5, 100)
    g = torch.Generator().manual_seed(8)
    x, h, f, dout = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(4))
    c = torch.tensor(cval)
    f32 = [t.float().clone().requires_grad_() for t in (x, h, f)]
    f64 = [t.clone().requires_grad_() for t in (x, h, f)]
    out = kernels.depth_residual_add(*f32, c, backend="triton")
    outr = f64[0] + c.double() * ((f64[1] + f64[2]) - f64[0])
    assert_close(out, outr)
    out.backward(dout.float())
    outr.backward(dout)
    for a, r in zip(f32, f64):
        assert_close(a.grad, r.grad)


# ---------------------------------------------------------------------------
# the custom ops (megatron_msg/kernels/ops.py) with the Triton implementation

OPS = torch.ops.megatron_msg


def test_opcheck_triton_ops():
    """Schema, autograd registration, fake vs real and AOT dispatch (dynamic shapes), tiny fp32 shapes."""
    from torch.library import opcheck
    n = 12
    x, w, b, dy = (t.float() for t in inputs((2, 3, n), seed=11))
    c = make_mask("ramp", n).float()
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    opcheck(OPS.masked_layer_norm_fwd, (x, w, b, c, EPS, "triton"))
    y, mean, rstd = OPS.masked_layer_norm_fwd(x, w, b, c, EPS, "triton")
    assert mean.shape == rstd.shape == x.shape[:-1] and mean.dtype == torch.float32
    d = (dy, x.detach(), w.detach(), c, mean, rstd)
    opcheck(OPS.masked_layer_norm_bwd, (*d, None, torch.float32, "triton"))
    opcheck(OPS.masked_layer_norm_bwd, (*d, torch.randn_like(dy), torch.float32, "triton"))
    delta = torch.randn(x.shape, requires_grad=True)
    opcheck(OPS.add_masked_layer_norm_fwd, (x, delta, w, b, c, EPS, "triton"))
    opcheck(OPS.depth_residual_add, (x, delta, x.detach() * 2, torch.tensor(0.3), "triton"))
    opcheck(OPS.depth_residual_add_bwd, (dy, torch.tensor(0.3), "triton"))


def test_triton_ops_match_reference_ops_and_eager_twins():
    from megatron_msg.kernels import ops
    n = 100
    x, w, b, dy = (t.float() for t in inputs((4, n), seed=12))
    c = make_mask("random", n).float()
    outs = {}
    for name, fn in (("op", OPS.masked_layer_norm_fwd), ("eager", ops._EagerMaskedLayerNorm.apply)):
        for backend in ("triton", "reference"):
            xx, ww, bb = (t.clone().requires_grad_() for t in (x, w, b))
            y, mean, rstd = fn(xx, ww, bb, c, EPS, backend)
            y.backward(dy)
            outs[name, backend] = (y, mean, rstd, xx.grad, ww.grad, bb.grad)
    for key in (("eager", "triton"), ("op", "reference")):
        for a, r in zip(outs[key], outs["op", "triton"]):
            assert_close(a, r, rtol=1e-5, atol=1e-5)


def test_fp64_input_falls_back_to_reference_inside_the_op():
    x, w, b, _ = inputs((3, 10), seed=13)
    c = make_mask("ramp", 10)
    y, mean, _ = OPS.masked_layer_norm_fwd(x, w, b, c, EPS, "triton")
    assert y.dtype == mean.dtype == torch.float64
    torch.testing.assert_close(y, ref(x, w, b, c, EPS))


def test_compile_fullgraph_with_triton_ops_matches_eager():
    """torch.compile(fullgraph=True) through the dispatch functions with backend="triton".

    The fused ops are single nodes of the forward and backward graphs (no graph
    break, nothing traced into the launchers); values and gradients equal eager.
    """
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    graphs = {"fw": [], "bw": []}

    def rec(key):
        def compiler(gm, _):
            graphs[key].extend(str(nd.target) for nd in gm.graph.nodes if nd.op == "call_function")
            return make_boxed_func(gm)
        return compiler

    n = 20
    x, w, b, _ = (t.float() for t in inputs((2, 3, n), seed=14))
    c = make_mask("ramp", n).float()
    o = torch.randn(2, 3, 4, 5)
    head_mask = torch.tensor([1.0, 0.0, 0.5])
    depth = torch.tensor(0.4)

    def f(x, w, b, o):
        y = kernels.masked_layer_norm(x, w, b, c, EPS, backend="triton")
        y2, h = kernels.add_masked_layer_norm(x, y, w, b, c, EPS, backend="triton")
        z = kernels.depth_residual_add(x, h, y2, depth, backend="triton")
        return kernels.depth_mix(x, z, depth).square().sum() + kernels.scale_heads(o, head_mask).square().sum()

    params = [t.clone().requires_grad_() for t in (x, w, b, o)]
    torch._dynamo.reset()
    cf = torch.compile(f, backend=aot_autograd(fw_compiler=rec("fw"), bw_compiler=rec("bw")), fullgraph=True)
    out = cf(*params)
    grads = torch.autograd.grad(out, params)
    out_ref = f(*params)
    grads_ref = torch.autograd.grad(out_ref, params)
    assert_close(out, out_ref)
    for g, gr in zip(grads, grads_ref):
        assert_close(g, gr)
    for name in ("masked_layer_norm_fwd", "add_masked_layer_norm_fwd", "depth_residual_add"):
        assert f"megatron_msg.{name}.default" in graphs["fw"]
    assert graphs["bw"].count("megatron_msg.masked_layer_norm_bwd.default") == 2
    assert "megatron_msg.depth_residual_add_bwd.default" in graphs["bw"]


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_model_masked_path_with_triton_kernels(arch, monkeypatch):
    """A whole model mid-ramp: the fused Triton kernels (through the interpreter) give the
    reference backend's loss and gradients (fp32; the model calls the kernels itself)."""
    from megatron_msg.config import Shape
    from tests.helpers import fresh, make_batch, outputs
    model = fresh(arch, Shape(24, 40, 3, 2), head_dim=8)
    with torch.no_grad():
        for name, buf in model.mask_buffers().items():
            buf.fill_(0.6) if buf.dim() == 0 else buf[buf.numel() * 2 // 3:].fill_(0.3)
    model.set_masked(True)
    batch = make_batch(arch, model.cfg, batch=2)
    calls = []
    for fn in ("masked_ln_fwd", "masked_ln_bwd"):
        real = getattr(tml, fn)
        monkeypatch.setattr(tml, fn, lambda *a, _real=real, _fn=fn, **k: calls.append(_fn) or _real(*a, **k))
    results = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv("MSG_KERNEL_BACKEND", backend)
        model.zero_grad(set_to_none=True)
        _, loss = outputs(model, arch, batch)
        loss.backward()
        results[backend] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    (loss_r, grads_r), (loss_t, grads_t) = results["reference"], results["triton"]
    lns = 2 * model.cfg.layers + (1 if arch == "gpt" else 0)  # + GPT's final LN; BERT's embedding LN too
    assert calls.count("masked_ln_fwd") >= lns and calls.count("masked_ln_bwd") >= lns, calls
    assert_close(loss_t, loss_r)
    for name, g in grads_r.items():
        torch.testing.assert_close(grads_t[name], g, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
