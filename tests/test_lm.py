"""Character n-gram LM: Witten-Bell estimates against hand-worked numbers, ARPA round trip, the decoder's tables
against the back-off rule, the training script."""

import math
import random

import pytest
import torch

from crnn.lm import BOS, EOS, SPACE, UNK, NgramLM, witten_bell
from scripts import train_char_lm


def log10(x):
    return math.log10(x)


def test_witten_bell_bigram_of_a_toy_corpus_matches_hand_computed_probabilities(tmp_path):
    """Corpus "ab", "a"; lines <s> a b </s>, <s> a </s>.

    Unigrams (targets, <s> never one): a 2, b 1, </s> 2; N = 5, T = 3 types, V = {a, b, </s>, <unk>}:
    P(w) = (c(w) + 3/4) / 8: a 2.75/8, b 1.75/8, </s> 2.75/8, <unk> 0.75/8.
    Context <s>: c = 2, T = 1: P(a|<s>) = (2 + 1 * 2.75/8) / 3, back-off 1/3.
    Context a: c = 2 (a b, a </s>), T = 2: P(b|a) = (1 + 2 * 1.75/8) / 4, P(</s>|a) = (1 + 2 * 2.75/8) / 4,
    back-off 2/4. Context b: c = 1, T = 1: P(</s>|b) = (1 + 2.75/8) / 2, back-off 1/2.
    """
    path = tmp_path / "toy.arpa"
    witten_bell(["ab", "a"], order=2).write_arpa(path)
    model = NgramLM.read_arpa(path)
    expected_unigrams = {"a": 2.75 / 8, "b": 1.75 / 8, EOS: 2.75 / 8, UNK: 0.75 / 8}
    for token, prob in expected_unigrams.items():
        assert model.entries[0][(token,)][0] == pytest.approx(log10(prob), abs=1e-6)
    assert model.entries[0][(BOS,)] == pytest.approx((-99.0, log10(1 / 3)), abs=1e-6)
    assert model.entries[0][("a",)][1] == pytest.approx(log10(0.5), abs=1e-6)
    assert model.entries[0][("b",)][1] == pytest.approx(log10(0.5), abs=1e-6)
    expected_bigrams = {(BOS, "a"): (2 + 2.75 / 8) / 3, ("a", "b"): (1 + 2 * 1.75 / 8) / 4,
                        ("a", EOS): (1 + 2 * 2.75 / 8) / 4, ("b", EOS): (1 + 2.75 / 8) / 2}
    assert set(model.entries[1]) == set(expected_bigrams)
    for ngram, prob in expected_bigrams.items():
        assert model.entries[1][ngram][0] == pytest.approx(log10(prob), abs=1e-6)
    # unseen bigram b|a backs off: P(a|a) = 1/2 * P(a); scoring "ab" and "ba" by hand
    assert 10 ** model.log10_prob(["a"], "a") == pytest.approx(0.5 * 2.75 / 8, rel=1e-6)
    ab = math.log(expected_bigrams[(BOS, "a")] * expected_bigrams[("a", "b")] * expected_bigrams[("b", EOS)])
    assert model.score("ab") == pytest.approx(ab, rel=1e-6)
    ba = math.log((1 / 3 * 1.75 / 8) * (0.5 * 2.75 / 8) * expected_bigrams[("a", EOS)])
    assert model.score("ba") == pytest.approx(ba, rel=1e-6)
    # a character never seen: <unk>'s probability (after backing off from context b)
    assert model.score("bx", end=False) == pytest.approx(math.log(1 / 3 * 1.75 / 8 * 0.5 * 0.75 / 8), rel=1e-6)


def random_lines(seed, count=60, alphabet="ab c"):
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 9))) for _ in range(count)]


@pytest.mark.parametrize("order", [1, 3, 5])
def test_every_context_is_a_distribution(order):
    model = witten_bell(random_lines(order), order)
    vocabulary = ["a", "b", "c", SPACE, EOS, UNK]
    rng = random.Random(0)
    contexts = [(), (BOS,), ("x",)] + [tuple(rng.choice(vocabulary[:4]) for _ in range(n)) for n in range(1, 6)]
    for context in contexts:
        total = sum(10 ** model.log10_prob(context, token) for token in vocabulary)
        assert total == pytest.approx(1.0, abs=1e-9), context


def test_arpa_round_trip_keeps_every_number(tmp_path):
    model = witten_bell(random_lines(1), 4)
    model.write_arpa(tmp_path / "lm.arpa")
    again = NgramLM.read_arpa(tmp_path / "lm.arpa")
    assert [set(e) for e in again.entries] == [set(e) for e in model.entries]
    for ours, theirs in zip(model.entries, again.entries):
        for ngram, (prob, backoff) in ours.items():
            assert theirs[ngram] == pytest.approx((prob, backoff), rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("order", [1, 2, 3, 6])
def test_tables_score_lines_like_the_back_off_rule(order):
    """Walking the automaton (start state, next_state, end) gives log P of a line as :meth:`NgramLM.score` does,
    also for characters the model never saw (class 'x') and with the blank anywhere among the classes."""
    model = witten_bell(random_lines(order), order)
    class_chars = ["a", None, " ", "b", "x", "c"]
    tables = model.tables(class_chars)
    column = {char: c for c, char in enumerate(class_chars) if char is not None}
    rng = random.Random(order)
    for _ in range(40):
        text = "".join(rng.choice("ab cx") for _ in range(rng.randint(0, 12)))
        state, total = tables.start, 0.0
        for char in text:
            total += tables.log_probs[state, column[char]].item()
            state = tables.next_state[state, column[char]].item()
        total += tables.end[state].item()
        assert total == pytest.approx(model.score(text), rel=1e-5, abs=1e-4), text
    assert (tables.log_probs[:, 1] == 0).all()
    assert (tables.next_state[:, 1] == torch.arange(len(tables.end))).all()


@pytest.mark.parametrize(("content", "message"), [
    ("\\data\\\nngram 1=2\n\n\\1-grams:\n-1\ta\n\\end\\\n", "declares"),
    ("\\data\\\nngram 1=1\n\n\\1-grams:\n-1\ta\tb\tc\n\\end\\\n", ":5: expected"),
    ("\\data\\\nngram 1=1\n\n\\1-grams:\nx\ta\n\\end\\\n", ":5: not a number"),
    ("just text\n", "not an ARPA file"),
])
def test_malformed_arpa_files_are_rejected_naming_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.arpa"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        NgramLM.read_arpa(path)


def test_kenlm_scores_our_arpa_file_alike(tmp_path):
    kenlm = pytest.importorskip("kenlm")
    witten_bell(random_lines(2), 3).write_arpa(tmp_path / "lm.arpa")
    ours, theirs = NgramLM.read_arpa(tmp_path / "lm.arpa"), kenlm.Model(str(tmp_path / "lm.arpa"))
    for text in random_lines(3, count=20):
        tokens = " ".join(SPACE if c == " " else c for c in text)
        assert ours.score(text) == pytest.approx(theirs.score(tokens, bos=True, eos=True) * math.log(10), rel=1e-4)


def test_training_script_reads_folders_and_text_files(tmp_path):
    folder = tmp_path / "ds"
    (folder / "images").mkdir(parents=True)
    (folder / "gt.txt").write_text("images/0.png\tab\nimages/1.png\ta\n", encoding="utf-8")
    text = tmp_path / "corpus.txt"
    text.write_text("ab\n\na\n", encoding="utf-8")
    model = train_char_lm.main([str(folder), str(text), "--order", "2", "--output", str(tmp_path / "lm.arpa")])
    written = NgramLM.read_arpa(tmp_path / "lm.arpa")
    assert written.order == 2
    # "ab", "a" twice (the empty line skipped): a 4, b 2, </s> 4 of N = 10, T = 3 types, so
    # P(a) = (4 + 3/4) / 13 and P(a|<s>) = (4 + 1 * P(a)) / (4 + 1)
    assert 10 ** written.entries[1][(BOS, "a")][0] == pytest.approx((4 + 4.75 / 13) / 5, rel=1e-6)
    assert model.order == 2
    with pytest.raises(FileNotFoundError, match="missing"):
        train_char_lm.main([str(tmp_path / "missing"), "--output", str(tmp_path / "x.arpa")])
