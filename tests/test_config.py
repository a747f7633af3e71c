"""Every option of every config group composes and instantiates; bad choices list the valid ones."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from hydra.utils import instantiate
from omegaconf import DictConfig

from crnn.pipeline import instantiate_dict

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
GROUPS = ("model", "loss", "data", "decoder", "trainer", "callbacks", "logger", "debug", "experiment")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_train(*overrides: str, output_dir: Path = Path("/tmp/unused")) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[f"paths.output_dir={output_dir}", *overrides])


def test_groups_have_the_expected_options():
    assert set(options("model")) == {"crnn", "crnn_small", "crnn_large"}
    assert set(options("loss")) == {"ctc", "python_ctc", "python_ctc_autograd", "focal_ctc", "reweighted_ctc",
                                    "smoothed_ctc", "maxent_ctc"}
    assert {"digits", "text"} <= set(options("data"))
    assert set(options("decoder")) == {"greedy", "beam"}
    assert {"default", "cpu", "gpu"} <= set(options("trainer"))
    assert {"csv", "tensorboard"} <= set(options("logger"))
    assert {"fast_dev_run", "overfit"} <= set(options("debug"))
    assert options("experiment")


def test_defaults():
    cfg = compose_train()
    assert cfg.data.kind == "digits" and cfg.model._target_ == "crnn.model.CRNN"
    assert cfg.loss._target_ == "losses.CTCLoss" and cfg.decoder._target_ == "crnn.decoders.GreedyDecoder"
    assert cfg.trainer.accelerator == "auto" and cfg.optimized_metric == "val/cer"
    assert set(cfg.callbacks) >= {"model_checkpoint", "early_stopping", "lr_monitor", "progress_bar"}
    assert set(cfg.logger) == {"csv"}


@pytest.mark.parametrize("option", options("model"))
def test_model_options_build_and_run(option):
    model = instantiate(compose_train(f"model={option}").model, num_classes=11, height=32)
    log_probs, lengths = model(torch.rand(2, 1, 32, 64), torch.tensor([64, 40]))
    assert log_probs.shape[1:] == (2, 11) and lengths.shape == (2,)


@pytest.mark.parametrize("option", options("loss"))
def test_loss_options_build_and_run(option):
    loss = instantiate(compose_train(f"loss={option}").loss, blank=0)
    log_probs = torch.randn(12, 2, 5).log_softmax(-1).requires_grad_()
    value = loss(log_probs, torch.tensor([[1, 2, 2], [3, 4, 0]]), torch.tensor([12, 9]), torch.tensor([3, 2]))
    value.backward()
    assert value.shape == () and torch.isfinite(value) and torch.isfinite(log_probs.grad).all()


@pytest.mark.parametrize("option", options("data"))
def test_data_options_build(option):
    cfg = compose_train(f"data={option}")
    if "train_dir" in cfg.data.keys():
        pytest.skip("needs a dataset on disk; built from rendered data in tests/test_real_data.py")
    datamodule = instantiate(cfg.data)
    assert datamodule.charset.num_classes > 10


@pytest.mark.parametrize("option", options("decoder"))
def test_decoder_options_decode(option):
    decoder = instantiate(compose_train(f"decoder={option}").decoder)
    log_probs = torch.full((4, 1, 3), -10.0)
    log_probs[[0, 1, 2, 3], 0, [1, 0, 1, 2]] = 0.0
    assert decoder(log_probs, torch.tensor([4]), 0) == [[1, 1, 2]]


@pytest.mark.parametrize("option", options("trainer"))
def test_trainer_options_compose(option):
    cfg = compose_train(f"trainer={option}")
    assert cfg.trainer._target_ == "pytorch_lightning.Trainer"
    if cfg.trainer.accelerator != "gpu" or torch.cuda.is_available():  # gpu/ddp: composed only on CPU machines
        instantiate(cfg.trainer, logger=False, enable_checkpointing=False)


@pytest.mark.parametrize("option", options("callbacks"))
def test_callback_options_instantiate(option, tmp_path):
    callbacks = instantiate_dict(compose_train(f"callbacks={option}", output_dir=tmp_path).callbacks)
    assert callbacks and all(hasattr(cb, "on_train_start") for cb in callbacks)


@pytest.mark.parametrize("option", options("logger"))
def test_logger_options_instantiate(option, tmp_path):
    if option == "tensorboard":
        pytest.importorskip("tensorboard")
    loggers = instantiate_dict(compose_train(f"logger={option}", output_dir=tmp_path).logger)
    assert [Path(logger.save_dir) for logger in loggers] == [tmp_path]


@pytest.mark.parametrize("group", ["debug", "experiment"])
def test_global_options_compose(group):
    for option in options(group):
        assert compose_train(f"{group}={option}").trainer


def test_unknown_choice_lists_the_options():
    with pytest.raises(MissingConfigException) as error:
        compose_train("model=nope")
    for option in options("model"):
        assert f"\t{option}\n" in str(error.value) + "\n"


def _run_train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_cli_unknown_choice_and_help():
    result = _run_train("loss=nope")
    assert result.returncode != 0
    assert "Available options in 'loss'" in result.stderr
    assert all(option in result.stderr for option in options("loss"))
    help_text = _run_train("--help").stdout
    for group in GROUPS:
        assert f"{group}: " in help_text
