"""Sweeps: ablation/search/launcher configs compose, skewed synthetic text, the sweep report, a tiny multirun."""

import csv
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import editdistance
import numpy as np
import pytest
import yaml
from hydra.utils import instantiate

from data.synthetic import make_renderer

from conftest import ROOT, compose_train, config_options, load_script

sweep_report = load_script("sweep_report")

LOSSES = config_options("loss")


# ------------------------------------------------------------------------------------------------ configs
def test_ablation_losses_sweeps_every_loss_over_three_seeds():
    cfg = compose_train("experiment=ablation_losses", hydra=True)
    params = cfg.hydra.sweeper.params
    assert sorted(params.loss.split(",")) == LOSSES and params.seed.split(",") == ["1", "2", "3"]
    assert cfg.callbacks.early_stopping is None and cfg.trainer.max_time is None
    assert "ablation_losses" in cfg.hydra.sweep.dir


def test_ablation_unbalanced_uses_skewed_text():
    cfg = compose_train("experiment=ablation_unbalanced", hydra=True)
    assert {"ctc", "focal_ctc", "reweighted_ctc"} <= set(cfg.hydra.sweeper.params.loss.split(","))
    assert cfg.hydra.sweeper.params.seed.split(",") == ["1", "2", "3"]
    assert cfg.data.zipf_exponent > 0 and cfg.callbacks.prediction_writer.dirpath == "/tmp/unused"
    datamodule = instantiate(cfg.data)
    probs = datamodule.renderer.char_probabilities
    assert set(probs) == set(datamodule.charset.characters) and max(probs.values()) > 20 * min(probs.values())


@pytest.mark.parametrize("option", config_options("hparams_search"))
def test_hparams_search_composes(option):
    cfg = compose_train(f"hparams_search={option}", hydra=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "minimize"
    assert cfg.optimized_metric == "val/cer" and sweeper.n_trials <= 20
    assert {"optimizer.lr", "model.rnn_hidden"} <= set(sweeper.params)
    for key in sweeper.params:  # every searched key exists in the composed config
        node = cfg
        for part in key.split("."):
            assert part in node, key
            node = node[part]
    if option != "optuna_ctc":
        assert any(key.startswith("loss.") for key in sweeper.params)


def test_launcher_configs_compose():
    joblib = compose_train("hydra/launcher=joblib_local", hydra=True).hydra.launcher
    assert joblib._target_.endswith("JoblibLauncher") and joblib.n_jobs >= 1
    slurm = compose_train("hydra/launcher=slurm", "trainer=ddp", "hydra.launcher.partition=gpu", hydra=True)
    launcher = slurm.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.partition == "gpu" and launcher.gpus_per_node == 1 and launcher.tasks_per_node == 1
    assert launcher.timeout_min > 0 and launcher.mem_gb > 0 and launcher.nodes == 1
    assert slurm.trainer.strategy == "ddp"


# --------------------------------------------------------------------------------------------- skewed text
def test_zipf_frequencies_follow_the_charset_order():
    renderer = make_renderer("text", "abcdef", zipf_exponent=1.0, min_length=5, max_length=5)
    counts = Counter("".join(renderer.sample_text(np.random.default_rng([0, i])) for i in range(4000)))
    expected = {c: 20000 / (k + 1) / sum(1 / (j + 1) for j in range(6)) for k, c in enumerate("abcdef")}
    for c in "abcdef":
        assert abs(counts[c] - expected[c]) < 0.1 * expected[c], (c, counts[c], expected[c])


def test_explicit_char_weights_and_uniform_default():
    renderer = make_renderer("digits", char_weights={"7": 1.0})
    assert {renderer.sample_text(np.random.default_rng([1, i])) for i in range(20)} <= {"7" * n for n in range(1, 11)}
    seq = make_renderer("digits", char_weights=[0, 0, 1, 1, 0, 0, 0, 0, 0, 0])
    assert set("".join(seq.sample_text(np.random.default_rng([2, i])) for i in range(50))) == {"2", "3"}
    # the uniform default still draws exactly as before (same texts per (seed, index))
    uniform = make_renderer("digits")
    rng = np.random.default_rng([3, 4])
    length = int(rng.integers(1, 11))
    assert uniform.sample_text(np.random.default_rng([3, 4])) == "".join("0123456789"[i] for i in rng.integers(10, size=length))
    for bad in ({"zipf_exponent": -1}, {"char_weights": [1, 2]}, {"char_weights": {"x": 1}},
                {"char_weights": [0] * 10}, {"zipf_exponent": 1, "char_weights": [1] * 10}):
        with pytest.raises(ValueError):
            make_renderer("digits", **bad)
    with pytest.raises(ValueError):
        make_renderer("text", words=["ab"], zipf_exponent=1.0)


# ------------------------------------------------------------------------------------------------- report
def test_alignment_is_a_minimum_edit_alignment():
    rng = np.random.default_rng(0)
    for _ in range(500):
        ref = "".join(rng.choice(list("abc"), size=rng.integers(0, 8)))
        hyp = "".join(rng.choice(list("abcd"), size=rng.integers(0, 8)))
        ops = sweep_report.align(ref, hyp)
        assert sum(op != "match" for op, _, _ in ops) == editdistance.eval(ref, hyp)
        assert "".join(r for _, r, _ in ops if r) == ref and "".join(h for _, _, h in ops if h) == hyp
    tally = sweep_report.CharErrors.of([("aab", "ab"), ("ba", "bxa"), ("c", "d")])
    assert tally.count == Counter({"a": 3, "b": 2, "c": 1})
    assert tally.errors == Counter({"a": 1, "c": 1}) and tally.insertions == 1


def _fake_run(path: Path, loss: str, seed: int, test_cer: float, curve: list[tuple[int, float, float]],
              predictions: list[tuple[str, str]]) -> None:
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"loss={loss}", f"seed={seed}", "experiment=x"]))
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "data": {"zipf_exponent": 1.0}}))
    metrics = {"val/cer": 0.01, "val/acc": 0.9, "test/cer": test_cer, "test/acc": 0.8, "train_seconds": 10.0,
               "epochs": 3, "steps": 30, "best_checkpoint": ""}
    (path / "final_metrics.json").write_text(json.dumps(metrics))
    (path / "csv").mkdir()
    with open(path / "csv" / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["epoch", "step", "train/loss", "val/cer", "time/fit_seconds"])
        writer.writeheader()
        for epoch, (step, cer, seconds) in enumerate(curve):  # Lightning logs validation at step index - 1
            writer.writerow({"epoch": epoch, "step": step - 1, "train/loss": 1.0})
            writer.writerow({"epoch": epoch, "step": step - 1, "val/cer": cer, "time/fit_seconds": seconds})
        writer.writerow({"epoch": len(curve), "step": curve[0][0], "val/cer": 0.9})  # trainer.validate: ignored
    lines = ["target\tprediction"] + [f"{t}\t{p}" for t, p in predictions]
    (path / "test_predictions.tsv").write_text("\n".join(lines) + "\n")


def test_curve_without_fit_clock(tmp_path):
    """Without time/fit_seconds, validations of epochs without training (trainer.validate after fit) are dropped."""
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,step,train/loss,val/cer\n0,9,1.0,\n0,9,,0.5\n1,19,0.5,\n1,19,,0.2\n2,20,,0.2\n")
    assert sweep_report._read_curve(path) == [{"step": 10.0, "val/cer": 0.5}, {"step": 20.0, "val/cer": 0.2}]


def test_sweep_report(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    frequent_ok = [("aaab", "aaab")] * 3 + [("aab", "aa")]  # 'b' (rare) deleted once in 2
    _fake_run(sweep / "0", "ctc", 1, 0.10, [(10, 0.5, 5.0), (20, 0.04, 9.0), (30, 0.02, 13.0)], frequent_ok)
    _fake_run(sweep / "1", "ctc", 2, 0.20, [(10, 0.5, 5.0), (20, 0.2, 9.0), (30, 0.03, 14.0)], frequent_ok)
    _fake_run(sweep / "2", "focal_ctc", 1, 0.30, [(10, 0.9, 5.0), (20, 0.8, 9.0), (30, 0.7, 13.0)],
              [("aaab", "xaab")] * 4)
    (sweep / "3" / ".hydra").mkdir(parents=True)  # a failed run
    (sweep / "3" / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["loss=focal_ctc", "seed=2", "experiment=x"]))

    sweep_report.main([str(sweep)])
    printed = capsys.readouterr().out
    report = (sweep / "report.md").read_text()
    assert (sweep / "val_cer.png").stat().st_size > 1000
    ctc_row = next(line for line in printed.splitlines() if line.startswith("| ctc "))
    cells = [c.strip() for c in ctc_row.strip("|").split("|")]
    header = [c.strip() for c in printed.splitlines()[0].strip("|").split("|")]
    row = dict(zip(header, cells))
    assert row["runs"] == "2/2" and row["test CER %"] == "15.00 ± 7.07"
    assert row["steps to val CER ≤ 5%"] == "25 ± 7" and row["s to val CER ≤ 5%"] == "12 ± 4"
    assert row["frequent-char err %"] == "0.00 ± 0.00" and row["rare-char err %"] == "25.00 ± 0.00"
    focal = dict(zip(header, [c.strip() for c in next(
        line for line in printed.splitlines() if line.startswith("| focal_ctc ")).strip("|").split("|")]))
    assert focal["runs"] == "1/2" and focal["steps to val CER ≤ 5%"] == "never"
    assert focal["frequent-char err %"] == "33.33 ± 0.00"
    assert "Runs without final_metrics.json" in report and "## Per-character test error rate" in report
    assert printed.strip() in report


def test_sweep_report_options(tmp_path, capsys):
    """--threshold moves 'steps to reach'; --out writes elsewhere; --no-per-char drops the table; --group-by."""
    sweep, out = tmp_path / "sweep", tmp_path / "out"
    skewed_ok = [("aaab", "aaab")] * 4
    _fake_run(sweep / "0", "ctc", 1, 0.10, [(10, 0.5, 5.0), (20, 0.25, 9.0), (30, 0.02, 13.0)], skewed_ok)
    _fake_run(sweep / "1", "ctc", 2, 0.20, [(10, 0.2, 5.0), (20, 0.1, 9.0), (30, 0.03, 14.0)], skewed_ok)
    sweep_report.main([str(sweep), "--out", str(out), "--threshold", "0.3", "--no-per-char"])
    printed = capsys.readouterr().out
    header = [c.strip() for c in printed.splitlines()[0].strip("|").split("|")]
    row = dict(zip(header, [c.strip() for c in printed.splitlines()[2].strip("|").split("|")]))
    assert row["steps to val CER ≤ 30%"] == "15 ± 7"  # 20 and 10 steps
    assert (out / "report.md").exists() and (out / "val_cer.png").exists() and not (sweep / "report.md").exists()
    assert "Per-character" not in (out / "report.md").read_text()
    sweep_report.main([str(sweep), "--out", str(out), "--group-by", "seed"])
    rows = [line for line in capsys.readouterr().out.splitlines()[2:] if line.startswith("|")]
    assert len(rows) == 2  # one variant per seed, one run each


TINY_RUN = ["model=crnn_small", "data.train_size=32", "data.val_size=16", "data.test_size=16", "data.batch_size=16"]


def run_train(*overrides: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python train.py OVERRIDES`` at a tiny size (small model, 32 train lines); asserts it exits 0."""
    result = subprocess.run([sys.executable, "train.py", *overrides, *TINY_RUN], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_tiny_multirun_and_report(tmp_path):
    """`python train.py -m experiment=ablation_unbalanced` (2 losses x 1 seed, a few steps), then the report."""
    sweep = tmp_path / "sweep"
    run_train("-m", "experiment=ablation_unbalanced", "loss=ctc,focal_ctc", "seed=1", "trainer.max_epochs=2",
              f"hydra.sweep.dir={sweep}")
    for run in ("0", "1"):
        assert (sweep / run / "final_metrics.json").exists() and (sweep / run / "csv" / "metrics.csv").exists()
        assert len((sweep / run / "test_predictions.tsv").read_text().splitlines()) == 17
    report = subprocess.run([sys.executable, "scripts/sweep_report.py", str(sweep)], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert report.returncode == 0, report.stderr[-3000:]
    assert "| ctc | 1/1 |" in report.stdout and "| focal_ctc | 1/1 |" in report.stdout
    assert "rare-char err %" in report.stdout and (sweep / "val_cer.png").exists()


@pytest.mark.slow
def test_optuna_search_runs_trials(tmp_path):
    sweep = tmp_path / "optuna"
    run_train("hparams_search=optuna_focal_ctc", "hydra.sweeper.n_trials=2", "trainer.max_epochs=1",
              f"hydra.sweep.dir={sweep}")
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert {"optimizer.lr", "loss.gamma"} <= set(best["best_params"]) and 0 <= best["best_value"] <= 2
    assert {p.name for p in sweep.iterdir() if p.is_dir()} == {"0", "1"}


@pytest.mark.slow
def test_joblib_launcher_runs_a_sweep_in_parallel(tmp_path):
    sweep = tmp_path / "joblib"
    result = run_train("-m", "hydra/launcher=joblib_local", "loss=ctc,focal_ctc", "trainer.max_epochs=1",
                       "data.num_workers=0", f"hydra.sweep.dir={sweep}", env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert "Joblib.Parallel(n_jobs=2" in result.stdout + result.stderr
    for run in ("0", "1"):
        metrics = json.loads((sweep / run / "final_metrics.json").read_text())
        assert 0 <= metrics["test/cer"] <= 2
