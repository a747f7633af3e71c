"""Train a CRNN text-line recogniser: ``python train.py [group=option ...] [key=value ...]`` (see ``--help``)."""

import hydra
from omegaconf import DictConfig

from crnn.pipeline import summary_line, train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    """Fit, test the best checkpoint, print one summary line; return ``cfg.optimized_metric`` for sweepers."""
    metrics = train(cfg)
    print(summary_line(metrics))
    return float(metrics[cfg.optimized_metric])


if __name__ == "__main__":
    main()
