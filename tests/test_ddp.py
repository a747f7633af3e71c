"""Data-parallel runs see every sample exactly once: per-process shards, and DDP validation == one process."""

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from crnn.callbacks import read_predictions
from crnn.module import CRNNModule
from data import EpochSampler, SyntheticDataModule
from data.batching import shard_indices

from conftest import ROOT, compose_train


@pytest.mark.parametrize("size", [0, 1, 7, 101])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_eval_shards_partition_the_set(size, world_size):
    shards = [list(shard_indices(size, rank, world_size)) for rank in range(world_size)]
    assert sorted(i for shard in shards for i in shard) == list(range(size))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


@pytest.mark.parametrize("fresh", [True, False])
def test_epoch_sampler_shards(fresh):
    """Equal length on every rank (same number of steps), disjoint fresh samples, single process unchanged."""
    single = EpochSampler(10, seed=3, fresh=fresh)
    single.set_epoch(2)
    assert len(single) == 10 and sorted(single) == (list(range(20, 30)) if fresh else list(range(10)))
    seen = []
    for epoch in range(3):
        shards = [EpochSampler(10, seed=3, fresh=fresh, rank=r, world_size=3) for r in range(3)]
        for shard in shards:
            shard.set_epoch(epoch)
        lists = [list(shard) for shard in shards]
        assert [len(x) for x in lists] == [4, 4, 4] == [len(s) for s in shards]
        flat = [i for x in lists for i in x]
        if fresh:
            assert len(set(flat)) == 12
            seen += flat
        else:  # the epoch's permutation, two samples repeated to even out the shards
            assert set(flat) == set(range(10))
    if fresh:
        assert len(set(seen)) == len(seen)


def test_datamodule_shards_by_trainer_rank():
    """val/test loaders of rank r of w hold exactly the lines r, r+w, ...; together the whole set once."""
    texts = {}
    for rank in range(2):
        dm = SyntheticDataModule(val_size=13, test_size=7, batch_size=4, train_size=10, num_workers=0)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        dm.setup()
        for split in ("val", "test"):
            loader = getattr(dm, f"{split}_dataloader")()
            texts[split, rank] = sorted(t for batch in loader for t in batch["texts"])
        train = [len(batch["texts"]) for batch in dm.train_dataloader()]
        assert sum(train) == 5
    reference = SyntheticDataModule(val_size=13, test_size=7, batch_size=4, num_workers=0)
    reference.setup()
    for split in ("val", "test"):
        every = sorted(t for batch in getattr(reference, f"{split}_dataloader")() for t in batch["texts"])
        assert sorted(texts[split, 0] + texts[split, 1]) == every


def _fixed_module() -> CRNNModule:
    """A small CRNN with fixed random weights whose greedy outputs vary from line to line (so any
    double-counted or dropped line would change the CER)."""
    torch.manual_seed(0)
    cfg = compose_train("model=crnn_small")
    module = CRNNModule(charset="0123456789", model=OmegaConf.to_container(cfg.model), height=32)
    with torch.no_grad():  # sharpen the classifier so predictions are non-empty and diverse
        module.model.classifier.weight.mul_(20.0)
    return module.eval()


def test_ddp_validation_equals_single_process(tmp_path):
    """trainer=ddp_cpu (2 processes; ddp_spawn since pytest can't be re-launched) on 101 validation lines
    gives the CER of a single process on the same weights, over 101 lines (not 102: no padding; ``val/lines`` is
    the module's line count, summed over processes)."""
    module = _fixed_module()
    datamodule = SyntheticDataModule(val_size=101, batch_size=16, num_workers=0, seed=5)

    single = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    expected = single.validate(module, datamodule=datamodule)[0]
    assert expected["val/lines"] == 101
    assert 0.05 < expected["val/cer"] and expected["val/acc"] < 1  # a CER sensitive to every line

    cfg = compose_train("trainer=ddp_cpu", "trainer.strategy=ddp_spawn", output_dir=tmp_path)
    assert cfg.trainer.devices == 2 and cfg.trainer.use_distributed_sampler is False
    ddp = instantiate(cfg.trainer, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)
    got = ddp.validate(module, datamodule=SyntheticDataModule(val_size=101, batch_size=16, num_workers=0, seed=5))[0]
    assert got["val/lines"] == 101
    for name in ("val/cer", "val/acc", "val/ned"):
        assert got[name] == pytest.approx(expected[name], abs=1e-7), name


def test_ddp_trainer_configs_compose():
    for option, accelerator in (("ddp", "gpu"), ("ddp_cpu", "cpu")):
        trainer = compose_train(f"trainer={option}").trainer
        assert trainer.strategy == "ddp" and trainer.accelerator == accelerator
        assert trainer.sync_batchnorm == (accelerator == "gpu")  # torch's SyncBatchNorm trains on GPU only
        assert trainer.use_distributed_sampler is False and trainer.num_nodes == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_ddp_gpu_config_instantiates():
    trainer = instantiate(compose_train("trainer=ddp").trainer, logger=False, enable_checkpointing=False)
    assert trainer.world_size == torch.cuda.device_count()


@pytest.mark.slow
def test_cli_ddp_cpu_run(tmp_path):
    """`python train.py trainer=ddp_cpu`: 2 processes train, validate and test; the final val CER equals a
    single-process validation of the saved best checkpoint, and the test predictions cover every line once."""
    overrides = ["model=crnn_small", "trainer.max_epochs=2", "data.train_size=64", "data.val_size=33",
                 "data.test_size=21", "data.batch_size=8", "callbacks.progress_bar.refresh_rate=0",
                 "max_usable_cer=null",  # 8 steps learn nothing, which a real run reports as a failure
                 "+callbacks.prediction_writer._target_=crnn.callbacks.PredictionWriter",
                 f"+callbacks.prediction_writer.dirpath={tmp_path}"]
    result = subprocess.run([sys.executable, "train.py", "trainer=ddp_cpu", *overrides, f"hydra.run.dir={tmp_path}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "final_metrics.json").read_text())
    assert metrics["steps"] == 2 * 4  # 64 lines / 2 processes / 8 per batch = 4 steps per epoch
    assert len(read_predictions(tmp_path)) == 21
    assert {p.name for p in tmp_path.glob("test_predictions*.tsv")} == {"test_predictions.rank0.tsv",
                                                                        "test_predictions.rank1.tsv"}

    cfg = compose_train(*overrides, output_dir=tmp_path / "single")
    module = CRNNModule.load_from_checkpoint(metrics["best_checkpoint"], map_location="cpu")
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    single = trainer.validate(module, datamodule=instantiate(cfg.data))[0]
    assert single["val/cer"] == pytest.approx(metrics["val/cer"], abs=1e-7)
