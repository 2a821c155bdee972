"""Launch one masked-LN forward configuration a few times, for a profiler (GPU only).

    ncu --kernel-name regex:masked_ln --launch-skip 2 --launch-count 1 \
        python3 tools/profile_wide_ln.py --n 10240 --variant split --block-m 2 --warps 8
    ncu --set full --kernel-name regex:staged --launch-skip 2 --launch-count 1 \
        python3 tools/profile_wide_ln.py --n 10240 --cuda staged_bulk_y --stages 6

Triton (default): prints the kernel's register and spill counts from Triton's compile metadata.
``--cuda VARIANT``: the CUDA extension's forward instead (registers | staged | staged_bulk_y | auto).
"""
import argparse

import torch

from megatron_msg.kernels import triton_masked_ln as tml

p = argparse.ArgumentParser()
p.add_argument("--n", type=int, default=10240)
p.add_argument("--variant", default=None)
p.add_argument("--block-m", type=int, default=None)
p.add_argument("--warps", type=int, default=None)
p.add_argument("--cuda", default=None, help="profile the CUDA extension's forward VARIANT instead of Triton")
p.add_argument("--stages", type=int, default=0, help="ring buffers of the CUDA staged variants (0 = default)")
a = p.parse_args()
m = 2 ** 26 // (2 * a.n)
x = torch.randn(m, a.n, device="cuda", dtype=torch.bfloat16)
w, b = torch.randn(a.n, device="cuda"), torch.randn(a.n, device="cuda")
c = torch.ones(a.n, device="cuda")
c[a.n * 3 // 4:] = 0.3
if a.cuda:
    from megatron_msg.kernels import cuda_ext
    for _ in range(4):
        cuda_ext.fwd(x, w, b, c, 1e-5, variant=a.cuda, stages=a.stages)
    torch.cuda.synchronize()
else:
    for _ in range(4):
        tml.masked_ln_fwd(x, w, b, c, 1e-5, variant=a.variant, block_m=a.block_m, num_warps=a.warps)
    torch.cuda.synchronize()
    for kern in (tml._masked_ln_fwd_split_kernel, tml._masked_ln_fwd_kernel, tml._masked_ln_fwd_wide_kernel):
        try:  # Triton internals: the layout of the compile cache differs between versions
            for dev_cache in kern.device_caches.values():
                for compiled in dev_cache[0].values():
                    print(kern.fn.__name__, "warps", compiled.metadata.num_warps, "regs", compiled.n_regs,
                          "spills", compiled.n_spills, "shared", compiled.metadata.shared)
        except Exception as exc:
            print(kern.fn.__name__, "no metadata:", repr(exc)[:200])
