"""The README's "Adding a CTC variant" example, written out of the README itself, trains and has the gradient it claims."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

ROOT = Path(__file__).resolve().parents[1]
FILE_BLOCK = re.compile(r"<!-- file: (?P<path>\S+) -->\n```\w*\n(?P<body>.*?)```", re.DOTALL)


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> Path:
    """The files the README names (``my_ctc/...``), written under a temporary folder; returns ``my_ctc``."""
    root = tmp_path_factory.mktemp("readme")
    blocks = FILE_BLOCK.findall((ROOT / "README.md").read_text())
    assert [path for path, _ in blocks] == ["my_ctc/my_losses.py", "my_ctc/conf/loss/blank_discount_ctc.yaml"]
    for path, body in blocks:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(body)
    return root / "my_ctc"


@pytest.fixture(scope="module")
def my_losses(example):
    sys.path.insert(0, str(example))
    try:
        import my_losses

        yield my_losses
    finally:
        sys.path.remove(str(example))
        sys.modules.pop("my_losses", None)


def logit_grad(loss_fn, logits, *args):
    leaf = logits.detach().requires_grad_()
    loss = loss_fn(leaf.log_softmax(-1), *args)
    (grad,) = torch.autograd.grad(loss, leaf)
    return grad


@pytest.mark.parametrize("blank", [0, 5])
def test_example_loss_has_ctc_gradient_at_factor_one_and_shifts_mass_to_labels_below(my_losses, blank):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(20, 3, 6, generator=gen, dtype=torch.float64)
    targets = torch.tensor([[1, 2, 2], [3, 4, 1], [2, 1, 3]]) % 5 + (blank == 0)
    args = (targets, torch.tensor([20, 17, 12]), torch.tensor([3, 2, 1]))
    expected = logit_grad(lambda lp, *a: F.ctc_loss(lp, *a, blank=blank, reduction="sum"), logits, *args)
    plain = my_losses.BlankDiscountCTCLoss(factor=1.0, blank=blank, reduction="sum")
    torch.testing.assert_close(logit_grad(plain, logits, *args), expected)
    # a smaller blank share in the targets pushes the blank logit down harder than CTC does
    discounted = my_losses.BlankDiscountCTCLoss(factor=0.3, blank=blank, reduction="sum")
    grad = logit_grad(discounted, logits, *args)
    assert grad.isfinite().all() and (grad[..., blank].sum() > expected[..., blank].sum() + 0.1)


def test_example_trains_through_config_dir(example, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(example), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "train.py", "--config-dir", str(example / "conf"), "loss=blank_discount_ctc",
         "loss.factor=0.3", "trainer.fast_dev_run=true", "model=crnn_small", "data.val_size=16", "data.test_size=16",
         f"hydra.run.dir={tmp_path}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    loss = yaml.safe_load((tmp_path / ".hydra" / "config.yaml").read_text())["loss"]
    assert loss == {"_target_": "my_losses.BlankDiscountCTCLoss", "factor": 0.3, "zero_infinity": True}
    assert (tmp_path / "final_metrics.json").exists()
