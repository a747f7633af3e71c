"""The benchmark scripts: bench_ctc runs and its correctness columns (against the float64 built-in) hold at a small
shape; bench_decode's accuracy columns match a hand-worked example and its tuning grid equals Fusion.build."""

import pytest
import torch

from conftest import load_script
from crnn.decoding import Fusion
from crnn.lexicon import Lexicon
from crnn.lm import witten_bell
from data import Charset


def test_bench_ctc_runs_and_every_implementation_matches_the_builtin(capsys):
    load_script("bench_ctc").main(["--device", "cpu", "--frames", "24", "--batch", "4", "--classes", "6", "--target-length", "5",
                    "--repeats", "1"])
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()
            if line.split() and line.split()[0] in ("built-in", "autograd", "alpha-beta")}
    assert set(rows) == {"built-in", "autograd", "alpha-beta"}
    for name, cells in rows.items():
        assert cells[5:8] == ["True", "True", "True"], (name, cells)  # loss, grad, CE-grad match


def test_bench_ctc_all_losses_reports_time_and_peak_memory_of_every_loss(capsys):
    load_script("bench_ctc").main(["--device", "cpu", "--losses", "all", "--frames", "12", "--batch", "2",
                                   "--classes", "3000", "--target-length", "4", "--repeats", "1"])
    names = ("ctc", "python_ctc", "python_ctc_autograd", "focal_ctc", "reweighted_ctc", "smoothed_ctc", "maxent_ctc")
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()
            if line.split() and line.split()[0] in names}
    assert set(rows) == set(names)
    for name, cells in rows.items():
        assert cells[4].endswith("x") and float(cells[5]) >= 0.0, (name, cells)  # time ratio, peak MiB added


def test_bench_decode_accuracy_row_matches_a_hand_worked_example():
    """References "ab cd", "x", "efg"; texts "ab ce" (1 char, 1 of 2 words wrong), "x", "" (3 chars, 1 word wrong):
    CER 4 / 9, word acc 1 - 2 / 4, line acc 1 / 3; by score the lines rank "x" (right), "ab ce", "" (wrong): the
    top 50 % (ceil(1.5) = 2 lines) hold 1 error, the top 80 % and 95 % (3 lines) 2; 3 lines in 0.5 s: 6 lines/s."""
    bench = load_script("bench_decode")
    scored = bench.Scored(["ab ce", "x", ""], [-1.0, -0.5, float("-inf")], 0.5)
    row = bench.accuracy_row("greedy", scored, ["ab cd", "x", "efg"])
    assert row == f"| greedy | {4 / 9:.4f} | 0.5000 | {1 / 3:.4f} | 6 | 0.5000 | {2 / 3:.4f} | {2 / 3:.4f} |"


def same(got, want) -> bool:
    """Equal tensors (values, dtype, shape) and equal other fields, through nested tuples."""
    if isinstance(got, tuple):
        return len(got) == len(want) and all(same(g, w) for g, w in zip(got, want))
    if isinstance(got, torch.Tensor):
        return got.dtype == want.dtype and torch.equal(got, want)
    return got == want


@pytest.mark.parametrize("blank", [0, 2])
def test_bench_decode_tuning_grid_equals_fusion_build_at_every_pair(blank):
    bench = load_script("bench_decode")
    charset = Charset("ab ", blank=blank)
    lm = witten_bell(["ab a", "b ab", "a"], order=3)
    lexicon = Lexicon(["a", "ab"], "word")
    weights, bonuses = [0.3, 1.0], [0.0, 0.5, -1.0]
    fusions = bench.compared_fusions(charset, lm, lexicon, weights, bonuses)
    expected = {"lexicon": Fusion.build(charset, lexicon=lexicon)}
    for weight in weights:
        for bonus in bonuses:
            expected[f"char LM (w={weight:g}, b={bonus:g})"] = Fusion.build(charset, lm, weight, bonus)
            expected[f"char LM + lexicon (w={weight:g}, b={bonus:g})"] = Fusion.build(charset, lm, weight, bonus,
                                                                                     lexicon)
    assert set(fusions) == set(expected)
    for name, fusion in fusions.items():
        assert same(fusion, expected[name]), name
    single = bench.compared_fusions(charset, lm, None, [0.5], [0.0])
    assert list(single) == ["char LM"]
