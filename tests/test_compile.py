"""The masked model compiles as one graph (no graph breaks, no host syncs) and matches eager."""
import torch

from megatron_msg.config import Shape
from tests.helpers import fresh, grown, make_batch, outputs, rel_err


def test_masked_gpt_compiles_fullgraph_and_matches_eager():
    big = grown(fresh("gpt"), Shape(48, 96, 5, 3)).model
    for buf in big.mask_buffers().values():
        buf.clamp_(min=0.3)  # mid-ramp: masks active and fractional
    batch = make_batch("gpt", big.cfg)
    eager_logits, eager_loss = outputs(big, "gpt", batch)
    torch._dynamo.reset()
    compiled = torch.compile(big, backend="aot_eager", fullgraph=True)
    logits, loss = outputs(compiled, "gpt", batch)
    assert rel_err(eager_logits.detach(), logits.detach()) <= 1e-5
    loss.backward()  # the backward graph compiles too
    assert big.layers[2].mlp.fc1.weight.grad.abs().sum() > 0
    # a ramp step changes buffer values in place: no recompilation, new values are used
    for buf in big.mask_buffers().values():
        buf.clamp_(min=0.6)
    logits2, _ = outputs(compiled, "gpt", batch)
    eager2, _ = outputs(big, "gpt", batch)
    assert rel_err(eager2.detach(), logits2.detach()) <= 1e-5
    assert rel_err(logits.detach(), logits2.detach()) > 1e-4


def test_recomputed_layers_compile_fullgraph_and_give_eager_gradients():
    # train.recompute=full with train.compile=true (no dropout: nothing to replay).
    import dataclasses

    from megatron_msg.parallel.recompute import RecomputePolicy
    big = grown(fresh("gpt"), Shape(48, 96, 5, 3)).model
    for buf in big.mask_buffers().values():
        buf.clamp_(min=0.3)
    batch = make_batch("gpt", big.cfg)
    _, eager_loss = outputs(big, "gpt", batch)
    eager_loss.backward()
    eager_grads = {n: p.grad.clone() for n, p in big.named_parameters()}
    big.zero_grad(set_to_none=True)
    big.placement = dataclasses.replace(big.placement, recompute=RecomputePolicy(enabled=True))
    torch._dynamo.reset()
    _, loss = outputs(torch.compile(big, backend="aot_eager", fullgraph=True), "gpt", batch)
    loss.backward()
    assert rel_err(eager_loss.detach(), loss.detach()) <= 1e-6
    for n, p in big.named_parameters():
        assert rel_err(eager_grads[n], p.grad) <= 1e-5, n
