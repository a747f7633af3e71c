"""TextMetrics on hand-worked cases and under a simulated cross-process reduction."""

import pytest
import torch

from crnn.metrics import TextMetrics, character_error_rate, normalize, normalized_edit_distance, sequence_accuracy


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


# Hand-worked: "Hello, World!" (13 chars) vs "hello world" (11): raw needs H->h, W->w and deletes "," and "!" (4
# edits); caseless only the two deletions; alnum36 compares "helloworld" with itself. "ﬁne" (3 chars, U+FB01 ligature)
# vs "fine": raw substitutes ﬁ->f and inserts i (2 edits); alnum36 drops the ligature ("ne" vs "fine": 2); NFKC
# turns it into "fi" (0 edits).
PROTOCOL_CASES = [
    # protocol, nfkc, edits per line, reference chars per line, prediction chars per line
    ("raw", False, (4, 2), (11, 4), (13, 3)),
    ("caseless", False, (2, 2), (11, 4), (13, 3)),
    ("alnum36", False, (0, 2), (10, 4), (10, 2)),
    ("raw", True, (4, 0), (11, 4), (13, 4)),
    ("caseless", True, (2, 0), (11, 4), (13, 4)),
    ("alnum36", True, (0, 0), (10, 4), (10, 4)),
]


@pytest.mark.parametrize(("protocol", "nfkc", "edits", "ref_chars", "pred_chars"), PROTOCOL_CASES)
def test_protocols_by_hand(protocol, nfkc, edits, ref_chars, pred_chars):
    preds, targets = ["Hello, World!", "\ufb01ne"], ["hello world", "fine"]
    metric = TextMetrics(protocol, nfkc)
    metric.update(preds, targets)
    values = {name: value.item() for name, value in metric.compute().items()}
    assert values["cer"] == pytest.approx(sum(edits) / sum(ref_chars))
    assert values["ned"] == pytest.approx(sum(e / max(r, p) for e, r, p in zip(edits, ref_chars, pred_chars)) / 2)
    assert values["acc"] == sum(e == 0 for e in edits) / 2
    assert character_error_rate(preds, targets, protocol, nfkc) == pytest.approx(values["cer"])
    assert sequence_accuracy(preds, targets, protocol, nfkc) == values["acc"]
    assert normalized_edit_distance(preds, targets, protocol, nfkc) == pytest.approx(values["ned"])


def test_normalize_by_hand():
    assert normalize("Ab-9 Ü!", "raw") == "Ab-9 Ü!"
    assert normalize("Ab-9 Ü!", "caseless") == "ab-9 ü!"
    assert normalize("Ab-9 Ü!", "alnum36") == "ab9"  # ü is not one of the 36
    assert normalize("\uff21\uff42\uff11", "raw", nfkc=True) == "Ab1"  # full-width forms
    assert normalize("\uff21\uff42\uff11", "alnum36") == ""
    assert normalize("\uff21\uff42\uff11", "alnum36", nfkc=True) == "ab1"


def test_a_label_with_nothing_left_under_alnum36_is_an_empty_reference():
    assert compute_protocol(["x"], ["?!"], "alnum36") == {"cer": 1.0, "acc": 0.0, "ned": 1.0}  # one insertion
    assert compute_protocol([""], ["?!"], "alnum36") == {"cer": 0.0, "acc": 1.0, "ned": 0.0}


def compute_protocol(preds, targets, protocol):
    metric = TextMetrics(protocol)
    metric.update(preds, targets)
    return {name: value.item() for name, value in metric.compute().items()}


def test_unknown_protocol_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown evaluation protocol 'ALNUM'; expected one of \['raw', 'caseless'"):
        TextMetrics("ALNUM")
