"""TextMetrics on hand-worked cases and under a simulated cross-process reduction."""

import pytest
import torch

from crnn.metrics import TextMetrics, character_error_rate, normalized_edit_distance, sequence_accuracy


def compute(preds, targets):
    metric = TextMetrics()
    metric.update(preds, targets)
    return {name: value.item() for name, value in metric.compute().items()}


@pytest.mark.parametrize(
    ("pred", "target", "cer", "ned"),
    [
        ("abc", "abc", 0.0, 0.0),
        ("abd", "abc", 1 / 3, 1 / 3),  # substitution
        ("abcd", "abc", 1 / 3, 1 / 4),  # insertion: normalised by the longer prediction
        ("ab", "abc", 1 / 3, 1 / 3),  # deletion
        ("", "abc", 1.0, 1.0),
        ("ba", "abc", 2 / 3, 2 / 3),
    ],
)
def test_single_line(pred, target, cer, ned):
    values = compute([pred], [target])
    assert values["cer"] == pytest.approx(cer)
    assert values["ned"] == pytest.approx(ned)
    assert values["acc"] == float(pred == target)


def test_corpus_cer_weights_by_reference_length():
    values = compute(["abd", "hello", "x"], ["abc", "hello", "xyz"])
    assert values["cer"] == pytest.approx((1 + 0 + 2) / (3 + 5 + 3))
    assert values["acc"] == pytest.approx(1 / 3)
    assert values["ned"] == pytest.approx((1 / 3 + 0 + 2 / 3) / 3)


def test_empty_references_give_finite_values():
    assert compute([""], [""]) == {"cer": 0.0, "acc": 1.0, "ned": 0.0}
    values = compute(["ab", ""], ["", ""])
    assert values["cer"] == 2.0  # no reference characters: the denominator is clamped to 1
    assert values["acc"] == 0.5 and values["ned"] == 0.5


def test_no_lines_give_zeros():
    assert compute([], []) == {"cer": 0.0, "acc": 0.0, "ned": 0.0}


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError):
        TextMetrics().update(["a"], ["a", "b"])


def test_kitten_sitting_by_hand():
    """'kitten' -> 'sitting': k->s, e->i, +g, distance 3; 'sitting' is the 7-character reference."""
    expected = {"cer": 3 / 7, "acc": 0.0, "ned": 3 / 7}  # NED divides by max(6, 7) = 7
    assert compute(["kitten"], ["sitting"]) == pytest.approx(expected)
    assert character_error_rate(["kitten"], ["sitting"]) == pytest.approx(3 / 7)
    assert sequence_accuracy(["kitten"], ["sitting"]) == 0.0
    assert normalized_edit_distance(["kitten"], ["sitting"]) == pytest.approx(3 / 7)
    # the other way round: the reference has 6 characters, the longer string is still 7
    assert compute(["sitting"], ["kitten"]) == pytest.approx({"cer": 3 / 6, "acc": 0.0, "ned": 3 / 7})


def test_functional_helpers_by_hand():
    preds, targets = ["abd", "", "kitten", "same"], ["abc", "x", "sitting", "same"]
    # distances 1, 1, 3, 0 over 3 + 1 + 7 + 4 reference characters; one exact line of four
    assert character_error_rate(preds, targets) == pytest.approx(5 / 15)
    assert sequence_accuracy(preds, targets) == pytest.approx(1 / 4)
    assert normalized_edit_distance(preds, targets) == pytest.approx((1 / 3 + 1 / 1 + 3 / 7 + 0) / 4)
    assert compute(preds, targets) == pytest.approx({"cer": 5 / 15, "acc": 1 / 4, "ned": (1 / 3 + 1 + 3 / 7) / 4})
    assert (character_error_rate([], []), sequence_accuracy([], []), normalized_edit_distance([], [])) == (0, 0, 0)


def test_summed_states_of_split_data_equal_one_metric_over_all_data():
    preds = ["abd", "hello", "", "kitten", "ab", "zz"]
    targets = ["abc", "hallo", "q", "sitting", "ab", ""]
    whole = TextMetrics()
    whole.update(preds, targets)

    first, second = TextMetrics(), TextMetrics()
    first.update(preds[:2], targets[:2])
    second.update(preds[2:3], targets[2:3])
    second.update(preds[3:], targets[3:])
    # merge_state applies each state's dist_reduce_fx ("sum"), as the reduction across processes does
    expected = whole.compute()
    first.merge_state(second)
    for name, value in first.compute().items():
        torch.testing.assert_close(value, expected[name])
