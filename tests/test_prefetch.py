"""Batches built ahead in a background thread (training/prefetch.py) are the batches of the step."""
import threading

import pytest
import torch

from megatron_msg.config import config_from_dict
from megatron_msg.training.prefetch import PrefetchedBatches
from megatron_msg.training.trainer import Trainer


class _Source:
    """A pure batch source that records the thread and order of its calls."""

    def __init__(self, fail_at=None):
        self.calls, self.threads, self.fail_at = [], set(), fail_at

    def get(self, step, micro):
        self.calls.append((step, micro))
        self.threads.add(threading.get_ident())
        if (step, micro) == self.fail_at:
            raise ValueError(f"bad sample at step {step}")
        return {"tokens": torch.full((2, 3), step * 10 + micro)}


def test_gives_the_source_batches_built_ahead_in_one_other_thread():
    src = _Source()
    pre = PrefetchedBatches(src, lambda s: range(2), depth=2)
    for step in range(5):
        for m in range(2):
            assert torch.equal(pre.get(step, m)["tokens"], torch.full((2, 3), step * 10 + m))
    assert {(5, 0), (5, 1), (6, 0), (6, 1)} == set(pre._pending)  # ahead of the last step asked for
    pre.close()
    assert src.threads == {next(iter(src.threads))} != {threading.get_ident()}
    assert len(src.calls) == len(set(src.calls))  # each built once


def test_keys_nobody_prefetched_are_built_on_request_and_passed_ones_dropped():
    src = _Source()
    pre = PrefetchedBatches(src, lambda s: range(1), depth=1)
    assert pre.get(0, 0)["tokens"][0, 0] == 0
    assert pre.get(3, 5)["tokens"][0, 0] == 35  # another layout's micro-batch: not prefetched
    assert all(k[0] >= 3 for k in pre._pending)  # steps 0-2's prefetched batches are gone
    pre.close()


def test_an_error_building_a_batch_is_raised_by_the_step_that_needs_it():
    pre = PrefetchedBatches(_Source(fail_at=(2, 0)), lambda s: range(1), depth=3)
    pre.get(0, 0)  # step 2 is built (and fails) in the background: nothing raised yet
    pre.get(1, 0)
    with pytest.raises(ValueError, match="bad sample at step 2"):
        pre.get(2, 0)
    pre.close()


def _raw(prefetch: int, steps: int = 6) -> dict:
    return {"model": {"arch": "gpt", "hidden": 16, "ffn": 32, "heads": 2, "layers": 2, "head_dim": 8,
                      "seq_len": 16},
            "growth": {"stages": [{"at_step": 3, "ffn": 64, "phi": 2, "batch_size": 4}]}, "lr": {"warmup_steps": 2},
            "train": {"steps": steps, "batch_size": 2, "grad_accum": 2, "log_interval": 1, "eval_interval": 100,
                      "eval_iters": 1, "save_interval": 4, "device": "cpu", "tensorboard": False,
                      "plot": False, "prefetch": prefetch}}


def test_training_and_resume_are_bit_identical_with_and_without_prefetch(tmp_path):
    """The batch size changes at the growth: the prefetched keys follow the schedule."""
    plain = Trainer(config_from_dict(_raw(0)), out_dir=tmp_path / "plain", progress=False).run()
    ahead = Trainer(config_from_dict(_raw(3)), out_dir=tmp_path / "ahead", progress=False).run()
    assert plain.losses == ahead.losses and len(plain.losses) == 6
    first = Trainer(config_from_dict(_raw(3)), out_dir=tmp_path / "resumed", progress=False).run(max_steps=4)
    rest = Trainer(config_from_dict(_raw(3)), out_dir=tmp_path / "resumed", progress=False).run()
    assert {**first.losses, **rest.losses} == plain.losses
