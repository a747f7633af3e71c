"""Every option of every config group composes and instantiates; bad choices list the valid ones."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import Callback, EarlyStopping

import crnn.callbacks
from crnn.pipeline import build_module, instantiate_dict
from data import write_lmdb

from conftest import CONF, ROOT, compose_train, load_script, text_large_overrides
from conftest import config_options as options

GROUPS = ("model", "loss", "data", "augment", "decoder", "trainer", "callbacks", "logger", "debug", "experiment")
# Small synthetic splits, so that a composed data module can be set up and batched in well under a second.
SMALL_DATA = ("data.train_size=8", "data.val_size=4", "data.test_size=4", "data.batch_size=4", "data.num_workers=0")


def test_groups_have_the_expected_options():
    assert set(options("model")) == {"crnn", "crnn_small", "crnn_large", "crnn_w4"}
    assert set(options("loss")) == {"ctc", "python_ctc", "python_ctc_autograd", "focal_ctc", "reweighted_ctc",
                                    "smoothed_ctc", "maxent_ctc"}
    assert {"digits", "text"} <= set(options("data"))
    assert set(options("augment")) == {"none", "line"}
    assert set(options("decoder")) == {"greedy", "beam", "beam_lm"}
    assert {"default", "cpu", "gpu"} <= set(options("trainer"))
    assert {"csv", "tensorboard"} <= set(options("logger"))
    assert {"fast_dev_run", "overfit"} <= set(options("debug"))
    assert options("experiment")


def test_defaults():
    cfg = compose_train()
    assert cfg.data.kind == "digits" and cfg.model._target_ == "crnn.model.CRNN"
    assert cfg.loss._target_ == "losses.CTCLoss" and cfg.decoder._target_ == "crnn.decoding.GreedyDecoder"
    assert cfg.trainer.accelerator == "auto" and cfg.optimized_metric == "val/cer"
    assert set(cfg.callbacks) >= {"model_checkpoint", "early_stopping", "lr_monitor", "progress_bar"}
    assert set(cfg.logger) == {"csv"}


@pytest.mark.parametrize("option", options("model"))
def test_model_options_build_and_run(option):
    model = instantiate(compose_train(f"model={option}").model, num_classes=11, height=32)
    images = torch.rand(2, 1, 32, 64, generator=torch.Generator().manual_seed(0))
    log_probs, lengths = model(images, torch.tensor([64, 40]))
    assert log_probs.shape[1:] == (2, 11) and lengths.shape == (2,)


@pytest.mark.parametrize("option", options("loss"))
def test_loss_options_build_and_run(option):
    loss = instantiate(compose_train(f"loss={option}").loss, blank=0)
    log_probs = torch.randn(12, 2, 5, generator=torch.Generator().manual_seed(0)).log_softmax(-1).requires_grad_()
    value = loss(log_probs, torch.tensor([[1, 2, 2], [3, 4, 0]]), torch.tensor([12, 9]), torch.tensor([3, 2]))
    value.backward()
    assert value.shape == () and torch.isfinite(value) and torch.isfinite(log_probs.grad).all()


@pytest.fixture(scope="module")
def tiny_datasets(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Eight rendered digit lines per split as gt.txt folders (scripts/render_dataset.py) and as LMDB."""
    render_dataset = load_script("render_dataset")
    root = tmp_path_factory.mktemp("tiny")
    dirs = {"folder": {}, "lmdb": {}}
    for seed, split in enumerate(("train", "val", "test")):
        folder = render_dataset.main(["--size", "8", "--seed", str(seed), "--output", str(root / split)])
        lines = [line.split("\t") for line in (folder / "gt.txt").read_text(encoding="utf-8").splitlines()]
        assert write_lmdb([((folder / path).read_bytes(), label) for path, label in lines], root / f"{split}_lmdb") == 8
        dirs["folder"][split], dirs["lmdb"][split] = folder, root / f"{split}_lmdb"
    return dirs


def data_overrides(option: str, tiny_datasets) -> list[str]:
    """The split directories a data option needs (gt.txt folders or LMDB), none for synthetic data."""
    cfg = compose_train(f"data={option}")
    if OmegaConf.is_missing(cfg.data, "charset_file"):  # data=text_large: your characters and fonts
        return text_large_overrides(tiny_datasets["folder"]["train"].parent)
    if "train_dir" not in cfg.data.keys():
        return []
    kind = "lmdb" if cfg.data._target_ == "data.LmdbDataModule" else "folder"
    return [f"data.{split}_dir={path}" for split, path in tiny_datasets[kind].items()]


@pytest.mark.parametrize("option", options("data"))
def test_data_options_build(option, tiny_datasets):
    cfg = compose_train(f"data={option}", *data_overrides(option, tiny_datasets), "data.batch_size=4")
    datamodule = instantiate(cfg.data)
    assert type(datamodule) is get_class(cfg.data._target_)
    assert datamodule.charset.num_classes > 10 and datamodule.charset.blank == cfg.data.blank == 0
    if "train_dir" in cfg.data.keys():  # real data: the 8 rendered lines of each split load and batch
        assert datamodule.charset.characters == "0123456789"  # inferred from the training labels
        datamodule.setup(None)
        assert [len(datamodule.dataset(split)) for split in ("train", "val", "test")] == [8, 8, 8]
        batch = next(iter(datamodule.val_dataloader()))
        assert batch["images"].shape[:3] == (4, 1, cfg.data.height)
        for row, length, text in zip(batch["targets"], batch["target_lengths"], batch["texts"]):
            assert datamodule.charset.decode(row[:length]) == text


@pytest.mark.parametrize("option", options("decoder"))
def test_decoder_options_decode(option):
    decoder = instantiate(compose_train(f"decoder={option}").decoder)
    log_probs = torch.full((4, 1, 3), -10.0)
    log_probs[[0, 1, 2, 3], 0, [1, 0, 1, 2]] = 0.0
    labels, scores = decoder(log_probs, torch.tensor([4]), 0)
    assert labels == [[1, 1, 2]] and scores.shape == (1,) and scores.item() <= 0.0


@pytest.mark.parametrize("option", options("trainer"))
def test_trainer_options_compose(option):
    cfg = compose_train(f"trainer={option}")
    assert cfg.trainer._target_ == "pytorch_lightning.Trainer"
    if cfg.trainer.accelerator != "gpu" or torch.cuda.is_available():  # gpu/ddp: composed only on CPU machines
        instantiate(cfg.trainer, logger=False, enable_checkpointing=False)


@pytest.mark.parametrize("option", options("callbacks"))
def test_callback_options_instantiate(option, tmp_path):
    callbacks = instantiate_dict(compose_train(f"callbacks={option}", output_dir=tmp_path).callbacks)
    assert callbacks and all(isinstance(cb, Callback) for cb in callbacks)


@pytest.mark.parametrize("option", options("logger"))
def test_logger_options_instantiate(option, tmp_path):
    if option == "tensorboard":
        pytest.importorskip("tensorboard")
    loggers = instantiate_dict(compose_train(f"logger={option}", output_dir=tmp_path).logger)
    assert [Path(logger.save_dir) for logger in loggers] == [tmp_path]


@pytest.mark.parametrize(
    "group,option", [(group, option) for group in ("debug", "experiment") for option in options(group)]
)
def test_global_options_build_data_model_loss_and_trainer(group, option, tmp_path):
    """Each debug/experiment option builds its data module, module (model + loss) and trainer, and one
    training batch goes through the model and the loss."""
    cfg = compose_train(f"{group}={option}", *SMALL_DATA, output_dir=tmp_path)
    datamodule = instantiate(cfg.data)
    module = build_module(cfg, datamodule)
    assert type(datamodule) is get_class(cfg.data._target_)
    assert type(module.model) is get_class(cfg.model._target_)
    assert type(module.loss) is get_class(cfg.loss._target_) and module.loss.blank == datamodule.charset.blank
    assert module.charset.characters == datamodule.charset.characters
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    log_probs, lengths = module(batch["images"], batch["widths"])
    assert log_probs.shape[1:] == (len(batch["texts"]), datamodule.charset.num_classes)
    assert module.compute_loss(log_probs, lengths, batch).isfinite()

    callbacks = instantiate_dict(cfg.callbacks)
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=False)
    if option == "overfit":  # conf/debug/overfit.yaml: memorise 4 batches, no early stop, in-process data
        assert (trainer.overfit_batches, trainer.max_epochs, trainer.check_val_every_n_epoch) == (4, 100, 20)
        assert not any(isinstance(callback, EarlyStopping) for callback in trainer.callbacks)
        assert cfg.data.num_workers == 0 and datamodule.num_workers == 0
    elif option == "fast_dev_run":
        assert trainer.fast_dev_run is True
    else:
        assert not trainer.fast_dev_run and trainer.overfit_batches == 0
        assert any(isinstance(callback, EarlyStopping) for callback in trainer.callbacks) == bool(
            cfg.callbacks.get("early_stopping"))


@pytest.mark.parametrize("loss", options("loss"))
def test_non_zero_blank_reaches_charset_loss_and_decoding(loss):
    """``data.blank=10`` on digits: the data, the module's charset and the loss all use class 10 as the blank."""
    cfg = compose_train("data.blank=10", f"loss={loss}", "model=crnn_small", *SMALL_DATA)
    datamodule = instantiate(cfg.data)
    module = build_module(cfg, datamodule)
    assert datamodule.charset.blank == module.charset.blank == module.loss.blank == module.hparams.blank == 10
    assert module.charset.num_classes == 11 and module.charset.encode("0189") == [0, 1, 8, 9]
    log_probs = torch.full((5, 1, 11), -20.0)
    log_probs[:, :, 10] = 0.0  # the blank wins every frame
    assert module.decode(log_probs.log_softmax(-1), torch.tensor([5])) == [""]
    log_probs[[1, 3], 0, 10], log_probs[[1, 3], 0, 0] = -20.0, 0.0  # class 0 is the character "0" now
    assert module.decode(log_probs.log_softmax(-1), torch.tensor([5])) == ["00"]


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


def test_every_callback_class_has_a_config():
    """One config node per callback: each Callback of crnn/callbacks.py is the target of a conf/callbacks/*.yaml."""
    classes = {name for name in crnn.callbacks.__all__ if isinstance(getattr(crnn.callbacks, name), type)}
    targets = set()
    for path in (ROOT / "conf" / "callbacks").glob("*.yaml"):
        for node in (yaml.safe_load(path.read_text()) or {}).values():
            if isinstance(node, dict) and str(node.get("_target_", "")).startswith("crnn.callbacks."):
                targets.add(node["_target_"].removeprefix("crnn.callbacks."))
    assert classes == targets


@pytest.mark.parametrize("option", options("data"))
def test_only_the_digits_quick_start_stops_at_a_threshold_and_no_run_has_a_time_guard(option):
    """conf/data_schedule/digits.yaml: its quick start's 0.3 % threshold and 10 % usable-model bar; every data set
    trains to its schedule's end (or to patience after the warm-up), unbounded in time."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):  # without compose_train's overrides
        cfg = compose("train", overrides=["paths.output_dir=/tmp/unused", f"data={option}"])
    early_stopping, max_time = cfg.callbacks.early_stopping, cfg.trainer.max_time
    assert early_stopping._target_ == "crnn.callbacks.EarlyStoppingAfterWarmup" and max_time is None
    if option == "digits":
        assert (early_stopping.stopping_threshold, cfg.max_usable_cer) == (0.003, 0.1)
    else:
        assert (early_stopping.stopping_threshold, cfg.max_usable_cer) == (None, 1.0)
    overridden = compose_train(f"data={option}", "callbacks.early_stopping.stopping_threshold=0.01")
    assert overridden.callbacks.early_stopping.stopping_threshold == 0.01  # the command line still wins
