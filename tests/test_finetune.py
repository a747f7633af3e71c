"""Fine-tuning (``init_from=``, ``freeze=``, ``finetune.pretrained_lr_scale``): classifier rows carried over
bit-exactly across a charset change, clear errors on mismatches, frozen parts untouched by training, scaled
learning rates, and end to end a digits model fine-tuned on digits + letters."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from crnn.errors import ConfigError
from crnn.finetune import charset_transfer, load_pretrained, param_groups, per_group_max_lr, prepare_finetuning
from crnn.module import CRNNModule
from crnn.pipeline import train
from data.charset import Charset

from conftest import compose_train, load_script

DIGITS = "0123456789"
LETTERS = "abcdefghij"
MODEL = {"_target_": "crnn.model.CRNN", "channels": [8, 16, 32, 32, 64], "rnn_hidden": 32, "dropout": 0.0}
# A short digits run and fine-tuning runs on folders: crnn_small, 4 steps per epoch, no progress bar.
SMALL = ["model=crnn_small", "trainer=cpu", "data.batch_size=16", "callbacks.progress_bar.refresh_rate=0",
         "trainer.max_time=null"]


def class_ids(characters: str, blank: int) -> dict[str, int]:
    """Class id of each character when ``blank`` takes its own id (written out here, not via Charset)."""
    return {c: i + (i >= blank) for i, c in enumerate(characters)}


def module_for(charset: str, blank: int = 0, seed: int = 0, **model) -> CRNNModule:
    torch.manual_seed(seed)
    return CRNNModule(charset=charset, model={**MODEL, **model}, blank=blank)


def save_checkpoint(module: CRNNModule, path: Path) -> Path:
    """The two entries of a Lightning checkpoint that ``init_from`` reads."""
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, path)
    return path


# ------------------------------------------------------------------------------------------------ charset rows
def test_charset_transfer_by_hand():
    # old: blank 0, '0'..'3' -> 1..4; new "ab01" with blank last: a 0, b 1, '0' 2, '1' 3, blank 4
    transfer = charset_transfer(Charset("0123", blank=0), Charset("ab01", blank=4))
    assert transfer.rows == {4: 0, 2: 1, 3: 2}
    assert (transfer.kept, transfer.new, transfer.dropped) == ("01", "ab", "23")
    assert transfer.summary(examples=1) == ("classifier rows: kept 2 ('0', ...), new 2 ('a', ...), "
                                            "dropped 2 ('2', ...) characters")


@pytest.mark.parametrize("old_blank, new_blank", [(0, 0), (0, 17), (len(DIGITS), 3)])  # 17 new characters
def test_init_from_copies_shared_rows_bit_exactly_and_keeps_fresh_rows(old_blank, new_blank, tmp_path):
    old = module_for(DIGITS, blank=old_blank, seed=1)
    path = save_checkpoint(old, tmp_path / "digits.ckpt")
    reference = torch.load(path, weights_only=True)["state_dict"]
    new_chars = LETTERS[:4] + DIGITS[3:] + LETTERS[4:]  # digits 0-2 dropped, letters new, order changed
    new = module_for(new_chars, blank=new_blank, seed=2)
    fresh = {key: value.clone() for key, value in new.model.state_dict().items()}

    transfer = load_pretrained(new, path)

    assert (transfer.kept, transfer.new, transfer.dropped) == (DIGITS[3:], LETTERS, DIGITS[:3])
    old_ids, new_ids = class_ids(DIGITS, old_blank), class_ids(new_chars, new_blank)
    for name in ("weight", "bias"):
        got, pretrained = new.model.classifier.state_dict()[name], reference[f"model.classifier.{name}"]
        assert got.shape[0] == len(new_chars) + 1
        assert torch.equal(got[new_blank], pretrained[old_blank])
        for c in DIGITS[3:]:
            assert torch.equal(got[new_ids[c]], pretrained[old_ids[c]]), c
        for c in LETTERS:
            assert torch.equal(got[new_ids[c]], fresh[f"classifier.{name}"][new_ids[c]]), c
            assert not any(torch.equal(got[new_ids[c]], row) for row in pretrained)
    for key, value in new.model.state_dict().items():  # every other tensor, batch-norm statistics included
        if not key.startswith("classifier."):
            assert torch.equal(value, reference[f"model.{key}"]), key


def test_same_charset_loads_the_whole_network(tmp_path):
    old = module_for(DIGITS, seed=1)
    path = save_checkpoint(old, tmp_path / "digits.ckpt")
    new = module_for(DIGITS, seed=2)
    transfer = load_pretrained(new, path)
    assert (len(transfer.kept), transfer.new, transfer.dropped) == (10, "", "")
    torch.testing.assert_close(new.state_dict(), torch.load(path, weights_only=True)["state_dict"], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ mismatches
def test_architecture_mismatch_names_the_parameter_and_both_shapes(tmp_path):
    path = save_checkpoint(module_for(DIGITS, rnn_hidden=32), tmp_path / "digits.ckpt")
    # LSTM weight_ih (4 * hidden, input): 64 conv channels in, hidden 32 in the checkpoint, 48 here
    with pytest.raises(ValueError, match=r"init_from=.*digits\.ckpt: parameter model\.rnn\.weight_ih_l0 has shape "
                                         r"\(128, 64\) in the checkpoint but \(192, 64\) in this run's model; "
                                         r"model config differs: rnn_hidden 32 in the checkpoint, 48 here"):
        load_pretrained(module_for(DIGITS + LETTERS, rnn_hidden=48), path)


def test_a_config_change_that_keeps_every_shape_loads_with_a_warning(tmp_path, caplog):
    path = save_checkpoint(module_for(DIGITS, pools=[[2, 2], [2, 2], [2, 2], [2, 1], [2, 1]]), tmp_path / "digits.ckpt")
    width_by_4 = module_for(DIGITS, pools=[[2, 2], [2, 2], [2, 1], [2, 1], [2, 1]])
    load_pretrained(width_by_4, path)
    assert "model config differs: pools [[2, 2], [2, 2], [2, 2], [2, 1], [2, 1]] in the checkpoint, [[2, 2], [2, 2], " \
           "[2, 1], [2, 1], [2, 1]] here" in caplog.text


def test_missing_parameters_are_named(tmp_path):
    path = save_checkpoint(module_for(DIGITS, norm="batch"), tmp_path / "digits.ckpt")
    with pytest.raises(ValueError, match=r"missing from the checkpoint: \['cnn\.0\.bias'.*not in the model: "
                                         r"\['cnn\.1\.bias'.*norm 'batch' in the checkpoint, 'none' here"):
        load_pretrained(module_for(DIGITS, norm="none"), path)


def test_other_image_height_or_channels_is_an_error(tmp_path):
    path = save_checkpoint(module_for(DIGITS), tmp_path / "digits.ckpt")
    taller = CRNNModule(DIGITS, {**MODEL, "pools": [[2, 2], [2, 2], [2, 2], [2, 1], [4, 1]]}, height=64)
    with pytest.raises(ValueError, match=r"images 32 px high, this run's 64 px \(data\.height\)"):
        load_pretrained(taller, path)
    with pytest.raises(ValueError, match=r"reads 1-channel images, this run's 3-channel ones"):
        load_pretrained(module_for(DIGITS, in_channels=3), path)
    with pytest.raises(FileNotFoundError, match=r"init_from=.*nothing\.ckpt: no such file"):
        load_pretrained(module_for(DIGITS), tmp_path / "nothing.ckpt")


@pytest.mark.parametrize("overrides, message", [
    (["init_from=a.ckpt", "ckpt_path=b.ckpt"], r"init_from=a\.ckpt and ckpt_path=b\.ckpt: pass one"),
    (["freeze=cnn"], r"freeze=\['cnn'\] .* need pretrained weights: set init_from"),
    (["finetune.pretrained_lr_scale=0.1"], r"pretrained_lr_scale=0\.1 need pretrained weights"),
    (["ckpt_path=b.ckpt", "freeze=[cnn,lstm]"], r"freeze=\['cnn', 'lstm'\]: unknown part\(s\) \['lstm'\]; the "
                                                r"model's parts are \['cnn', 'rnn', 'classifier'\]"),
    (["ckpt_path=b.ckpt", "freeze=[cnn,rnn,classifier]"], r"freezes every part of the model: nothing would be trained"),
    (["ckpt_path=b.ckpt", "finetune.pretrained_lr_scale=0"], r"pretrained_lr_scale must be > 0"),
])
def test_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        prepare_finetuning(module_for(DIGITS), compose_train(*overrides))


# ------------------------------------------------------------------------------------------------ optimizer
def test_pretrained_parts_get_the_scaled_learning_rate_and_frozen_ones_none(tmp_path):
    module = module_for(DIGITS + LETTERS)
    cfg = compose_train("optimizer.lr=0.01", "finetune.pretrained_lr_scale=0.1", "freeze=rnn",
                        f"init_from={save_checkpoint(module_for(DIGITS), tmp_path / 'digits.ckpt')}")
    module.optimizer_factory = instantiate(cfg.optimizer)
    module.scheduler_factory = instantiate(cfg.scheduler, total_steps=100)  # the default OneCycleLR
    prepare_finetuning(module, cfg)

    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    classifier = {id(p) for p in module.model.classifier.parameters()}
    cnn = {id(p) for p in module.model.cnn.parameters()}
    assert [group["name"] for group in optimizer.param_groups] == ["pretrained", "classifier"]
    assert {id(p) for p in optimizer.param_groups[0]["params"]} == cnn  # the frozen rnn is left out
    assert {id(p) for p in optimizer.param_groups[1]["params"]} == classifier
    assert [group["max_lr"] for group in optimizer.param_groups] == pytest.approx([0.001, 0.01])
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([0.001 / 25, 0.01 / 25])  # div_factor
    # the factory a time budget rebuilds the schedule from keeps the per-group peak rates
    rebuilt = module.scheduler_factory(optimizer, total_steps=50)
    assert rebuilt.optimizer.param_groups[0]["max_lr"] == pytest.approx(0.001)
    assert scheduler.total_steps == 100


def test_without_a_scheduler_the_groups_start_at_the_scaled_rate(tmp_path):
    module = module_for(DIGITS)
    module.optimizer_factory = instantiate(compose_train("optimizer.lr=0.01").optimizer)
    module.pretrained_lr_scale = 0.5
    optimizer = module.configure_optimizers()
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([0.005, 0.01])


def test_default_run_has_one_group_of_every_parameter():
    groups = param_groups(module_for(DIGITS))
    assert len(groups) == 1 and len(groups[0]["params"]) == len(list(module_for(DIGITS).parameters()))
    factory = instantiate(compose_train().scheduler)
    optimizer = torch.optim.SGD(groups, lr=0.1)
    assert per_group_max_lr(factory, optimizer) is factory


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory) -> Path:
    """A crnn_small digits model after 2 short epochs (4 steps each)."""
    output = tmp_path_factory.mktemp("digits")
    metrics = train(compose_train(*SMALL, "trainer.max_epochs=2", "data.train_size=64", "data.val_size=16",
                                  "data.test_size=16", output_dir=output))
    return Path(metrics["best_checkpoint"])


@pytest.fixture(scope="module")
def letters_folder(tmp_path_factory) -> Path:
    """Digits + letters lines on disk: 64 train, 16 val, 16 test."""
    root = tmp_path_factory.mktemp("letters")
    render = load_script("render_dataset").main
    for split, size, seed in (("train", 64, 1), ("val", 16, 2), ("test", 16, 3)):
        render(["--kind", "text", "--charset", DIGITS + LETTERS, "--max-length", "6", "--size", str(size),
                "--seed", str(seed), "--output", str(root / split)])
    return root


def folder(root: Path, charset: str = DIGITS + LETTERS, blank: int = 0) -> list[str]:
    return ["data=folder", *(f"data.{split}_dir={root / split}" for split in ("train", "val", "test")),
            f"data.charset={charset}", f"data.blank={blank}"]


def test_fine_tune_frozen_cnn_with_a_new_charset(digits_checkpoint, letters_folder, tmp_path, caplog):
    output = tmp_path / "finetune"
    blank = len(DIGITS + LETTERS)  # blank last here, first in the checkpoint
    with caplog.at_level(logging.INFO, logger="crnn.finetune"):
        metrics = train(compose_train(*SMALL, *folder(letters_folder, blank=blank), f"init_from={digits_checkpoint}",
                                      "freeze=cnn", "finetune.pretrained_lr_scale=0.1", "trainer.max_epochs=2",
                                      "trainer.log_every_n_steps=1", "callbacks.model_checkpoint.save_top_k=-1",
                                      output_dir=output))
    assert f"init_from={digits_checkpoint}: weights loaded (fresh optimizer and schedule); classifier rows: kept 10 " \
           f"('0', '1', '2', '3', '4', '5', '6', '7', ...), new 10 ('a', 'b'" in caplog.text
    assert f"blank 0 -> {blank}" in caplog.text
    assert metrics["steps"] == 8  # fresh counters: 2 epochs of 4 steps, not the checkpoint's 8 + 8

    start = torch.load(digits_checkpoint, weights_only=True)["state_dict"]
    end = torch.load(output / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    cnn = [key for key in start if key.startswith("model.cnn.")]
    assert any("running_mean" in key for key in cnn)
    for key in cnn:  # weights and batch-norm statistics, through two epochs with a validation between them
        assert torch.equal(end[key], start[key]), key
    assert not torch.equal(end["model.rnn.weight_ih_l0"], start["model.rnn.weight_ih_l0"])

    with open(output / "csv" / "metrics.csv") as f:
        rates = [row for row in csv.DictReader(f) if row.get("lr-AdamW/pretrained")]
    assert rates
    for row in rates:
        assert float(row["lr-AdamW/pretrained"]) == pytest.approx(0.1 * float(row["lr-AdamW/classifier"]))

    # resuming the fine-tuning run after its first epoch: ckpt_path instead of init_from, the same freeze and
    # parameter groups (the optimizer state has two groups)
    (first_epoch,) = (output / "checkpoints").glob("epoch000-*.ckpt")
    resumed = train(compose_train(*SMALL, *folder(letters_folder, blank=blank), f"ckpt_path={first_epoch}",
                                  "freeze=cnn", "finetune.pretrained_lr_scale=0.1", "trainer.max_epochs=2",
                                  "callbacks.model_checkpoint.save_top_k=-1", output_dir=output))
    assert resumed["steps"] == 8
    end = torch.load(output / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(end[key], start[key]) for key in cnn)


def test_a_checkpoint_of_another_height_is_refused_by_name(digits_checkpoint, letters_folder, tmp_path):
    cfg = compose_train(*SMALL, *folder(letters_folder), f"init_from={digits_checkpoint}", "data.height=64",
                        "model.pools=[[2,2],[2,2],[2,2],[2,1],[4,1]]", output_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"images 32 px high, this run's 64 px \(data\.height\)"):
        train(cfg)


@pytest.mark.slow
def test_a_fine_tuned_digits_model_learns_the_letters(tmp_path):
    """A crnn_small digits model (400 steps), fine-tuned for 250 steps on 400 lines of digits and 6 letters, reads
    lines of those letters only. About 4 minutes on 2 CPU cores."""
    digits = train(compose_train("model=crnn_small", "trainer=cpu", "callbacks.progress_bar.refresh_rate=0",
                                 "trainer.max_time=null", "trainer.max_epochs=8", "data.batch_size=32",
                                 "data.train_size=1600", "data.val_size=128", "data.test_size=128",
                                 output_dir=tmp_path / "digits"))
    assert digits["test/cer"] < 0.2
    render = load_script("render_dataset").main
    letters = LETTERS[:6]
    for split, size, seed, charset in (("train", 400, 1, DIGITS + letters), ("val", 64, 2, DIGITS + letters),
                                       ("test", 64, 3, letters)):  # test lines of letters only
        render(["--kind", "text", "--charset", charset, "--max-length", "6", "--size", str(size), "--seed", str(seed),
                "--output", str(tmp_path / "letters" / split)])
    metrics = train(compose_train(*SMALL, *folder(tmp_path / "letters", charset=DIGITS + letters),
                                  f"init_from={digits['best_checkpoint']}", "trainer.max_epochs=10",
                                  "callbacks.early_stopping=null", output_dir=tmp_path / "finetune"))
    assert metrics["test/cer"] < 0.2  # 0.09 on 2026-12-02; untrained: 1.0
