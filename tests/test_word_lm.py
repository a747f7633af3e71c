"""Word LM (KenLM) and hotword fusion in the beam search: the word ARPA estimate against hand-worked numbers, the
fused search with an unbounded beam against the exhaustive argmax of the fused score (words scored by KenLM
directly, hotwords by a regular expression), and pyctcdecode with the same word LM (where installed)."""

import math
import re
import sys

import pytest
import torch

import brute_force as bf
from crnn.decoding import BeamSearchDecoder, Fusion, beam_search
from crnn.hotwords import Hotwords
from crnn.lexicon import Lexicon
from crnn.lm import BOS, EOS, UNK, NgramLM, witten_bell, word_tokens
from data import Charset
from host_sync import value_reads
from scripts import train_char_lm

WORD_CORPUS = ["ab a", "b ab", "a", "ba b", "aa", "ab ab b"]


def random_log_probs(shape, seed, scale=2.0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).log_softmax(-1)


def unbounded(num_frames, num_classes):
    return sum((num_classes - 1) ** n for n in range(num_frames + 1))


# ---------------------------------------------------------------- the word ARPA


def test_word_witten_bell_of_a_toy_corpus_matches_hand_computed_probabilities(tmp_path):
    """Corpus "red car", "red", "car"; lines <s> red car </s>, <s> red </s>, <s> car </s>.

    Unigrams (targets): red 2, car 2, </s> 3; N = 7, T = 3 types, V = {red, car, </s>, <unk>}:
    P(w) = (c(w) + 3/4) / 10. Context <s>: c = 3, T = 2: P(red|<s>) = (2 + 2 P(red)) / 5, P(car|<s>) =
    (1 + 2 P(car)) / 5, back-off 2/5. Context red: c = 2, T = 2: P(car|red) = (1 + 2 P(car)) / 4,
    P(</s>|red) = (1 + 2 P(</s>)) / 4, back-off 2/4. Context car: c = 2, T = 1: P(</s>|car) = (2 + P(</s>)) / 3,
    back-off 1/3.
    """
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("red car\nred\n\ncar\n", encoding="utf-8")
    train_char_lm.main([str(corpus), "--unit", "word", "--order", "2", "--output", str(tmp_path / "w.arpa")])
    model = NgramLM.read_arpa(tmp_path / "w.arpa")
    unigram = {"red": 2.75 / 10, "car": 2.75 / 10, EOS: 3.75 / 10, UNK: 0.75 / 10}
    for word, prob in unigram.items():
        assert model.entries[0][(word,)][0] == pytest.approx(math.log10(prob), abs=1e-6)
    backoffs = {BOS: 2 / 5, "red": 2 / 4, "car": 1 / 3}
    for word, backoff in backoffs.items():
        assert model.entries[0][(word,)][1] == pytest.approx(math.log10(backoff), abs=1e-6)
    bigrams = {(BOS, "red"): (2 + 2 * 0.275) / 5, (BOS, "car"): (1 + 2 * 0.275) / 5,
               ("red", "car"): (1 + 2 * 0.275) / 4, ("red", EOS): (1 + 2 * 0.375) / 4, ("car", EOS): (2 + 0.375) / 3}
    assert set(model.entries[1]) == set(bigrams)
    for ngram, prob in bigrams.items():
        assert model.entries[1][ngram][0] == pytest.approx(math.log10(prob), abs=1e-6)


def test_kenlm_scores_the_word_arpa_by_the_back_off_rule(tmp_path):
    """The corpus above through KenLM: "car red" backs off from car to P(red)."""
    kenlm = pytest.importorskip("kenlm")
    (tmp_path / "corpus.txt").write_text("red car\nred\ncar\n", encoding="utf-8")
    train_char_lm.main([str(tmp_path / "corpus.txt"), "--unit", "word", "--order", "2", "--output",
                        str(tmp_path / "w.arpa")])
    unigram = {"red": 2.75 / 10}
    bigrams = {(BOS, "red"): (2 + 2 * 0.275) / 5, (BOS, "car"): (1 + 2 * 0.275) / 5,
               ("red", "car"): (1 + 2 * 0.275) / 4, ("red", EOS): (1 + 2 * 0.375) / 4, ("car", EOS): (2 + 0.375) / 3}
    theirs = kenlm.Model(str(tmp_path / "w.arpa"))
    expected = bigrams[(BOS, "red")] * bigrams[("red", "car")] * bigrams[("car", EOS)]
    assert 10 ** theirs.score("red car", bos=True, eos=True) == pytest.approx(expected, rel=1e-5)
    expected = bigrams[(BOS, "car")] * (1 / 3 * unigram["red"]) * bigrams[("red", EOS)]
    assert 10 ** theirs.score("car red", bos=True, eos=True) == pytest.approx(expected, rel=1e-5)


def test_word_tokens_split_on_whitespace():
    assert word_tokens(" ab  c\td ") == ["ab", "c", "d"]
    assert set(witten_bell(["x y"], 1, word_tokens).entries[0]) == {("x",), ("y",), (EOS,), (BOS,), (UNK,)}


# ---------------------------------------------------------------- the fused score, brute force


def kenlm_words_score(model, text, weight, unk_offset, word_bonus):
    """``weight * (ln P_kenlm(words of text, <s> ... </s>) + unk_offset * #OOV words) + word_bonus * #words``,
    the words being the non-empty space-separated parts; KenLM scores the whole sentence itself."""
    words = [word for word in text.split(" ") if word]
    oov = sum(word not in model for word in words)
    log10 = model.score(" ".join(words), bos=True, eos=True)
    return weight * (log10 * math.log(10) + unk_offset * oov) + word_bonus * len(words)


def hotword_score(text, hotwords, weight):
    """``weight * sum len(h)`` over every occurrence (overlapping too) of each hotword between word bounds."""
    return weight * sum(len(h) * len(re.findall(rf"(?=(?<!\S){re.escape(h)}(?!\S))", text)) for h in hotwords)


def exhaustive_best(log_probs, charset, extra, allowed=lambda text: True):
    """The text maximising ``log P_ctc + extra(text)`` over every labelling of ``(T, C)`` log-probs that
    ``allowed`` accepts, and its ``log P_ctc``."""
    candidates = []
    for labelling, log_p in bf.labelling_log_probs(log_probs, charset.blank).items():
        text = charset.decode(labelling)
        if allowed(text):
            candidates.append((log_p + extra(text), text, log_p))
    if not candidates:
        return "", -math.inf
    _, text, log_p = max(candidates)
    return text, log_p


@pytest.fixture
def word_arpa(tmp_path):
    path = tmp_path / "words.arpa"
    witten_bell(WORD_CORPUS, 2, word_tokens).write_arpa(path)
    return str(path)


def check_unbounded_beam(charset, decoder, extra, seed, allowed=lambda text: True, token_min_logp=None):
    """``token_min_logp``: None, the exact search; ``-inf``, the pruned search's code path pruning nothing."""
    num_classes = charset.num_classes
    log_probs = random_log_probs((6, 5, num_classes), seed=seed, scale=1.5)
    lengths = torch.tensor([6, 6, 5, 3, 0])
    decoder.beam_width, decoder.token_min_logp = unbounded(6, num_classes), token_min_logp
    labellings, scores = decoder.bind(charset)(log_probs, lengths, charset.blank)
    for b, length in enumerate(lengths.tolist()):
        text, log_p = exhaustive_best(log_probs[:length, b], charset, extra, allowed)
        assert charset.decode(labellings[b]) == text, b
        assert scores[b].item() == pytest.approx(log_p, abs=1e-9)


@pytest.mark.parametrize("blank", [0, 3])
@pytest.mark.parametrize(("weight", "unk_offset", "word_bonus"), [(1.0, -2.0, 0.0), (2.5, 0.0, 1.0),
                                                                    (0.7, -5.0, -0.5)])
def test_word_lm_with_an_unbounded_beam_finds_the_exhaustive_argmax(word_arpa, blank, weight, unk_offset,
                                                                    word_bonus):
    kenlm = pytest.importorskip("kenlm")
    model = kenlm.Model(word_arpa)
    charset = Charset("ab ", blank=blank)
    decoder = BeamSearchDecoder(word_lm_path=word_arpa, word_lm_weight=weight, word_unk_offset=unk_offset,
                                word_bonus=word_bonus)
    check_unbounded_beam(charset, decoder, lambda text: kenlm_words_score(model, text, weight, unk_offset, word_bonus),
                         seed=blank + int(10 * weight))


def test_word_lm_without_a_space_class_scores_the_line_as_one_word(word_arpa):
    kenlm = pytest.importorskip("kenlm")
    model = kenlm.Model(word_arpa)
    decoder = BeamSearchDecoder(word_lm_path=word_arpa, word_lm_weight=1.5, word_unk_offset=-1.0)
    check_unbounded_beam(Charset("abc"), decoder, lambda text: kenlm_words_score(model, text, 1.5, -1.0, 0.0), seed=4)


@pytest.mark.parametrize("token_min_logp", [None, float("-inf")])
@pytest.mark.parametrize("blank", [0, 2])
def test_word_lm_combines_with_char_lm_lexicon_hotwords_and_bonus(word_arpa, blank, token_min_logp):
    kenlm = pytest.importorskip("kenlm")
    model = kenlm.Model(word_arpa)
    char_lm = witten_bell(WORD_CORPUS, 3)
    lexicon = Lexicon(["a", "ab", "b", "bab", "aa"], "word")
    hotwords = ["bab", "a b"]
    decoder = BeamSearchDecoder(lm_path=None, word_lm_path=word_arpa, word_lm_weight=0.8, word_unk_offset=-3.0,
                                word_bonus=0.2, hotwords=hotwords, hotword_weight=0.6)
    decoder.lm, decoder.lm_weight, decoder.insertion_bonus, decoder.lexicon = char_lm, 0.5, 0.3, lexicon

    def extra(text):
        return (kenlm_words_score(model, text, 0.8, -3.0, 0.2) + 0.5 * char_lm.score(text) + 0.3 * len(text)
                + hotword_score(text, hotwords, 0.6))

    check_unbounded_beam(Charset("ab ", blank=blank), decoder, extra, seed=11 + blank, allowed=lexicon.__contains__,
                         token_min_logp=token_min_logp)


def test_a_strong_word_lm_changes_the_decision(word_arpa):
    """The tests above must be able to fail: the word LM picks another text than plain CTC on some lines."""
    pytest.importorskip("kenlm")
    charset = Charset("ab ")
    log_probs = random_log_probs((6, 8, 4), seed=0, scale=1.5)
    plain = beam_search(log_probs, torch.full((8,), 6), 50).labels
    fused = BeamSearchDecoder(50, word_lm_path=word_arpa, word_lm_weight=2.0, charset=charset)
    assert plain != fused(log_probs, torch.full((8,), 6)).labels


def test_word_lm_goes_to_the_host_once_per_frame(word_arpa):
    """The device-to-host transfers are the word LM's: one per frame (:meth:`WordLM.score_words`) and one for the
    line ends; no other value reads grow with the number of frames."""
    pytest.importorskip("kenlm")
    decoder = BeamSearchDecoder(4, word_lm_path=word_arpa, charset=Charset("ab "), token_min_logp=None)
    scorer = decoder.word_lm
    calls = []
    score_words, score_ends = scorer.score_words, scorer.score_ends
    scorer.score_words = lambda *args: calls.append("word") or score_words(*args)
    scorer.score_ends = lambda *args: calls.append("end") or score_ends(*args)

    def run(frames):
        calls.clear()
        decoder(random_log_probs((frames, 3, 4), seed=frames), torch.tensor([frames, frames - 2, 1]))
        assert calls == ["word"] * frames + ["end"]

    assert value_reads(lambda: run(8)) == value_reads(lambda: run(40))


def test_word_lm_without_kenlm_says_how_to_install_it(monkeypatch, word_arpa):
    monkeypatch.setitem(sys.modules, "kenlm", None)
    with pytest.raises(ImportError, match=r"pip install 'ctc-crnn\[lm\]'"):
        BeamSearchDecoder(word_lm_path=word_arpa)


def test_word_lm_errors_name_the_problem(tmp_path, word_arpa):
    pytest.importorskip("kenlm")
    with pytest.raises(FileNotFoundError, match="word_lm_path"):
        BeamSearchDecoder(word_lm_path=str(tmp_path / "missing.arpa"))
    (tmp_path / "binary.lm").write_bytes(b"\x00\xff\xfe binary")
    with pytest.raises(ValueError, match="word_lm_vocabulary"):
        BeamSearchDecoder(word_lm_path=str(tmp_path / "binary.lm"))
    witten_bell(["ab abc", "b"], 2, word_tokens).write_arpa(tmp_path / "c.arpa")
    with pytest.warns(UserWarning, match="1 of 3 word LM vocabulary words"):
        BeamSearchDecoder(word_lm_path=str(tmp_path / "c.arpa"), charset=Charset("ab "))
    (tmp_path / "vocabulary.txt").write_text("ab\nb\n", encoding="utf-8")
    decoder = BeamSearchDecoder(word_lm_path=str(tmp_path / "c.arpa"), word_lm_vocabulary=str(tmp_path / "vocabulary.txt"))
    assert decoder.word_lm.words == ["ab", "b"]


# ---------------------------------------------------------------- hotwords


@pytest.mark.parametrize(("hotwords", "blank"), [(["ab"], 0), (["ab", "b"], 2), (["a b", "b a", "ba"], 0),
                                                 (["bab", "ab ab"], 3)])
@pytest.mark.parametrize("weight", [0.5, 3.0, -1.0])
@pytest.mark.parametrize("backend", ["tensor", "numba"])
def test_hotwords_with_an_unbounded_beam_find_the_exhaustive_argmax(hotwords, blank, weight, backend):
    decoder = BeamSearchDecoder(hotwords=hotwords, hotword_weight=weight, backend=backend)
    check_unbounded_beam(Charset("ab ", blank=blank), decoder, lambda text: hotword_score(text, hotwords, weight),
                         seed=blank + len(hotwords) + int(weight))


def test_hotword_automaton_scores_every_text_like_the_regular_expression():
    """Walking the tables (potential differences plus commits at spaces and at the end) gives every text of up to
    7 characters over "ab " the regex reference score: the automaton is exact, not only on the argmax."""
    import itertools

    hotwords = ["ab", "b", "a b", "b a b", "aba"]
    charset = Charset("ab ")
    tables = Hotwords(hotwords, 1.0).tables([None, "a", "b", " "])
    for length in range(8):
        for chars in itertools.product("ab ", repeat=length):
            text, state, total = "".join(chars), tables.root, 0.0
            for char in text:
                column = charset.encode(char)[0]
                following = tables.next_state[state, column].item()
                total += tables.potential[following].item() - tables.potential[state].item()
                if char == " ":
                    total += tables.commit[state].item()
                state = following
            total += tables.commit[state].item() - tables.potential[state].item()
            assert total == pytest.approx(hotword_score(text, hotwords, 1.0)), text


@pytest.mark.parametrize("backend", ["tensor", "numba"])
def test_hotwords_steer_a_narrow_beam(backend):
    """Width 1, hotword "ab": the first frame slightly prefers "b" to "a", the second is a clear "b". Without the
    bonus of the partial match "a" the one slot keeps "b" and never reaches "ab"."""
    charset = Charset("ab ")
    probs = torch.tensor([[0.03, 0.45, 0.5, 0.02], [0.05, 0.03, 0.9, 0.02]], dtype=torch.float64)
    log_probs = probs.log()[:, None]
    plain = beam_search(log_probs, torch.tensor([2]), 1, backend=backend).labels
    boosted = BeamSearchDecoder(1, hotwords=["ab"], hotword_weight=1.0, charset=charset, backend=backend)(
        log_probs, torch.tensor([2]))
    assert charset.decode(plain[0]) == "b" and charset.decode(boosted.labels[0]) == "ab"


def test_hotwords_from_a_file_and_errors(tmp_path):
    (tmp_path / "hot.txt").write_text("  new  york \n\nab\n", encoding="utf-8")
    assert Hotwords(str(tmp_path / "hot.txt")).entries == ["ab", "new york"]
    with pytest.raises(FileNotFoundError, match="decoder.hotwords=\\[word1,word2\\]"):
        BeamSearchDecoder(hotwords="ab")
    with pytest.raises(ValueError, match="empty"):
        Hotwords([" ", ""])
    with pytest.warns(UserWarning, match="1 of 2 hotwords"):
        Fusion.build(Charset("ab "), hotwords=Hotwords(["ab", "abc"]))


def test_hotwords_add_no_host_sync_per_time_step():
    decoder = BeamSearchDecoder(4, hotwords=["ab", "b a"], charset=Charset("ab "), backend="tensor")

    def run(frames):
        decoder(random_log_probs((frames, 3, 4), seed=frames), torch.tensor([frames, frames - 2, 1]))

    assert value_reads(lambda: run(8)) == value_reads(lambda: run(40))


def test_beam_lm_config_takes_a_word_lm_and_a_hotword_list(word_arpa):
    pytest.importorskip("kenlm")
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    config = OmegaConf.load("conf/decoder/beam_lm.yaml")
    config.word_lm_path, config.word_lm_weight, config.hotwords = word_arpa, 0.8, ["ab", "b a"]
    decoder = instantiate(config)
    assert decoder.word_lm.weight == 0.8 and decoder.hotwords.entries == ["ab", "b a"]
    labels = decoder.bind(Charset("ab "))(random_log_probs((6, 2, 4), seed=1), torch.tensor([6, 4])).labels
    assert len(labels) == 2


# ---------------------------------------------------------------- against pyctcdecode


def test_same_best_text_as_pyctcdecode_with_the_same_word_lm_or_a_better_one(word_arpa):
    """Peaky random log-probs over "ab " (T = 7, 40 lines), beam width 16, no pruning on their side. With
    ``alpha = weight = 1 / ln 10`` both rank by ``log P_ctc + log10 P_word``; their ``unk_score_offset = -10``
    (log10 units, taken raw in their partial-word penalty) equals our ``word_unk_offset = -10 ln 10`` times the
    weight. The texts agree on most lines; where they differ, ours has the higher fused score (brute force over
    every labelling, theirs taken as its best spacing variant: pyctcdecode outputs whitespace-normalised text).

    Why they differ (docs/decoding.md): pyctcdecode merges prefixes that differ only in spaces, and at the end of
    a line it scores an empty last word as ``<unk>`` plus ``unk_score_offset`` when the beam standing for the
    merged text ended in a space. The last frame is made a certain character so that the latter is rarer."""
    kenlm = pytest.importorskip("kenlm")
    pyctcdecode = pytest.importorskip("pyctcdecode")
    model = kenlm.Model(word_arpa)
    charset = Charset("ab ")
    alpha = 1 / math.log(10)
    theirs = pyctcdecode.build_ctcdecoder(["", "a", "b", " "], kenlm_model_path=word_arpa, alpha=alpha, beta=0.0,
                                          unk_score_offset=-10.0)
    ours = BeamSearchDecoder(16, word_lm_path=word_arpa, word_lm_weight=alpha, word_unk_offset=-10 * math.log(10),
                             charset=charset)
    generator = torch.Generator().manual_seed(0)
    num_frames, lines = 7, 40
    peaks = torch.randint(0, 4, (num_frames, lines), generator=generator)
    logits = torch.randn(num_frames, lines, 4, generator=generator, dtype=torch.float64)
    logits.scatter_add_(2, peaks[..., None], torch.full((num_frames, lines, 1), 4.0, dtype=torch.float64))
    logits[-1, :, 3] = -1e4
    log_probs = logits.log_softmax(-1)
    labels = ours(log_probs, torch.full((lines,), num_frames)).labels
    same = 0
    for b in range(lines):
        text = charset.decode(labels[b])
        best = theirs.decode_beams(log_probs[:, b].numpy(), beam_width=16, beam_prune_logp=-math.inf,
                                   token_min_logp=-100.0)[0][0]
        if " ".join(text.split()) == best:
            same += 1
            continue
        totals = {charset.decode(k): v for k, v in bf.labelling_log_probs(log_probs[:, b], 0).items()}
        fused = {t: p + kenlm_words_score(model, t, alpha, -10 * math.log(10), 0.0) for t, p in totals.items()}
        assert fused[text] == pytest.approx(max(fused.values()), abs=1e-6)  # ours: the exact argmax here
        assert fused[text] > max(f for t, f in fused.items() if " ".join(t.split()) == best)
    assert same >= 30
