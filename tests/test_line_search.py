"""The beam search's two backends agree: the batched tensor search and the numba search one line at a time
(``crnn/line_search.py``). Both are also checked, each on its own, by every search test of test_decoding.py."""

import itertools
import math
import pickle
import subprocess
import sys

import pytest
import torch

from crnn.decoding import BeamSearchDecoder, Fusion, beam_search, interleaved_lm_tables
from crnn.hotwords import Hotwords
from crnn.huge_pages import huge_page_tensor
from crnn.lexicon import Lexicon
from crnn.lm import witten_bell
from data import Charset


def assert_backends_agree(log_probs, lengths, beam_width, blank=0, fusion=None, token_min_logp=None):
    tensor = beam_search(log_probs, lengths, beam_width, blank, fusion, token_min_logp, backend="tensor")
    compiled = beam_search(log_probs, lengths, beam_width, blank, fusion, token_min_logp, backend="numba")
    assert compiled.labels == tensor.labels
    assert compiled.scores.dtype == tensor.scores.dtype
    torch.testing.assert_close(compiled.scores, tensor.scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("beam_width", "token_min_logp"), [(1, None), (4, -5.0), (10, -5.0), (10, None), (50, -3.0),
                                                            (50, -5.0)])
@pytest.mark.parametrize("scale", [1.0, 6.0])
def test_same_labels_and_scores_on_random_batches(dtype, beam_width, token_min_logp, scale):
    """Diffuse (scale 1) and peaky (scale 6, many skipped frames) lines of different lengths, blank first or
    inside the classes."""
    generator = torch.Generator().manual_seed(beam_width + int(scale))
    for blank, (frames, lines, classes) in [(0, (30, 24, 12)), (5, (17, 9, 7))]:
        log_probs = (torch.randn(frames, lines, classes, generator=generator, dtype=dtype) * scale).log_softmax(-1)
        lengths = torch.randint(0, frames + 3, (lines,), generator=generator)  # some empty, some past T
        assert_backends_agree(log_probs, lengths, beam_width, blank, token_min_logp=token_min_logp)


@pytest.mark.parametrize("backend", ["tensor", "numba"])
@pytest.mark.parametrize("blank", [0, 39])
def test_wide_exact_ties_go_to_the_lowest_class(backend, blank):
    """One uniform frame over 40 classes: 40 candidates tie exactly (sums without rounding), more than a small
    sort keeps in order by chance. Each backend keeps the lowest classes and answers the lowest: the empty text
    for blank 0, else class 0. (Ties that come out of ``logaddexp`` sums can round differently in the two, or
    in one tensor op's vectorised and scalar lanes, so they are not compared across backends.)"""
    log_probs = torch.full((1, 2, 40), -math.log(40))
    decoded = beam_search(log_probs, torch.tensor([1, 1]), 20, blank, backend=backend)
    assert decoded.labels == ([[], []] if blank == 0 else [[0], [0]])


TOY_CORPUS = ["ab a", "ba", "aab", "b ab", "a", "bb a b"]


@pytest.mark.parametrize(("lexicon", "allow", "hotwords"), [
    (None, None, None), (Lexicon(["a", "ab", "ba"], "word"), None, None),
    (Lexicon(["ab a", "b", "aab", "bab"], "line"), None, None), (None, "a ", None), (None, None, ["ab", "b a"]),
    (Lexicon(["a", "ab", "bab", "ba"], "word"), "ab ", ["ba"])])
@pytest.mark.parametrize(("beam_width", "token_min_logp"), [(3, None), (8, -4.0), (40, -6.0)])
def test_same_labels_and_scores_with_a_fusion(lexicon, allow, hotwords, beam_width, token_min_logp):
    for blank, lm_weight, bonus in [(0, 0.8, 0.3), (2, 2.0, -0.5)]:
        charset = Charset("ab ", blank=blank)
        fusion = Fusion.build(charset, witten_bell(TOY_CORPUS, order=3), lm_weight, bonus, lexicon, allow,
                              hotwords=None if hotwords is None else Hotwords(hotwords, 1.5))
        generator = torch.Generator().manual_seed(beam_width + blank)
        log_probs = (torch.randn(9, 20, 4, generator=generator) * 2.5).log_softmax(-1)
        lengths = torch.randint(0, 10, (20,), generator=generator)
        assert_backends_agree(log_probs, lengths, beam_width, blank, fusion, token_min_logp)


def test_auto_picks_numba_on_the_cpu_and_both_refuse_what_they_cannot_do(monkeypatch):
    import crnn.line_search

    calls = []
    original = crnn.line_search.beam_search_lines
    monkeypatch.setattr(crnn.line_search, "beam_search_lines", lambda *args: calls.append(1) or original(*args))
    log_probs = torch.randn(5, 2, 4).log_softmax(-1)
    beam_search(log_probs, torch.tensor([5, 3]), 3)
    BeamSearchDecoder(3)(log_probs, torch.tensor([5, 3]))
    beam_search(log_probs, torch.tensor([5, 3]), 3, backend="tensor")
    assert len(calls) == 2
    with pytest.raises(ValueError, match="backend must be one of auto, tensor, numba, got 'c'"):
        beam_search(log_probs, torch.tensor([5, 3]), 3, backend="c")
    with pytest.raises(ValueError, match="backend must be one of"):
        BeamSearchDecoder(3, backend="gpu")
    with pytest.raises(ValueError, match="backend='numba' runs on the CPU .* log_probs are on meta"):
        beam_search(log_probs.to("meta"), torch.tensor([5, 3]), 3, backend="numba")


def test_numba_refuses_a_word_lm(tmp_path):
    pytest.importorskip("kenlm")
    path = tmp_path / "words.arpa"
    witten_bell(["ab ba", "ba"], 2, str.split).write_arpa(path)
    decoder = BeamSearchDecoder(3, word_lm_path=str(path), charset=Charset("ab "), backend="numba")
    with pytest.raises(ValueError, match="without a word LM: this fusion has a word LM"):
        decoder(torch.randn(4, 1, 4).log_softmax(-1), torch.tensor([4]))


def test_exhaustive_agreement_on_every_peaky_two_line_pattern():
    """Every labelling pattern of 4 frames over 3 classes, as peaky lines: identical labels, all in one batch."""
    patterns = list(itertools.product(range(3), repeat=4))
    probs = torch.full((4, len(patterns), 3), 0.05)
    for b, pattern in enumerate(patterns):
        probs[torch.arange(4), b, torch.tensor(pattern)] = 0.9
    log_probs = probs.log()
    for beam_width, token_min_logp in [(1, None), (2, -2.0), (9, None), (9, -math.inf)]:
        assert_backends_agree(log_probs, torch.full((len(patterns),), 4), beam_width, token_min_logp=token_min_logp)


def test_compiles_without_a_disk_cache_where_numba_has_nowhere_to_write_one():
    """A read-only install without a writable home: numba's cache has no locator, and the search compiles per
    process instead of failing to import (a fresh interpreter, so that the module is compiled anew)."""
    script = """
import numba.core.caching, torch
numba.core.caching.CacheImpl._locator_classes = []  # as where no cache directory is writable
from crnn.decoding import beam_search
log_probs = torch.randn(6, 3, 5, generator=torch.Generator().manual_seed(0)).log_softmax(-1)
compiled = beam_search(log_probs, torch.tensor([6, 4, 0]), 4, backend="numba")
assert compiled.labels == beam_search(log_probs, torch.tensor([6, 4, 0]), 4, backend="tensor").labels
print(compiled.labels)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_fusion_interleaves_the_lm_scores_and_next_states():
    """A (state, class)'s score and next state lie side by side (one cache line for the compiled search's two
    reads), with the values of the separate tables."""
    charset = Charset("ab ")
    lm = witten_bell(TOY_CORPUS, order=3)
    fusion = Fusion.build(charset, lm, 0.7, 0.2)
    tables = lm.tables([None, "a", "b", " "])
    assert fusion.lm_next.untyped_storage().data_ptr() == fusion.step.untyped_storage().data_ptr()
    assert fusion.lm_next.data_ptr() - fusion.step.data_ptr() == 4 and fusion.step.stride() == (8, 2)
    torch.testing.assert_close(fusion.step, 0.7 * tables.log_probs + 0.2 * (torch.arange(4) != 0), rtol=0, atol=0)
    assert torch.equal(fusion.lm_next, tables.next_state)
    step64, next64 = interleaved_lm_tables(fusion.step.double(), fusion.lm_next)  # other dtypes: as they are
    assert step64.is_contiguous() and next64 is fusion.lm_next


@pytest.mark.parametrize("shape", [(3, 5), (1024, 1024, 2)])  # below and above 2 MB
def test_huge_page_tensors_are_ordinary_writable_tensors(shape):
    table = huge_page_tensor(shape).fill_(7)
    assert table.shape == shape and table.dtype == torch.int32 and table.is_contiguous()
    table.view(-1)[-1] = 3
    assert table.sum().item() == 7 * math.prod(shape) - 4
    assert torch.equal(pickle.loads(pickle.dumps(table)), table)


def test_lines_shared_out_to_threads_decode_as_in_one(monkeypatch):
    """With torch's thread count above 1, parts of the batch run in threads (the search releases the GIL); their
    results come back in line order."""
    import crnn.line_search

    generator = torch.Generator().manual_seed(3)
    log_probs = (torch.randn(15, 70, 6, generator=generator) * 3).log_softmax(-1)
    lengths = torch.randint(0, 16, (70,), generator=generator)
    alone = beam_search(log_probs, lengths, 6, token_min_logp=-4.0, backend="numba")
    parts = []
    search_lines = crnn.line_search.search_lines
    monkeypatch.setattr(crnn.line_search, "search_lines", lambda lines, *rest: parts.append(len(lines)) or
                        search_lines(lines, *rest))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    monkeypatch.setattr(crnn.line_search, "MIN_LINES_PER_THREAD", 16)
    shared = beam_search(log_probs, lengths, 6, token_min_logp=-4.0, backend="numba")
    assert sorted(parts) == [23, 23, 24]
    assert shared.labels == alone.labels and torch.equal(shared.scores, alone.scores)
