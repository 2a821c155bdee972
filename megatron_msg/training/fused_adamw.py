"""The steady-state AdamW update of many tensors in one fused kernel call (``optimizer.fused``).

Tensors without per-entry step offsets (every tensor, except for the few thousand steps
after a growth that gave some of them new entries) take torch's fused AdamW kernel
(``torch._fused_adamw_``, what ``torch.optim.AdamW(fused=True)`` runs) over all of them
at once, instead of ~8 elementwise ops per tensor (optimizer.py's ``adamw_update_``): one
pass over memory and one dispatch per group instead of ~8 per tensor.

Position independence.  ZeRO updates a tensor in pieces cut at any entry (zero.py) and
must give, bit for bit, the entries of the whole-tensor update.  On CPU the fused kernel
runs a SIMD body and a scalar loop for the last ``len % vector width`` entries, and the two
round differently (the body uses fused multiply-adds): an entry's result would depend on
where its piece ends.  So every entry is sent through the SIMD body: each tensor's
``len - len % PAD`` head is updated in place, and its (at most PAD - 1) last entries are
copied into a zero-padded PAD-entry scratch row, updated there, and copied back.  Zero
padding is harmless (zero gradient and moments give a zero update, no NaN).  PAD is a
multiple of every CPU vector width torch dispatches to (AVX-512: 16 floats).  CUDA's
kernel computes each entry alone, so no padding is needed there.

What this changes against the unfused update: the arithmetic (fused multiply-adds, the
kernel's lerp), so results differ from ``adamw_update_`` in the last bits; both are
AdamW.  ``optimizer.fused: false`` keeps the unfused path (bit-compatible with
``torch.optim.AdamW(foreach=False)``, e.g. DeepSpeed's ``torch_adam``).
"""
from __future__ import annotations

import torch

PAD = 64  # entries: a multiple of every CPU SIMD width for fp32 (see the module docstring)


def fused_adamw_available(device: torch.device | str) -> bool:
    """Whether torch has a fused AdamW kernel for ``device`` (CPU and CUDA in torch >= 2.4)."""
    return hasattr(torch, "_fused_adamw_") and torch.device(device).type in ("cpu", "cuda")


class FusedAdamWBatch:
    """Tensors collected for one fused AdamW call (one learning rate and weight decay).

    ``add`` takes a parameter (or its fp32 master), its gradient and moments (same dtype,
    contiguous) and its step count, already counting this step; ``run`` updates them all.
    """

    def __init__(self):
        self._p: list[torch.Tensor] = []
        self._g: list[torch.Tensor] = []
        self._m: list[torch.Tensor] = []
        self._v: list[torch.Tensor] = []
        self._steps: list[int] = []

    def __len__(self) -> int:
        return len(self._p)

    def add(self, p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: int) -> None:
        if not (p.is_contiguous() and g.is_contiguous() and m.is_contiguous() and v.is_contiguous()):
            raise ValueError("fused AdamW needs contiguous parameters, gradients and moments")
        if p.numel():  # the kernel takes any shape; only ragged ends are cut (flat) below
            self._p.append(p)
            self._g.append(g)
            self._m.append(m)
            self._v.append(v)
            self._steps.append(step)

    @torch.no_grad()
    def run(self, lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
        if not self._p:
            return
        device = self._p[0].device
        step_tensors: dict[int, torch.Tensor] = {}

        def step_of(s: int) -> torch.Tensor:  # the kernel reads one float step tensor per tensor
            if s not in step_tensors:
                step_tensors[s] = torch.tensor(float(s), dtype=torch.float32, device=device)
            return step_tensors[s]

        lists = (self._p, self._g, self._m, self._v)
        if device.type == "cpu":
            heads, tails = _split_for_simd(lists, self._steps)
        else:
            heads, tails = (lists, self._steps), None
        (p, g, m, v), steps = heads
        if tails is not None:
            (tp, tg, tm, tv), tail_steps, write_back = tails
            p, g, m, v = p + tp, g + tg, m + tm, v + tv
            steps = steps + tail_steps
        torch._fused_adamw_(p, g, m, v, [], [step_of(s) for s in steps], lr=lr, beta1=betas[0], beta2=betas[1],
                            weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False)
        if tails is not None:
            write_back()


def _split_for_simd(lists, steps):
    """((heads of p, g, m, v), their steps) and, for tensors with a ragged end, padded scratch rows
    holding it, their steps and a function that copies the updated ends back (module docstring)."""
    p, g, m, v = lists
    ragged = [i for i, t in enumerate(p) if t.numel() % PAD]
    if not ragged:  # the common case: every size a multiple of PAD, nothing to cut
        return (lists, steps), None
    whole = set(range(len(p))) - set(ragged)
    head_lists: tuple[list, ...] = tuple([src[i] for i in sorted(whole)] for src in lists)
    head_steps = [steps[i] for i in sorted(whole)]
    flat = [[src[i].view(-1) for i in ragged] for src in lists]
    cuts = [t.numel() - t.numel() % PAD for t in flat[0]]
    for j, cut in enumerate(cuts):
        if cut:
            for out, src in zip(head_lists, flat):
                out.append(src[j][:cut])
            head_steps.append(steps[ragged[j]])
    device, dtype = p[0].device, p[0].dtype
    rows = torch.zeros(4, len(ragged), PAD, dtype=dtype, device=device)  # p, g, m, v scratch
    scratch = [[rows[k, j, :t.numel() - cut] for j, (t, cut) in enumerate(zip(flat[0], cuts))] for k in range(4)]
    ends = [[t[cut:] for t, cut in zip(src, cuts)] for src in flat]
    for k in range(4):
        torch._foreach_copy_(scratch[k], ends[k])
    tail_lists = tuple([rows[k, j] for j in range(len(ragged))] for k in range(4))

    def write_back() -> None:
        for k in (0, 2, 3):  # parameters and moments; the gradient is only read
            torch._foreach_copy_(ends[k], scratch[k])

    return (head_lists, head_steps), (tail_lists, [steps[i] for i in ragged], write_back)
