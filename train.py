"""Train a CRNN text-line recogniser: ``python train.py [group=option ...] [key=value ...]`` (see ``--help``)."""

import hydra
from omegaconf import DictConfig

from crnn.errors import CheckpointError, ConfigError, RunFailed
from crnn.pipeline import remove_unstarted_run, report, summary_line, train
from data import BadInputError


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    """Fit, test the best checkpoint, print one summary line; return ``cfg.optimized_metric`` for sweepers.

    A failed run (:class:`crnn.errors.RunFailed`, bad input data) ends with its one-line message and exit
    status 1; a run stopped by a config or checkpoint error leaves no run directory behind."""
    try:
        metrics = train(cfg)
    except (ConfigError, CheckpointError):  # found before any training
        remove_unstarted_run(cfg.paths.output_dir)
        raise
    except BadInputError as err:
        raise RunFailed(str(err)) from err
    report(summary_line(metrics))
    return float(metrics[cfg.optimized_metric])


if __name__ == "__main__":
    main()
