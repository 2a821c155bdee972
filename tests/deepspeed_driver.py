"""A real DeepSpeed engine training our GPT on our batches, for the interoperability tests.

    run_distributed(ds_train, 2, args=(raw, start, end, save_dir, load_dir))

Each rank wraps the model ``build_model(cfg.model, seed=cfg.train.seed)`` (the trainer's own
initialisation on one device) in ``deepspeed.initialize`` with ZeRO stage ``parallel.zero_stage``
(1 or 2), DeepSpeed's own ``torch.optim.AdamW`` (``torch_adam``: no op to build) over the same
two parameter groups as ours (weight decay / none), no gradient clipping, fp32; runs the steps
``[start, end)`` on the micro-batches our trainer gives that data-parallel rank, with our LR
schedule set per step; returns the losses as our trainer logs them (the mean over the step's
micro-batches).  ``load_dir``: a universal checkpoint directory to load first
(``checkpoint.load_universal``); ``save_dir``: where ``engine.save_checkpoint`` writes at the end,
with the ``universal_checkpoint_info`` that ``ds_to_universal`` asks for.
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import torch
import torch.distributed as dist


def ds_train(rank, world, raw, start, end, save_dir=None, load_dir=None):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("LOCAL_RANK", str(rank))
    import deepspeed

    from megatron_msg.config import config_from_dict
    from megatron_msg.model import build_model
    from megatron_msg.model.layout import tensor_spec
    from megatron_msg.parallel.step import my_micro_batches
    from megatron_msg.training.lr import lr_at, lr_segments
    from megatron_msg.training.trainer import build_batches

    cfg = config_from_dict(raw)
    o, t = cfg.optimizer, cfg.train
    model = build_model(cfg.model, seed=t.seed, device="cpu")
    named = list(model.named_parameters())
    decay = [p for n, p in named if not tensor_spec(n).no_weight_decay]
    plain = [p for n, p in named if tensor_spec(n).no_weight_decay]
    ds_config = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum // world,
        "train_batch_size": t.batch_size * t.grad_accum,
        "optimizer": {"type": "AdamW", "params": {"lr": o.lr, "betas": [o.beta1, o.beta2], "eps": o.eps,
                                                  "weight_decay": o.weight_decay, "torch_adam": True}},
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
        "checkpoint": {"load_universal": load_dir is not None},
    }
    engine, _, _, _ = deepspeed.initialize(
        model=model, config=ds_config, dist_init_required=False,
        model_parameters=[{"params": decay, "weight_decay": o.weight_decay}, {"params": plain, "weight_decay": 0.0}])
    if load_dir is not None:
        engine.load_checkpoint(load_dir)
    train, _ = build_batches(cfg)
    segments = lr_segments(cfg)
    # Our trainer's share of micro-batches for this data-parallel rank (layout tp1 x pp1 x dp=world).
    micro = my_micro_batches(t.grad_accum, SimpleNamespace(dp_size=world, dp_rank=rank))
    losses = {}
    for step in range(start, end):
        for group in engine.optimizer.param_groups:
            group["lr"] = lr_at(step, segments, cfg.lr, t.steps)
        total = torch.zeros(())
        for m in micro:
            batch = train.get(step, m)
            _, loss = engine(batch["tokens"], batch["targets"])
            engine.backward(loss)
            engine.step()
            total += loss.detach() * (1.0 / t.grad_accum)
        dist.all_reduce(total)
        losses[step] = total.item()
    if save_dir is not None:
        engine.save_checkpoint(save_dir, tag=f"global_step{end}",
                               client_state={"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}})
    return losses
