"""Data-parallel gradient all-reduce in buckets during backward (parallel/grad_buckets.py)."""
import pytest
import torch

from megatron_msg.config import config_from_dict
from megatron_msg.parallel.grad_buckets import GradBuckets
from megatron_msg.parallel.launch import LaunchEnv, init_parallel
from megatron_msg.training.trainer import Trainer
from tests.dist_harness import run_distributed
from tests.test_zero import _digest, _raw


def test_buckets_hold_every_parameter_once_last_layers_first():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    named = list(model.named_parameters())
    b = GradBuckets(named, group=None, bucket_mb=50 * 4 / 2 ** 20, exclude={"0.bias"})  # 50 entries
    flat = [p for bucket in b.buckets for p in bucket]
    assert [id(p) for p in flat] == [id(p) for n, p in reversed(named) if n != "0.bias"]
    assert len(b.buckets) > 1 and all(sum(p.numel() for p in bk[:-1]) < 50 for bk in b.buckets)
    b.remove()
    with pytest.raises(ValueError, match="bucket_mb"):
        GradBuckets(named, group=None, bucket_mb=0)


def _train(rank, world, raw, out_dir):
    cfg = config_from_dict(raw)
    ps = init_parallel(cfg.parallel, "cpu", LaunchEnv(rank, world, rank))
    launches = []
    original = GradBuckets.finish

    def finish(self):  # count what each step launched during its backward passes (a worker process)
        launches.append((self.launched_during_backward, len(self.buckets)))
        original(self)
    GradBuckets.finish = finish
    trainer = Trainer(cfg, out_dir=out_dir, progress=False, parallel=ps)
    res = trainer.run()
    return {"losses": res.losses, "params": _digest(p for _, p in trainer.model.named_parameters()),
            "launches": launches}


LAYOUTS = {"dp2": (2, {"dp": 2}), "pp2xdp2-zero1": (4, {"pp": 2, "dp": 2, "zero_stage": 1})}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_overlapped_reduction_trains_bit_identically_through_growth(layout, tmp_path):
    """Two replicas: each entry's sum is a + b either way, so the runs are equal bit for bit;
    through four growth events (new buckets each time) and two micro-batches per step."""
    world, parallel = LAYOUTS[layout]
    runs = {}
    for overlap in (False, True):
        raw = _raw("gpt", **parallel, overlap_grad_reduce=overlap, bucket_mb=0.002)  # a few KB: many buckets
        runs[overlap] = run_distributed(_train, world, args=(raw, tmp_path / str(overlap)))
    for plain, bucketed in zip(runs[False], runs[True]):
        assert bucketed["losses"] == plain["losses"] and len(plain["losses"]) == 40
        assert bucketed["params"] == plain["params"]
    for rank in runs[True]:
        early, total = zip(*rank["launches"])
        assert len(early) == 40 and min(total) > 2
        # every bucket launched from a hook inside backward, once per step (not per micro-batch)
        assert early == total
