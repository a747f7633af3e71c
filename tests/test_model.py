"""CRNN shapes, exact output lengths for padded mixed-width batches, and CRNNModule's loss handling."""

import pytest
import torch
from torch import nn

from torch.nn.utils.rnn import pad_packed_sequence

from crnn.model import CRNN, layer_output_width, output_length
from crnn.module import CRNNModule
from data import SyntheticDataModule
from losses import required_frames

CONFIGS = {
    "default": {},
    "gru_no_norm_k5": {"rnn": "gru", "norm": "none", "kernel_size": 5, "rnn_layers": 1},
    "odd_pools": {"channels": (8, 8, 8, 8), "pools": ((2, 3), (4, 1), (1, 1), (4, 2)), "rnn_hidden": 16},
}


@pytest.mark.parametrize("overrides", CONFIGS.values(), ids=CONFIGS.keys())
def test_padded_batch_matches_each_image_alone(overrides):
    torch.manual_seed(0)
    model = CRNN(num_classes=7, **overrides).eval()
    widths = torch.tensor([97, 8, 150, 41, 3, 1])  # 3 and 1: narrower than one frame (min_width 8 or 6)
    images = torch.rand(len(widths), 1, 32, int(widths.max()))
    log_probs, lengths = model(images, widths)

    assert log_probs.dtype == torch.float32 and lengths.dtype == torch.int64
    assert log_probs.shape == (int(lengths.max()), len(widths), 7)
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(log_probs.shape[:2]))
    assert torch.equal(model.output_lengths(widths), lengths)
    for i, width in enumerate(widths.tolist()):
        alone, alone_length = model(images[i : i + 1, :, :, :width], widths[i : i + 1])
        assert alone_length.item() == lengths[i].item() == alone.shape[0]
        torch.testing.assert_close(alone[:, 0], log_probs[: lengths[i], i], atol=1e-5, rtol=1e-4)


def test_narrow_images_read_as_zero_padded_to_one_frame():
    torch.manual_seed(0)
    model = CRNN(num_classes=5).eval()
    assert model.min_width == 8
    image = torch.rand(1, 1, 32, 5)
    log_probs, lengths = model(image, torch.tensor([5]))
    padded, padded_lengths = model(torch.cat([image, torch.zeros(1, 1, 32, 3)], -1), torch.tensor([8]))
    assert lengths.tolist() == padded_lengths.tolist() == [1]
    torch.testing.assert_close(log_probs, padded)


@pytest.mark.parametrize(
    "layer", [nn.Conv2d(1, 1, 3, padding=1), nn.Conv2d(1, 1, (3, 4), stride=(1, 3), padding=(0, 2), dilation=2),
              nn.MaxPool2d((2, 1)), nn.MaxPool2d(3, stride=2, padding=1), nn.ReLU()],
)
def test_layer_output_width_matches_pytorch(layer):
    widths = torch.arange(5, 40)
    actual = [layer(torch.zeros(1, 1, 8, w)).shape[-1] for w in widths.tolist()]
    assert layer_output_width(layer, widths).tolist() == actual


@pytest.mark.parametrize(("height", "rows_left"), [(32, 1), (40, 1), (48, 1), (64, 2), (100, 3)])
def test_any_height_is_one_setting_rows_left_are_averaged(height, rows_left):
    """40 -> 20, 10, 5, 2, 1 and 48 -> ..., 3, 1 (floor), 64 -> ..., 2 and 100 -> ..., 3 rows: the conv stack's
    output (hooked) averaged over its rows is what the RNN reads, and the width arithmetic is unchanged."""
    torch.manual_seed(0)
    model = CRNN(num_classes=5, height=height).eval()
    features = []
    model.cnn[-1].register_forward_hook(lambda module, inputs, output: features.append(output))
    fed = []
    model.rnn.register_forward_pre_hook(lambda module, inputs: fed.append(inputs[0]))
    widths = torch.tensor([123, 40])
    log_probs, lengths = model(torch.rand(2, 1, height, 123), widths)
    assert model.feature_height == rows_left == features[0].shape[2]
    pools = ((2, 2), (2, 2), (2, 2), (2, 1), (2, 1))  # the default: width / 8
    assert lengths.tolist() == [123 // 8, 40 // 8] == [output_length(w, pools) for w in widths.tolist()]
    assert log_probs.shape == (15, 2, 5)
    expected = features[0].sum(2) / rows_left  # (B, C, T): the rows' plain average
    unpacked, _ = pad_packed_sequence(fed[0])  # (T, B, C)
    torch.testing.assert_close(unpacked[:15, 0], expected[0].T)


def test_rejects_a_height_the_pools_cannot_take():
    with pytest.raises(ValueError, match="height 16 is too small .* multiply to 32: use data.height >= 32"):
        CRNN(num_classes=5, height=16)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"channels": (8, 8), "pools": ((2, 2),)}, "one entry per block"),
    ({"norm": "layer"}, "norm must be one of"),
    ({"rnn": "transformer"}, "rnn one of"),
])
def test_rejects_bad_configs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CRNN(num_classes=5, **kwargs)


def test_rejects_images_of_another_height_and_ceil_mode_pooling():
    with pytest.raises(ValueError, match="must be 32 px high"):
        CRNN(num_classes=5)(torch.zeros(1, 1, 24, 40), torch.tensor([40]))
    with pytest.raises(ValueError, match="ceil_mode"):
        layer_output_width(nn.MaxPool2d(2, ceil_mode=True), torch.tensor([5]))


def test_backward_direction_ignores_padding():
    """With packing, what lies right of an image's width cannot change its outputs (even in train mode's RNN)."""
    torch.manual_seed(0)
    model = CRNN(num_classes=5, channels=(8, 8, 8, 8, 8), rnn_hidden=8, norm="none").train()
    model.dropout.p = 0.0
    model.rnn.dropout = 0.0
    image = torch.rand(1, 1, 32, 60)
    padded = torch.cat([image, torch.rand(1, 1, 32, 40)], -1)
    out, length = model(image, torch.tensor([60]))
    out_padded, length_padded = model(padded, torch.tensor([60]))
    assert length == length_padded
    torch.testing.assert_close(out_padded[:length], out)


def _module() -> CRNNModule:
    model = {"_target_": "crnn.model.CRNN", "channels": [8, 8, 8, 8, 8], "rnn_hidden": 8, "rnn_layers": 1}
    return CRNNModule(charset="0123456789", model=model)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loss_is_float32_under_autocast(dtype):
    module = _module()
    widths = torch.tensor([40, 24])
    batch = {"images": torch.rand(2, 1, 32, 40), "widths": widths,
             "targets": torch.tensor([[1, 2, 3], [4, 4, 0]]), "target_lengths": torch.tensor([3, 2])}
    with torch.autocast("cpu", dtype=dtype):
        log_probs, lengths = module(batch["images"], widths)
        loss = module.compute_loss(log_probs, lengths, batch)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_infeasible_sample_gives_finite_loss_and_gradients():
    module = _module()
    widths = torch.tensor([40, 8])  # the second image has 1 frame for 5 labels: no CTC alignment fits
    batch = {"images": torch.rand(2, 1, 32, 40), "widths": widths,
             "targets": torch.tensor([[1, 2, 3, 4, 5], [1, 2, 3, 4, 5]]), "target_lengths": torch.tensor([3, 5])}
    log_probs, lengths = module(batch["images"], widths)
    assert lengths.tolist() == [5, 1]
    loss = module.compute_loss(log_probs, lengths, batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)


def test_hyperparameters_rebuild_the_network(tmp_path):
    module = _module()
    rebuilt = CRNNModule(**module.hparams)
    rebuilt.load_state_dict(module.state_dict())
    assert set(module.hparams) == {"charset", "model", "blank", "height", "scheduler_interval", "num_logged_samples",
                                   "protocol", "nfkc"}
    images, widths = torch.rand(2, 1, 32, 50), torch.tensor([50, 30])
    assert module.eval().predict_texts(images, widths) == rebuilt.eval().predict_texts(images, widths)


def test_collated_mixed_width_batch_gives_each_image_its_own_length():
    datamodule = SyntheticDataModule(val_size=64, batch_size=64, num_workers=0)
    datamodule.setup("validate")
    batch = next(iter(datamodule.val_dataloader()))
    widths, images = batch["widths"], batch["images"]
    assert len(set(widths.tolist())) > 10 and images.shape[-1] == widths.max()
    model = CRNN(datamodule.charset.num_classes).eval()  # the default: width / 8
    log_probs, lengths = model(images, widths)
    for i in range(0, 64, 7):
        alone, alone_length = model(images[i : i + 1, :, :, : widths[i]], widths[i : i + 1])
        assert alone_length.item() == lengths[i].item()
        torch.testing.assert_close(alone[:, 0], log_probs[: lengths[i], i], atol=1e-5, rtol=1e-4)
    needed = required_frames(batch["targets"], batch["target_lengths"])
    assert (lengths >= needed).all(), "the default model leaves too few frames for some digit strings"
