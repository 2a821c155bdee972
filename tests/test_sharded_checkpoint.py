"""Sharded checkpoints (issue 16, item 1): every rank writes its own pieces; any layout resumes them.

What is checked:

* the boxes (checkpoint/boxes.py) of every TP block and every ZeRO fragment tile each logical
  tensor exactly once, vocabulary padding left out (a property test over shapes and cuts);
* the sharded and the per-tensor formats hold the same logical state, bit for bit;
* a TP2 x PP2 ZeRO-1 save is written by all four ranks, and DP4 ZeRO-2, one process and two
  processes (TP2) each load exactly the saved weights, moments and step offsets, then continue
  the run that never stopped (tolerance below);
* ``msg-reshard`` cuts a store exactly as a run on the target layout does, that run resumes it as
  it resumes the original, and a round trip A -> B -> A gives A's state and chunks bit for bit;
* damage to the store (a flipped byte in a chunk, a truncated or missing rank file, a missing or
  foreign ``.metadata``) is named or skipped, never taken as complete.

Tolerance of the continued losses on another layout: the loaded state is bit-identical
(asserted), so the losses differ only by fp32 summation order (TP splits matmul reductions, DP
sums micro-batch gradients across ranks instead of in sequence).  Measured over these six steps
(2026-12-02): 1.1e-7 relative on DP4 ZeRO-2 and on one process, 0 on TP2 and on the saving layout;
a wrongly placed block or moment moves the loss by 1e-3 or more at the first step.  The bound is
1e-5, as for the other layout-change tests.
"""
from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_msg.checkpoint.boxes import piece_boxes, unit_view_shape
from megatron_msg.checkpoint.io import (MANIFEST, CheckpointError, checkpoint_damage, find_latest, latest_checkpoint,
                                        open_checkpoint)
from megatron_msg.checkpoint.logical import gather_model, gather_optimizer
from megatron_msg.checkpoint.shard import shard_tensor
from megatron_msg.cli.reshard import main as msg_reshard
from megatron_msg.config import ModelConfig, config_from_dict
from megatron_msg.model.init import logical_shapes
from megatron_msg.model.layout import tensor_spec
from megatron_msg.parallel.launch import LaunchEnv, init_parallel
from megatron_msg.training.trainer import Trainer
from tests.dist_harness import run_distributed

STOP, STEPS = 24, 30


def _raw(**parallel) -> dict:
    return {
        "model": {"arch": "gpt", "hidden": 16, "ffn": 32, "heads": 2, "layers": 2, "head_dim": 8, "seq_len": 16},
        "optimizer": {"lr": 3e-3, "min_lr": 3e-4},
        "lr": {"warmup_steps": 4, "decay_steps": STEPS},
        "train": {"steps": STEPS, "batch_size": 2, "grad_accum": 4, "log_interval": 1, "eval_interval": 100,
                  "eval_iters": 1, "save_interval": 12, "device": "cpu", "tensorboard": False, "plot": False},
        # Stopped at 24, inside the heads ramp (20..32): masks mid-ramp, per-entry step offsets.
        "growth": {"defaults": {"phi": 12}, "stages": [{"at_step": 6, "ffn": 48}, {"at_step": 20, "heads": 4}]},
        "parallel": {"growth_layout_parts": 2, **parallel},
    }


# --------------------------------------------------------------------------- geometry

@settings(max_examples=60, deadline=None)
@given(arch=st.sampled_from(["gpt", "bert"]), tp=st.sampled_from([1, 2, 4]), vocab=st.integers(5, 23),
       cuts=st.lists(st.floats(0, 1), max_size=4), seed=st.integers(0, 2**16))
def test_boxes_of_blocks_and_fragments_tile_every_logical_tensor_once(arch, tp, vocab, cuts, seed):
    cfg = ModelConfig(arch=arch, hidden=8, ffn=8, heads=4, layers=1, head_dim=2, seq_len=4, vocab_size=vocab,
                      tie_embeddings=arch == "bert")
    gen = torch.Generator().manual_seed(seed)
    for name, shape in logical_shapes(cfg).items():
        full = torch.randn(shape, generator=gen)
        view = unit_view_shape(name, shape, cfg)
        seen = torch.zeros(view, dtype=torch.int32)
        rebuilt = torch.zeros(view)
        split = tensor_spec(name).tp_split_dim() is not None
        for rank in range(tp) if split else [0]:  # a replicated tensor: every rank's copy is the same box
            block = shard_tensor(name, full, cfg, tp, rank).reshape(-1)
            points = sorted({0, block.numel(), *(int(c * block.numel()) for c in cuts)})
            for start, end in zip(points, points[1:]):  # a ZeRO partition of the block
                for box in piece_boxes(name, shape, cfg, tp, rank, start, end):
                    where = tuple(slice(o, o + s) for o, s in zip(box.offsets, box.sizes))
                    rebuilt[where] = block[start + box.start:start + box.start + box.numel].view(box.sizes)
                    seen[where] += 1
        assert bool((seen == 1).all()), name
        assert torch.equal(rebuilt.reshape(shape), full), name


# --------------------------------------------------------------------------- one process

def _state(path: Path) -> dict:
    ckpt = open_checkpoint(path)
    return {"model": {n: ckpt.model[n] for n in ckpt.model},
            "optimizer": {n: ckpt.optimizer[n] for n in ckpt.optimizer}}


def _assert_same_state(a: dict, b: dict) -> None:
    assert a["model"].keys() == b["model"].keys() and a["optimizer"].keys() == b["optimizer"].keys()
    for name, t in a["model"].items():
        assert torch.equal(t, b["model"][name]), name
    for name, st_a in a["optimizer"].items():
        st_b = b["optimizer"][name]
        assert (st_a["step"], st_a["max_offset"]) == (st_b["step"], st_b["max_offset"]), name
        for key in ("exp_avg", "exp_avg_sq", "step_offset"):
            if st_a.get(key) is None:
                assert st_b.get(key) is None, (name, key)
            else:
                assert torch.equal(st_a[key], st_b[key]), (name, key)


def test_sharded_and_per_tensor_formats_hold_the_same_state(tmp_path):
    raw = _raw()
    raw["train"]["steps"] = STOP
    Trainer(config_from_dict(raw), out_dir=tmp_path / "sharded", progress=False).run()
    raw["train"]["checkpoint_format"] = "logical"
    Trainer(config_from_dict(raw), out_dir=tmp_path / "logical", progress=False).run()
    sharded, logical = (latest_checkpoint(tmp_path / d) for d in ("sharded", "logical"))
    assert open_checkpoint(sharded).store is not None and open_checkpoint(logical).store is None
    state = _state(sharded)
    assert any(st["step_offset"] is not None for st in state["optimizer"].values())
    _assert_same_state(state, _state(logical))


# --------------------------------------------------------------------------- across layouts

def _resume_and_report(rank, world, raw, out_dir):
    """Resume ``out_dir`` on ``raw``'s layout: the logical state just loaded, then the continued losses."""
    cfg = config_from_dict(raw)
    ps = init_parallel(cfg.parallel, "cpu", LaunchEnv(rank, world, rank))
    trainer = Trainer(cfg, out_dir=out_dir, progress=False, parallel=ps)
    loaded = {"model": gather_model(trainer.model, trainer.ps, optimizer=trainer.optimizer),
              "optimizer": gather_optimizer(trainer.optimizer, trainer.model, trainer.ps)}
    losses = trainer.run().losses
    return {"loaded": loaded if rank == 0 else None, "losses": losses}


def _train(rank, world, raw, out_dir, max_steps):
    cfg = config_from_dict(raw)
    ps = init_parallel(cfg.parallel, "cpu", LaunchEnv(rank, world, rank))
    return Trainer(cfg, out_dir=out_dir, progress=False, parallel=ps).run(max_steps=max_steps).losses


def _max_rel_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(abs(a[k] - b[k]) / abs(b[k]) for k in a)


def _chunks(checkpoint: Path) -> dict[str, set]:
    """Store key -> its chunks (offsets, sizes), from the store's DCP metadata."""
    md = open_checkpoint(checkpoint).store.read_metadata().state_dict_metadata
    return {k: {(tuple(c.offsets), tuple(c.sizes)) for c in v.chunks} for k, v in md.items()}


def test_tp2_pp2_zero1_save_resumes_on_dp4_zero2_one_process_and_two_and_reshards_there(tmp_path):
    saved = _raw(tp=2, pp=2, zero_stage=1)
    ref = run_distributed(_train, 4, args=(saved, tmp_path / "ref", None))[0]
    run_distributed(_train, 4, args=(saved, tmp_path / "run", STOP))
    ckpt = latest_checkpoint(tmp_path / "run")
    assert ckpt.name == f"step_{STOP:08d}"
    files = sorted((ckpt / "dcp").glob("*.distcp"))
    assert [f.name for f in files] == [f"__{r}_0.distcp" for r in range(4)]  # every rank wrote its pieces
    assert all(f.stat().st_size > 0 for f in files)
    saved_state = _state(ckpt)
    want = {s: v for s, v in ref.items() if s >= STOP}

    targets = {"dp4_zero2": (4, {"dp": 4, "zero_stage": 2}), "tp2_two_processes": (2, {"tp": 2})}
    continued = {}
    for label, (world, parallel) in targets.items():
        run_dir = tmp_path / label
        shutil.copytree(tmp_path / "run", run_dir)
        out = run_distributed(_resume_and_report, world, args=(_raw(**parallel), run_dir))
        _assert_same_state(out[0]["loaded"], saved_state)
        assert _max_rel_diff(out[0]["losses"], want) < 1e-5, label
        continued[label] = out[0]["losses"]

    shutil.copytree(tmp_path / "run", tmp_path / "single")
    single = Trainer(config_from_dict(_raw()), out_dir=tmp_path / "single", progress=False)
    _assert_same_state({"model": gather_model(single.model, single.ps, optimizer=single.optimizer),
                        "optimizer": gather_optimizer(single.optimizer, single.model, single.ps)}, saved_state)
    assert _max_rel_diff(single.run().losses, want) < 1e-5

    # msg-reshard for DP4 ZeRO-2 cuts the store as a DP4 ZeRO-2 run does (its own final save, same
    # shapes); that run resumes it exactly as it resumed the original; resharding back gives the
    # original's state and chunks, bit for bit.
    assert msg_reshard([str(ckpt), "--out-dir", str(tmp_path / "b"), "--dp", "4", "--zero", "2"]) == 0
    b = latest_checkpoint(tmp_path / "b")
    _assert_same_state(_state(b), saved_state)
    assert _chunks(b) == _chunks(latest_checkpoint(tmp_path / "dp4_zero2"))
    assert _chunks(b) != _chunks(ckpt)
    out = run_distributed(_resume_and_report, 4, args=(_raw(dp=4, zero_stage=2), tmp_path / "b"))
    assert out[0]["losses"] == continued["dp4_zero2"]
    assert msg_reshard([str(b), "--out-dir", str(tmp_path / "a2"), "--tp", "2", "--pp", "2", "--zero", "1"]) == 0
    a2 = latest_checkpoint(tmp_path / "a2")
    _assert_same_state(_state(a2), saved_state)
    assert _chunks(a2) == _chunks(ckpt)


# --------------------------------------------------------------------------- damage

@pytest.fixture(scope="module")
def two_saves(tmp_path_factory) -> Path:
    """A run directory with sharded checkpoints at steps 12 and 13."""
    out = tmp_path_factory.mktemp("two_saves")
    Trainer(config_from_dict(_raw()), out_dir=out, progress=False).run(max_steps=13)
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst / "checkpoints"


def test_every_chunk_is_checksummed_in_the_manifest(two_saves):
    root = two_saves / "checkpoints" / "step_00000013"
    manifest = json.loads((root / MANIFEST).read_text())
    files = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} - {MANIFEST}
    assert set(manifest["files"]) == files
    data = (root / "dcp" / "__0_0.distcp").read_bytes()
    rows = manifest["chunks"]["dcp/__0_0.distcp"]
    assert sum(length for _, length, _ in rows) == len(data)  # the chunks tile the file
    assert all(zlib.crc32(data[o:o + n]) == crc for o, n, crc in rows)


def test_a_flipped_byte_in_a_chunk_is_named_with_the_previous_checkpoint_offered(two_saves, tmp_path):
    ckpts = _copy(two_saves, tmp_path / "run")
    data = bytearray((ckpts / "step_00000013" / "dcp" / "__0_0.distcp").read_bytes())
    data[len(data) // 3] ^= 0x10
    (ckpts / "step_00000013" / "dcp" / "__0_0.distcp").write_bytes(bytes(data))
    assert checkpoint_damage(ckpts / "step_00000013") is None  # same size: found when read
    with pytest.raises(CheckpointError) as exc:
        Trainer(config_from_dict(_raw()), out_dir=tmp_path / "run", progress=False)
    assert "__0_0.distcp: checksum mismatch in the chunk at byte" in str(exc.value)
    assert f"--resume-from {ckpts / 'step_00000012'}" in str(exc.value)


@pytest.mark.parametrize("damage,words", [
    (lambda root: (root / "dcp" / "__0_0.distcp").write_bytes(b"short"), "__0_0.distcp is 5 bytes"),
    (lambda root: (root / "dcp" / "__0_0.distcp").unlink(), "__0_0.distcp is missing"),
    (lambda root: (root / "dcp" / ".metadata").unlink(), "dcp/.metadata is missing"),
])
def test_a_damaged_store_is_skipped_for_the_newest_complete_checkpoint(two_saves, tmp_path, damage, words):
    ckpts = _copy(two_saves, tmp_path / "run")
    damage(ckpts / "step_00000013")
    found = find_latest(tmp_path / "run")
    assert found.path == ckpts / "step_00000012" and words in found.damaged[0][1]


def test_a_foreign_store_metadata_is_refused(two_saves, tmp_path):
    ckpts = _copy(two_saves, tmp_path / "run")
    a, b = ckpts / "step_00000012" / "dcp", ckpts / "step_00000013" / "dcp"
    for name in (".metadata", "__0_0.distcp"):  # the whole store of another step: sizes agree, contents do not
        (b / name).write_bytes((a / name).read_bytes())
    manifest = json.loads((ckpts / "step_00000013" / MANIFEST).read_text())
    manifest["files"]["dcp/.metadata"]["bytes"] = (b / ".metadata").stat().st_size
    manifest["files"]["dcp/__0_0.distcp"]["bytes"] = (b / "__0_0.distcp").stat().st_size
    (ckpts / "step_00000013" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"\.metadata: checksum mismatch"):
        open_checkpoint(ckpts / "step_00000013")


def test_a_store_missing_a_tensor_is_refused_by_name(two_saves, tmp_path):
    ckpts = _copy(two_saves, tmp_path / "run")
    root = ckpts / "step_00000013"
    state = torch.load(root / "state.pt", weights_only=True)
    state["tensors"]["layers.9.mlp.fc1.weight"] = {"shape": [48, 16], "optimizer": None}
    from megatron_msg.checkpoint.io import _save_file  # rewrite state.pt and its manifest entry consistently
    (root / "state.pt").unlink()
    entry = _save_file(state, root / "state.pt")
    manifest = json.loads((root / MANIFEST).read_text())
    manifest["files"]["state.pt"] = entry
    (root / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"stored tensor layers\.9\.mlp\.fc1\.weight/fp32 is missing"):
        open_checkpoint(root)


def test_unit_view_shapes_are_what_the_tp_blocks_need():
    cfg = ModelConfig(arch="gpt", hidden=8, ffn=12, heads=4, layers=1, head_dim=2, seq_len=4, vocab_size=11)
    assert unit_view_shape("layers.0.attn.qkv.weight", (24, 8), cfg) == (3, 4, 2, 8)
    assert unit_view_shape("layers.0.attn.proj.weight", (8, 8), cfg) == (8, 1, 4, 2)
    assert unit_view_shape("layers.0.mlp.fc2.weight", (8, 12), cfg) == (8, 1, 12, 1)
    assert unit_view_shape("embed.tok.weight", (11, 8), cfg) == (11, 8)
    assert unit_view_shape("layers.0.ln1.weight", (8,), cfg) == (8,)
    # the last vocabulary block of TP4 (rows 9..11 of 11, one padding row) is one box of 2 rows
    boxes = piece_boxes("embed.tok.weight", (11, 8), cfg, 4, 3)
    assert [(b.offsets, b.sizes) for b in boxes] == [((9, 0), (2, 8))]


def test_msg_reshard_refuses_what_does_not_fit_in_one_line(two_saves, tmp_path, capsys):
    ckpt = two_saves / "checkpoints" / "step_00000013"
    assert msg_reshard([str(ckpt), "--out-dir", str(tmp_path / "a"), "--tp", "3", "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == "msg-reshard: the checkpoint's heads=2 is not divisible by tp=3"
    assert msg_reshard([str(ckpt), "--out-dir", str(two_saves), "--no-progress"]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert msg_reshard([str(tmp_path / "none"), "--out-dir", str(tmp_path / "b"), "--no-progress"]) == 2
    assert not (tmp_path / "a" / "checkpoints").exists() or not any((tmp_path / "a" / "checkpoints").iterdir())
    # --format logical and --verify: the per-tensor copy holds the same state, the logits agree exactly
    assert msg_reshard([str(ckpt), "--out-dir", str(tmp_path / "l"), "--format", "logical", "--verify",
                        "--no-progress"]) == 0
    assert "largest logit difference on a fixed batch: 0.000e+00" in capsys.readouterr().out
    _assert_same_state(_state(latest_checkpoint(tmp_path / "l")), _state(ckpt))
