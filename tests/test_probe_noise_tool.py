"""tools/probe_noise.py's statistics: on a synthetic curve with known noise they recover it."""
import importlib.util
from pathlib import Path

import numpy as np

_spec = importlib.util.spec_from_file_location("probe_noise", Path(__file__).parents[1] / "tools" / "probe_noise.py")
probe_noise = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(probe_noise)


def _curve(steps):
    return 4.0 - 0.5 * np.log(steps) + 0.01 * np.log(steps) ** 2


def test_shared_noise_is_not_averaged_away_by_more_batches():
    """Noise common to every batch (the weights') stays at its sd whatever the batch count; the
    per-batch part shrinks as 1/sqrt(n); the fitted window drop is the curve's."""
    rng = np.random.default_rng(0)
    steps = np.arange(200, 1210, 10)
    shared = rng.normal(0, 0.01, size=(len(steps), 1))
    own = rng.normal(0, 0.04, size=(len(steps), 64))
    per_batch = _curve(steps)[:, None] + shared + own
    rows = {r["batches"]: r for r in probe_noise.summarise(steps, per_batch, window=60, start=200)}
    assert sorted(rows) == [1, 2, 4, 8, 16, 32, 64]
    expected = {n: np.sqrt(0.01 ** 2 + 0.04 ** 2 / n) for n in rows}
    for n, row in rows.items():
        assert abs(row["residual_sd"] - expected[n]) < 0.25 * expected[n], (n, row["residual_sd"], expected[n])
    assert rows[64]["residual_sd"] < 0.5 * rows[1]["residual_sd"]
    true_last = _curve(np.array([1200.0 - 60]))[0] - _curve(np.array([1200.0]))[0]
    assert abs(rows[64]["window_drop_last"] - true_last) < 0.2 * true_last
    assert abs(rows[64]["snr_last"] - rows[64]["window_drop_last"] / (np.sqrt(2) * rows[64]["residual_sd"])) < 1e-9
    # white noise: no autocorrelation to speak of
    assert all(abs(v) < 0.35 for v in rows[64]["autocorrelation"].values())


def test_smooth_fit_is_exact_on_its_own_family():
    steps = np.arange(100, 600, 25)
    assert np.allclose(probe_noise.smooth_fit(steps, _curve(steps)), _curve(steps))


def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys):
    """No checkpoint, a noise.json of another measurement, a corrupt one: exit 2, nothing trained."""
    import json

    import pytest
    cases = [(tmp_path / "empty", None, "holds no checkpoint"),
             (tmp_path / "run", {"run": "other", "steps": 600, "every": 10, "batches": 64, "rows": []},
              "holds another measurement"),
             (tmp_path / "run", "not json", "is not valid JSON")]
    for i, (run, stored, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        if stored is not None:
            out.mkdir()
            (out / "noise.json").write_text(stored if isinstance(stored, str) else json.dumps(stored))
        with pytest.raises(SystemExit) as e:
            probe_noise.main([str(run), "--out", str(out)])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err
        assert not (out / "run").exists()


def test_from_zero_and_a_window_past_the_fit_are_refused(tmp_path, capsys):
    """--from 0 (the fit is in ln step) and a window longer than the fitted span: exit 2, named."""
    import pytest
    for args, message in ((["--from", "0"], "--from >= 1"), (["--window", "401"], "--window <=")):
        with pytest.raises(SystemExit) as e:
            probe_noise.main([str(tmp_path), "--out", str(tmp_path / "out"), *args])
        assert e.value.code == 2
        assert message in capsys.readouterr().err


def test_measures_each_batch_of_a_real_run_and_prints_the_table(tmp_path, capsys):
    """End to end on a tiny checkpointed run: one row of per-batch losses every --every steps,
    the batches' losses differ, training lowers them, and the table has a row per batch count."""
    import json

    from megatron_msg.config import config_from_dict
    from megatron_msg.training.trainer import Trainer
    raw = {"model": {"arch": "gpt", "hidden": 16, "ffn": 32, "heads": 2, "layers": 1, "head_dim": 8, "seq_len": 16},
           "optimizer": {"lr": 3e-3}, "lr": {"warmup_steps": 2},
           "train": {"steps": 4, "batch_size": 2, "grad_accum": 1, "eval_iters": 2, "save_interval": 4,
                     "device": "cpu", "tensorboard": False, "plot": False}}
    Trainer(config_from_dict(raw), out_dir=tmp_path / "run", progress=False).run()
    probe_noise.main([str(tmp_path / "run"), "--out", str(tmp_path / "noise"), "--steps", "24", "--every", "2",
                      "--batches", "3", "--from", "2", "--window", "4"])
    data = json.loads((tmp_path / "noise" / "noise.json").read_text())
    assert [r["step"] for r in data["rows"]] == list(range(0, 25, 2))
    assert all(len(set(r["losses"])) == 3 for r in data["rows"])
    assert np.mean(data["rows"][-1]["losses"]) < np.mean(data["rows"][0]["losses"])
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in table[1:]] == ["1", "2", "3"]
