"""msg-bench optimizer / train at the smallest sizes: the reports are complete and well-formed
(a structure check; the speed figures live in docs/benchmarks.md)."""
import json

from megatron_msg.cli.bench import main as msg_bench


def test_optimizer_bench_reports_every_variant(tmp_path):
    msg_bench(["optimizer", "--out", str(tmp_path), "--hidden", "64", "--layers", "1", "--vocab", "128",
               "--steps", "1", "--windows", "1"])
    res = json.loads((tmp_path / "optimizer.json").read_text())
    assert res["tensors"] == 16 and res["entries_with_offsets"] > 0
    rows = {r["variant"]: r for r in res["rows"]}
    assert len(rows) == 5 and rows["torch AdamW(fused=True)"]["vs_torch_fused"] == 1.0
    assert all(r["step_ms"] > 0 for r in rows.values())
    assert "| MSGAdamW, fused |" in (tmp_path / "optimizer.md").read_text()


def test_train_bench_times_the_trainer_the_plain_loop_and_the_reference(tmp_path, capsys):
    msg_bench(["train", "--size", "tiny", "--out", str(tmp_path), "--steps", "1", "--windows", "1", "--seq", "16"])
    res = json.loads((tmp_path / "train_tiny.json").read_text())
    labels = [r["variant"] for r in res["rows"]]
    assert labels == ["msg-train step, masks removed", "msg-train step, during a ramp",
                      "plain PyTorch loop, same model and batches", "nanoGPT-style reference, eager"]
    for r in res["rows"]:
        assert r["step_ms"] > 0 and r["tokens_per_s"] > 0 and 0 < r["mfu"]
    assert res["rows"][2]["vs_plain_loop"] == 1.0 and res["rows"][3]["reference_speed"] == 1.0
    assert res["seq_len"] == 16 and res["parameters"] > 0
