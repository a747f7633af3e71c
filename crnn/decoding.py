"""CTC decoding of time-major log-probs ``(T, B, C)``: best path (greedy) and batched prefix beam search.

Every decoder returns a :class:`Decoded`: per line the label ids (blank removed, repeats collapsed) as a Python
list, and a log-score. Mapping ids to text is the charset's job. Everything runs in tensors on the log-probs'
device; the beam search loops over time only, extending every prefix of every line by every class at once, or,
with ``token_min_logp`` (the decoder's default), by the classes of each frame that survive pyctcdecode-style
pruning, over the frames that are not near-certain blanks.

The functions (:func:`greedy_decode`, :func:`beam_search`) are what the decoder objects the configs build
(:class:`GreedyDecoder`, :class:`BeamSearchDecoder`, ``conf/decoder/*.yaml``) call; any object with the
:class:`Decoder` call signature can stand in for them.

The beam search optionally fuses priors over the text into its ranking (:class:`Fusion`): a character n-gram
language model (:mod:`crnn.lm`), an insertion bonus per character, a lexicon (:mod:`crnn.lexicon`), a set of
allowed characters, hotwords (:mod:`crnn.hotwords`) and a word n-gram LM through KenLM (:mod:`crnn.word_lm`).
The char LM, the lexicon, the hotwords and the word LM's vocabulary are finite automata over the text written out
as dense tables, so each frame advances every prefix of every line with a few gathers, without host syncs; only
the word LM's scores come from the host, once per frame for the candidates that end a word.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from crnn.hotwords import Hotwords, HotwordTables
from crnn.huge_pages import huge_page_tensor
from crnn.lexicon import Lexicon, LexiconTables
from crnn.lm import LMTables, NgramLM
from crnn.word_lm import WordLM, WordLMTables

__all__ = ["BeamSearchDecoder", "Decoded", "Decoder", "Fusion", "GreedyDecoder", "beam_search", "greedy_decode"]

BACKENDS = ("auto", "tensor", "numba")
_HASH_MOD = 2**31 - 1  # Mersenne prime: also the 31-bit mask of the low half of a packed key
_HASH_BASES = (911_382_323, 972_663_749)


class Decoded(NamedTuple):
    """What a decoder returns for ``B`` lines.

    ``labels``: ``B`` lists of label ids. ``scores``: ``(B,)`` float log-score of each line's labelling, on the
    log-probs' device: the decoder's own measure of it (see each decoder), higher is better.
    """

    labels: list[list[int]]
    scores: Tensor


class Decoder(Protocol):
    """``decoder(log_probs (T, B, C), input_lengths (B,), blank) -> Decoded``."""

    def __call__(self, log_probs: Tensor, input_lengths: Tensor, blank: int = 0) -> Decoded: ...


class GreedyDecoder:
    """Best-path decoding (:func:`greedy_decode`); scores are the best path's log-probability."""

    def __call__(self, log_probs: Tensor, input_lengths: Tensor, blank: int = 0) -> Decoded:
        return greedy_decode(log_probs, input_lengths, blank=blank)

    def __repr__(self) -> str:
        return "GreedyDecoder()"


class BeamSearchDecoder:
    """Prefix beam search (:func:`beam_search`) keeping ``beam_width`` prefixes per frame, optionally with a
    character n-gram LM, an insertion bonus, a lexicon, a set of allowed characters, hotwords and a word n-gram
    LM (see :class:`Fusion`).

    Scores are the returned labelling's CTC log-probability ``log P(text | image)`` summed over its alignments,
    also when the ranking was fused (so a confidence stays a probability of the model).

    Args:
        beam_width: prefixes kept per line after every frame.
        lm_path: an ARPA character n-gram model (``scripts/train_char_lm.py``), or None.
        lm_weight: weight of ``log P_lm(text)`` in the ranking score.
        insertion_bonus: added to the ranking score per output character (counters the LM's preference for
            short texts).
        lexicon_path: a word list, one entry per line, or None.
        lexicon_mode: ``"word"`` (every output word is an entry) or ``"line"`` (the whole output is an entry).
        allow: the characters the output may contain (all classes outside it are masked), or None for all.
        word_lm_path: an ARPA or KenLM binary word n-gram model (needs ``kenlm``), or None.
        word_lm_weight: weight of ``log P_word(text)``: per word, scored when it ends (space, end of line).
        word_unk_offset: added to ``log P_word`` (natural log, before the weight) of a word outside the word LM's
            vocabulary, and while the partial word is no prefix of a vocabulary word.
        word_bonus: added to the ranking score per word the word LM scores.
        word_lm_vocabulary: the word LM's words, a file with one per line (needed for a binary KenLM model;
            default: the ARPA file's unigrams).
        hotwords: words or phrases to boost, a list or a file path (one per line), or None.
        hotword_weight: added per character of a hotword occurrence (see :mod:`crnn.hotwords`).
        charset: the recogniser's :class:`data.Charset`. Needed by every fused prior; may be
            given later with :meth:`bind` (``CRNNModule`` binds its own).
        token_min_logp: per frame, non-blank classes below this log-probability (but the frame's most likely)
            are pruned, and frames left with the blank only are skipped (:func:`beam_search`); the default -5 is
            pyctcdecode's. None: the exact search over every class of every frame.
        backend: ``"auto"`` (numba on CPU without a word LM, else tensor), ``"tensor"`` or ``"numba"``
            (:func:`beam_search`).
    """

    def __init__(self, beam_width: int = 10, lm_path: str | None = None, lm_weight: float = 0.5,
                 insertion_bonus: float = 0.0, lexicon_path: str | None = None, lexicon_mode: str = "word",
                 allow: str | None = None, word_lm_path: str | None = None, word_lm_weight: float = 0.5,
                 word_unk_offset: float = -10.0, word_bonus: float = 0.0, word_lm_vocabulary: str | None = None,
                 hotwords=None, hotword_weight: float = 2.0, charset=None, token_min_logp: float | None = -5.0,
                 backend: str = "auto"):
        if beam_width < 1:
            raise ValueError(f"beam_width must be positive, got {beam_width}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if token_min_logp is not None and not token_min_logp <= 0:
            raise ValueError(f"token_min_logp must be a log-probability (<= 0) or None, got {token_min_logp}")
        if allow is not None and not isinstance(allow, str):  # Hydra reads decoder.allow=0123 as the int 123
            raise TypeError(f"allow must be a string of characters, got {allow!r} (quote it on Hydra's command "
                            "line: 'decoder.allow=\"0123456789\"')")
        self.beam_width, self.backend = beam_width, backend
        self.lm = NgramLM.read_arpa(lm_path) if lm_path else None
        self.lm_weight, self.insertion_bonus = float(lm_weight), float(insertion_bonus)
        self.lexicon = Lexicon.from_file(lexicon_path, lexicon_mode) if lexicon_path else None
        self.allow = allow
        self.token_min_logp = None if token_min_logp is None else float(token_min_logp)
        self.word_lm = WordLM(word_lm_path, word_lm_weight, word_unk_offset, word_bonus, word_lm_vocabulary) \
            if word_lm_path else None
        if hotwords is not None and not isinstance(hotwords, str):  # Hydra's ListConfig, a tuple: the words
            hotwords = list(hotwords)
        self.hotwords = Hotwords(hotwords, hotword_weight) if hotwords else None
        self.fused = any(x is not None for x in (self.lm, self.lexicon, allow, self.word_lm, self.hotwords)) \
            or insertion_bonus != 0
        self.fusion: Fusion | None = None
        if charset is not None:
            self.bind(charset)

    def bind(self, charset) -> BeamSearchDecoder:
        """Compile the LMs, lexicon, allowed characters and hotwords for ``charset`` (a :class:`data.Charset`);
        returns self."""
        if self.fused:
            self.fusion = Fusion.build(charset, self.lm, self.lm_weight, self.insertion_bonus, self.lexicon,
                                       self.allow, self.word_lm, self.hotwords)
        return self

    def __call__(self, log_probs: Tensor, input_lengths: Tensor, blank: int = 0) -> Decoded:
        if self.fused and self.fusion is None:
            raise RuntimeError("BeamSearchDecoder with an LM, lexicon, allow, hotwords or insertion bonus needs the "
                               "charset: pass charset= or call bind(charset)")
        if self.fusion is not None and self.fusion.step.device != log_probs.device:  # move the tables once
            self.fusion = self.fusion.to(log_probs.device, self.fusion.step.dtype)
        return beam_search(log_probs, input_lengths, beam_width=self.beam_width, blank=blank, fusion=self.fusion,
                           token_min_logp=self.token_min_logp, backend=self.backend)

    def __repr__(self) -> str:
        extras = "".join([f", lm={self.lm!r}, lm_weight={self.lm_weight}" if self.lm else "",
                          f", insertion_bonus={self.insertion_bonus}" if self.insertion_bonus else "",
                          f", lexicon={self.lexicon!r}" if self.lexicon else "",
                          f", allow={self.allow!r}" if self.allow is not None else "",
                          f", word_lm={self.word_lm!r}" if self.word_lm else "",
                          f", hotwords={self.hotwords!r}" if self.hotwords else ""])
        backend = f", backend={self.backend!r}" if self.backend != "auto" else ""
        return (f"BeamSearchDecoder(beam_width={self.beam_width}, token_min_logp={self.token_min_logp}{backend}"
                f"{extras})")


class Fusion(NamedTuple):
    """What the beam search adds to the CTC score, for one charset, on one device.

    A prefix ``y`` is ranked by ``log P_ctc(y) + lm_weight * log P_lm(y) + insertion_bonus * |y|`` and must be
    a lexicon prefix; a finished line also adds ``lm_weight * log P_lm(</s> | y)`` and must end in an accepting
    lexicon node. Without an LM the LM tables have one state (the bonus only); without a lexicon the lexicon
    tables have one accepting node that everything leads back to.

    Hotwords (:mod:`crnn.hotwords`) and a word LM (:mod:`crnn.word_lm`) add to that ranking score what they score
    at each word end (the word LM's ``weight * log P(word | history)``, a completed hotword's bonus), plus a
    *potential* of the current partial word (the hotword bonus of a partial match, the word LM's penalty of a
    partial word outside its vocabulary) that is taken back when the word ends: a candidate's prior is the
    parent's, plus the transition's score, plus ``potential(new state) - potential(old state)``.

    ``step``: ``(S, C)`` float ``lm_weight * log P_lm(c | state) + insertion_bonus`` (0 for the blank);
    ``lm_next``: ``(S, C)`` int32, interleaved with ``step`` in memory (:func:`interleaved_lm_tables`);
    ``lm_end``: ``(S,)`` float ``lm_weight * log P_lm(</s> | state)``; ``lexicon``:
    :class:`crnn.lexicon.LexiconTables`; ``class_mask``: ``(C,)`` float, 0 for allowed classes (and the blank),
    ``-inf`` for the others, added to the log-probs; ``word_lm``: the vocabulary trie
    (:class:`crnn.word_lm.WordLMTables`) and ``word_scorer`` the host-side :class:`crnn.word_lm.WordLM`, or None;
    ``hotwords``: :class:`crnn.hotwords.HotwordTables`, or None.
    """

    step: Tensor
    lm_next: Tensor
    lm_end: Tensor
    lm_start: int
    lexicon: LexiconTables
    class_mask: Tensor
    word_lm: WordLMTables | None = None
    word_scorer: WordLM | None = None
    hotwords: HotwordTables | None = None

    @classmethod
    def build(cls, charset, lm: NgramLM | None = None, lm_weight: float = 0.5, insertion_bonus: float = 0.0,
              lexicon: Lexicon | None = None, allow: str | None = None, word_lm: WordLM | None = None,
              hotwords: Hotwords | None = None) -> Fusion:
        """Compile the priors for ``charset`` (a :class:`data.Charset`); an ``allow`` character outside it is an
        error."""
        num_classes = charset.num_classes
        class_chars = [None if c == charset.blank else charset.decode([c]) for c in range(num_classes)]
        not_blank = torch.tensor([char is not None for char in class_chars])
        if lm is not None:
            tables = lm.tables(class_chars)
        else:
            tables = LMTables(torch.zeros(1, num_classes), torch.zeros(1, num_classes, dtype=torch.int32),
                              torch.zeros(1), 0)
        step, lm_next = interleaved_lm_tables(lm_weight * tables.log_probs + insertion_bonus * not_blank,
                                              tables.next_state)
        if lexicon is not None:
            lexicon_tables = lexicon.tables(class_chars)
        else:
            lexicon_tables = LexiconTables(torch.zeros(1, num_classes, dtype=torch.int32), torch.ones(1, dtype=bool),
                                           0, -1)
        class_mask = torch.zeros(num_classes)
        if allow is not None:
            outside = sorted(set(allow) - set(charset.characters))
            if outside:
                raise ValueError(f"allow: characters {''.join(outside)!r} are not in the model's charset")
            class_mask = torch.where(not_blank & ~torch.tensor([char is not None and char in allow for char in class_chars]),
                                     float("-inf"), 0.0)
        return cls(step, lm_next, lm_weight * tables.end, tables.start, lexicon_tables, class_mask,
                   word_lm.tables(class_chars) if word_lm is not None else None, word_lm,
                   hotwords.tables(class_chars) if hotwords is not None else None)

    def to(self, device: torch.device, dtype: torch.dtype) -> Fusion:
        lexicon = LexiconTables(self.lexicon.next_state.to(device), self.lexicon.accepting.to(device),
                                self.lexicon.start, self.lexicon.sink)
        word_lm, hotwords = self.word_lm, self.hotwords
        if word_lm is not None:
            word_lm = word_lm._replace(continues=word_lm.continues.to(device), edge_key=word_lm.edge_key.to(device),
                                       edge_child=word_lm.edge_child.to(device), word_id=word_lm.word_id.to(device))
        if hotwords is not None:
            hotwords = hotwords._replace(next_state=hotwords.next_state.to(device),
                                         potential=hotwords.potential.to(device, dtype),
                                         commit=hotwords.commit.to(device, dtype))
        return Fusion(self.step.to(device, dtype), self.lm_next.to(device), self.lm_end.to(device, dtype),
                      self.lm_start, lexicon, self.class_mask.to(device, dtype), word_lm, self.word_scorer, hotwords)


def interleaved_lm_tables(step: Tensor, next_state: Tensor) -> tuple[Tensor, Tensor]:
    """``step`` ``(S, C)`` float32 and ``next_state`` ``(S, C)`` int32 as two views of one ``(S, C, 2)`` buffer, so
    that a (state, class)'s score and next state share a cache line (other dtypes: unchanged).

    The compiled search (:mod:`crnn.line_search`) reads the score of every candidate and then the next state of
    each it keeps; on a large LM these reads are mostly cache misses, and the interleaved layout made it 20-30 %
    faster on the word-line LM of ``docs/decoding.md`` (455 k states x 61 classes). Same memory as two tables.
    """
    if step.dtype != torch.float32 or next_state.dtype != torch.int32:
        return step, next_state
    packed = torch.stack([step.view(torch.int32), next_state], dim=-1, out=huge_page_tensor((*step.shape, 2)))
    return packed.view(torch.float32)[..., 0], packed[..., 1]


def greedy_decode(log_probs: Tensor, input_lengths: Tensor, blank: int = 0) -> Decoded:
    """Best-path decoding: most likely class per frame, repeats collapsed, blanks dropped.

    Args:
        log_probs: ``(T, B, C)`` float log-probabilities (any monotone scores give the same labels).
        input_lengths: ``(B,)`` int64 number of valid frames per line; later frames are ignored.
        blank: index of the CTC blank class.

    Returns:
        :class:`Decoded`: ``B`` lists of label ids, and ``(B,)`` the log-probability of the best path,
        ``sum_t max_c log_probs[t, b, c]`` over the line's valid frames (float32 for half inputs), a lower bound
        of the labelling's log-probability (which sums over all of its alignments).
    """
    num_frames = log_probs.shape[0]
    peak, best = log_probs.max(-1)  # (T, B) each
    frames = torch.arange(num_frames, device=best.device)[:, None]
    after_end = frames >= input_lengths.to(best.device)  # (T, B)
    scores = peak.masked_fill(after_end, 0.0).sum(0, dtype=torch.promote_types(peak.dtype, torch.float32))
    best = best.masked_fill(after_end, blank).T  # (B, T)
    previous = F.pad(best[:, :-1], (1, 0), value=blank)
    return Decoded(_compact(best, (best != blank) & (best != previous)), scores)


class _Beams(NamedTuple):
    """``K`` prefixes per line, each field ``(B, K)``.

    A prefix is identified by ``key``, a rolling hash of its labels (two 31-bit residues packed into
    int64); ``parent_key`` is the key of the prefix without its last label. Slots with
    ``total = -inf`` are dead and may duplicate a live prefix. The fields from ``prior`` on are None
    without a :class:`Fusion`; the last three also without its word LM or hotwords.
    """

    p_blank: Tensor  # float log P(prefix, path ends in blank)
    p_label: Tensor  # float log P(prefix, path ends in its last label)
    total: Tensor  # float log P(prefix): logaddexp(p_blank, p_label)
    last: Tensor  # int64 last label, -1 for the empty prefix
    key: Tensor  # int64 hash of the labels
    parent_key: Tensor  # int64 hash of the labels but the last
    prior: Tensor | None = None  # float lm_weight * log P_lm(prefix) + insertion_bonus * |prefix| + ...
    lm_state: Tensor | None = None  # int64 LM state after the prefix
    lexicon_state: Tensor | None = None  # int64 lexicon node after the prefix
    word_state: Tensor | None = None  # int64 word LM state id (WordLM.states) after the prefix's finished words
    word_node: Tensor | None = None  # int64 vocabulary trie node of the prefix's partial word
    hotword_state: Tensor | None = None  # int64 hotword automaton state after the prefix

    def widen(self, width: int) -> _Beams:
        """The beams with dead slots added up to ``width``."""
        pad = width - self.last.shape[1]
        if pad == 0:
            return self
        dead = {"p_blank": float("-inf"), "p_label": float("-inf"), "total": float("-inf"), "last": -1}  # else 0
        return _Beams(*(None if field is None else F.pad(field, (0, pad), value=dead.get(name, 0))
                        for name, field in zip(self._fields, self)))

    def split(self, rows: int) -> tuple[_Beams, _Beams]:
        """The first ``rows`` lines, and the others."""
        return (_Beams(*(None if field is None else field[:rows] for field in self)),
                _Beams(*(None if field is None else field[rows:] for field in self)))


def beam_search(log_probs: Tensor, input_lengths: Tensor, beam_width: int = 10, blank: int = 0,
                fusion: Fusion | None = None, token_min_logp: float | None = None,
                backend: str = "auto") -> Decoded:
    """CTC prefix beam search (Hannun et al., 2014), optionally fused with an LM, a lexicon and allowed classes.

    Each prefix carries the probability of all paths collapsing to it, split by whether the path
    ends in blank or in the prefix's last label; extensions that reproduce a prefix already in the
    beam are merged into it, so the beam never holds a labelling twice. Among equal scores the
    candidate with the lower (beam slot, class) index wins, so results are deterministic. Prefix
    identity uses a 62-bit hash: two different labellings in one line colliding has probability
    about ``2**-62`` per comparison.

    Each frame, every prefix is extended by every *candidate* class of its line's frame (:class:`_Candidates`):
    all ``C`` classes in the exact search, the classes that survive the pruning with ``token_min_logp``. The
    ``(M, K)`` work of a frame, for ``M`` (line, candidate class) pairs and width ``K``, is a few dozen tensor
    ops; then one top-k per line.

    With a ``fusion`` the candidates are ranked by ``log P_ctc + lm_weight * log P_lm + insertion_bonus * |y|``
    (the final choice also with the LM's end of line), extensions the lexicon does not allow are dropped, and
    classes outside ``allow`` get probability 0; the CTC probabilities the beam carries are unchanged by it. Per
    frame this adds a few ``(M, K)`` gathers of the LM and lexicon tables and ``(B, K)`` gathers of the next
    states; still no host sync.

    Args:
        log_probs: ``(T, B, C)`` float log-probabilities, ``C`` including the blank. Half
            precision is upcast to float32.
        input_lengths: ``(B,)`` int64 number of valid frames per line; later frames are ignored.
        beam_width: number of prefixes kept per line after every frame.
        blank: index of the CTC blank class, anywhere in ``[0, C)``.
        fusion: priors over the text (:class:`Fusion`, built for this ``C`` and ``blank``), or None.
        token_min_logp: None searches every class of every frame. A number prunes (see :func:`_prune_frames`):
            a non-blank class below it on a frame, unless it is the frame's most likely class, gets probability
            0 there, frames left with the blank only are skipped, and each frame's extensions are only by the
            classes that remain. The result is the exact search's on those pruned log-probs (up to the order
            among exactly tied candidates), so scores sum over the paths through the kept classes only.
        backend: ``"tensor"``: the batched search in tensor ops described here, on the log-probs' device;
            ``"numba"``: the same search compiled, one line at a time (:mod:`crnn.line_search`), on the CPU
            only and without a word LM: the same labels, scores equal to float rounding, several times faster
            on a CPU; ``"auto"``: numba for CPU log-probs without a word LM, else the tensor search.

    Returns:
        :class:`Decoded`: the best labelling of each line as a list of label ids, and ``(B,)`` float
        log-probabilities of those labellings summed over all their paths (exact whenever no path of the
        labelling was pruned, e.g. for a beam as wide as all prefixes). With a lexicon that no surviving
        prefix satisfies a line gets the empty labelling and ``-inf``: in ``line`` mode, and in ``word`` mode
        when a narrow beam keeps only prefixes that end inside a word.
    """
    if beam_width < 1:
        raise ValueError(f"beam_width must be positive, got {beam_width}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    with_word_lm = fusion is not None and fusion.word_lm is not None
    if backend == "numba" and (log_probs.device.type != "cpu" or with_word_lm):
        raise ValueError("backend='numba' runs on the CPU without a word LM: "
                         + (f"log_probs are on {log_probs.device}" if log_probs.device.type != "cpu"
                            else "this fusion has a word LM") + "; use backend='tensor' or 'auto'")
    compiled = backend == "numba" or (backend == "auto" and log_probs.device.type == "cpu" and not with_word_lm)
    with torch.inference_mode():  # no autograd bookkeeping per op: 10-15% less time on CPU, where ops are small
        labels, scores = _search(log_probs, input_lengths, beam_width, blank, fusion, token_min_logp, compiled)
    return Decoded(labels, scores.clone())  # a normal tensor (an inference tensor refuses later in-place updates)


def _search(log_probs: Tensor, input_lengths: Tensor, beam_width: int, blank: int, fusion: Fusion | None,
            token_min_logp: float | None, compiled: bool) -> Decoded:
    """:func:`beam_search`'s search, its arguments checked; ``compiled``: by :mod:`crnn.line_search`."""
    if log_probs.dtype not in (torch.float32, torch.float64):
        log_probs = log_probs.float()
    num_frames, batch, num_classes = log_probs.shape
    if fusion is not None:
        fusion = fusion.to(log_probs.device, log_probs.dtype)
        log_probs = log_probs + fusion.class_mask
    if compiled:
        from crnn.line_search import beam_search_lines  # numba: imported (and compiled) on first use

        labels, scores = beam_search_lines(log_probs, input_lengths.cpu(), beam_width, blank, fusion, token_min_logp)
        return Decoded(labels, torch.from_numpy(scores))
    log_probs = _blank_after_end(log_probs, input_lengths.to(log_probs.device), blank)
    beams = _initial_beams(batch, log_probs, fusion)
    history = []
    if token_min_logp is None:
        every_class = _Candidates.every_class(batch, num_classes, blank, log_probs.device)
        for t in range(num_frames):
            candidates = every_class._replace(log_probs=log_probs[t].reshape(-1, 1))
            beams, parent, label = _step(beams, log_probs[t], blank, candidates, beam_width, fusion)
            history.append((parent, label))
    else:
        frames = _prune_frames(log_probs, blank, token_min_logp)
        beams = _search_pruned(beams, frames, blank, beam_width, fusion, history)
    ranking = beams.total if fusion is None else beams.total + _final_prior(beams, fusion)
    best = ranking.argmax(1)  # the first of equal maxima: slots are ranked, ties in (slot, class) order
    scores = beams.total.gather(1, best[:, None])[:, 0]
    path = _backtrack(history, best, blank)
    keep = path != blank
    if fusion is not None:  # no allowed text survived: the empty labelling, probability 0
        found = ranking.gather(1, best[:, None]) > float("-inf")
        keep &= found
        scores = torch.where(found[:, 0], scores, float("-inf"))
    if token_min_logp is not None:  # back to the input's line order
        unsort = torch.empty_like(frames.lines).scatter_(0, frames.lines, torch.arange(batch, device=path.device))
        path, keep = path[unsort], keep[unsort]
        scores = scores[unsort] + frames.skipped_log_prob
    return Decoded(_compact(path, keep), scores)


def _blank_after_end(log_probs: Tensor, input_lengths: Tensor, blank: int) -> Tensor:
    """Make frames ``t >= input_lengths[b]`` certain blanks (log-prob 0, others ``-inf``).

    A certain blank keeps every prefix and its total probability, so a finished line's beam is
    unchanged apart from moving all its mass into the ends-in-blank part. ``(T, B, C)`` in and out.
    """
    num_frames, _, num_classes = log_probs.shape
    after_end = torch.arange(num_frames, device=log_probs.device)[:, None] >= input_lengths
    certain_blank = torch.full((num_classes,), float("-inf"), dtype=log_probs.dtype, device=log_probs.device)
    certain_blank[blank] = 0.0
    return torch.where(after_end[..., None], certain_blank, log_probs)


class _Candidates(NamedTuple):
    """One frame's candidate extensions: ``M`` (line, class) pairs, ordered by line, then class.

    Every line's pairs include its blank, whose pair stands for the prefix unchanged. ``line``: ``(M,)`` int64;
    ``classes``: ``(M, 1)`` int64; ``log_probs``: ``(M, 1)`` float the class's log-prob on the line's frame;
    ``column``: ``(M, 1)`` int64 the pair's place among its line's pairs; ``pair_of``: ``(B, 1 + C)`` int32 at
    ``1 + c`` the pair of each line's class ``c``, ``-1`` where it is no candidate (and at 0), or None where every
    line has every class (``pair = line * C + class``);
    ``first``, ``blank_pair``: ``(B, 1)`` int64 each line's first pair and its blank's pair; ``after_blank``:
    ``(B, 1)`` bool, skipped certain blanks came before this frame (pruned search), or None; ``width`` and
    ``fewest``: the most and the fewest pairs of a line.
    """

    line: Tensor
    classes: Tensor
    log_probs: Tensor | None
    column: Tensor
    pair_of: Tensor | None
    first: Tensor
    blank_pair: Tensor
    after_blank: Tensor | None
    width: int
    fewest: int

    @classmethod
    def every_class(cls, batch: int, num_classes: int, blank: int, device: torch.device) -> _Candidates:
        """All ``C`` classes of all ``B`` lines, without the log-probs (the exact search's candidates)."""
        classes = torch.arange(num_classes, device=device).repeat(batch)[:, None]
        first = torch.arange(batch, device=device)[:, None] * num_classes
        return cls(torch.arange(batch, device=device).repeat_interleave(num_classes), classes, None, classes, None,
                   first, first + blank, None, num_classes, num_classes)

    def find(self, labels: Tensor) -> Tensor:
        """``(B, K)`` int64 the pair of each line's class ``labels`` ``(B, K)``, ``-1`` where it is no candidate
        (or negative)."""
        if self.pair_of is None:
            return torch.where(labels >= 0, self.first + labels, -1)
        return self.pair_of.gather(1, labels + 1).to(torch.int64)


class _PrunedFrames(NamedTuple):
    """The frames a pruned search visits (:func:`_prune_frames`): ``T'`` steps, lines reordered.

    ``lines``: ``(B,)`` int64 the input line in each row, the lines with more kept frames first.
    ``log_probs``: ``(T', B, C)`` each row's kept frames in order, pruned classes at ``-inf``, then anything
    (never read). ``pairs``: ``(3, P)`` int64 the candidate pairs of all steps (``line``, ``classes`` and
    ``column`` of :class:`_Candidates`), step after step, and ``pair_log_probs`` ``(P,)``; ``pair_of``:
    ``(T', B, 1 + C)`` int32, ``first``, ``blank_pair``, ``after_blank``: ``(T', B)``, per step, pairs counted from
    the step's first.
    ``num_pairs``, ``widths``, ``fewest`` and ``num_lines``: ``T'`` Python ints, per step the pairs, the most
    and the fewest pairs of a running row, and the rows with a kept frame left (the first ones).
    ``skipped_log_prob``: ``(B,)`` in input order, the skipped frames' blank log-probs summed.
    """

    lines: Tensor
    log_probs: Tensor
    pairs: Tensor
    pair_log_probs: Tensor
    pair_of: Tensor
    first: Tensor
    blank_pair: Tensor
    after_blank: Tensor
    num_pairs: list[int]
    widths: list[int]
    fewest: list[int]
    num_lines: list[int]
    skipped_log_prob: Tensor

    def steps(self) -> Iterator[tuple[Tensor, _Candidates]]:
        """Per step, the running rows' ``(rows, C)`` log-probs and the step's :class:`_Candidates` (all steps'
        views are cut at once: slicing them step by step was about an eighth of a step's ~160 tensor ops)."""
        split = self.pair_log_probs[:, None], self.pairs[0], self.pairs[1, :, None], self.pairs[2, :, None]
        per_pair = zip(*(part.split(self.num_pairs) for part in split))
        per_row = zip(*(part.unbind() for part in (self.log_probs, self.pair_of, self.first[..., None],
                                                   self.blank_pair[..., None], self.after_blank[..., None])))
        for rows, width, fewest, (log_probs, line, classes, column), row_parts in zip(
                self.num_lines, self.widths, self.fewest, per_pair, per_row):
            frame, pair_of, first, blank_pair, after_blank = (part[:rows] for part in row_parts)
            yield frame, _Candidates(line, classes, log_probs, column, pair_of, first, blank_pair, after_blank,
                                     width, fewest)


def _prune_frames(log_probs: Tensor, blank: int, token_min_logp: float) -> _PrunedFrames:
    """Prune classes below ``token_min_logp``, skip the frames that leave only the blank, and compact the rest.

    A non-blank class below ``token_min_logp`` on a frame, unless it is that frame's most likely class, is set
    to ``-inf`` (the blank is never pruned). A frame whose non-blank classes are then all ``-inf`` is a certain
    blank up to its probability: every prefix stays, with all its mass in the ends-in-blank part, scaled by the
    frame's blank probability. A second one right after it only scales again, by the same factor for every
    prefix of the line, which changes no ranking. So such frames are skipped, each run of them leaving a flag on
    the next kept frame (:func:`_step` applies it) and its log-probs in ``skipped_log_prob``. The
    search on the kept frames is the search on the pruned log-probs of all frames. Frames after a line's end
    (certain blanks with log-prob 0, :func:`_blank_after_end`) are skipped alike, and so are the certain blanks
    after a line's last kept frame: they change no total.

    The rows are sorted by their number of kept frames, so that the lines still running at a step are the first
    ``num_lines[t]``, each row's kept frames gathered to the front, and the candidate pairs of every step listed,
    all at once (no loop over lines). The one host sync reads the step, pair and line counts.

    Args:
        log_probs: ``(T, B, C)`` float log-probabilities, frames after each line's end certain blanks.
        blank: index of the blank class.
        token_min_logp: log-probability below which a class is pruned.
    """
    num_frames, batch, num_classes = log_probs.shape
    device = log_probs.device
    is_blank = torch.arange(num_classes, device=device) == blank
    kept = (log_probs >= token_min_logp) | is_blank
    kept.scatter_(2, log_probs.argmax(2, keepdim=True), True)
    log_probs = log_probs.masked_fill(~kept, float("-inf"))
    candidate = (log_probs > float("-inf")) | is_blank  # (T, B, C)
    num_candidates = candidate.sum(2)  # (T, B)
    certain_blank = num_candidates == 1
    skipped_log_prob = torch.where(certain_blank, log_probs[..., blank], 0.0).sum(0)
    after_blank = F.pad(certain_blank[:-1], (0, 0, 1, 0), value=False)

    # Row r holds line lines[r]; its t-th kept frame is frame frames[t, r]. Entries past a row's kept frames
    # (padding) have no candidates: step t runs on the rows with a kept frame t only, the first num_lines[t].
    num_kept, lines = (~certain_blank).sum(0).sort(descending=True, stable=True)  # (B,)
    frames = torch.sort(certain_blank[:, lines].T.to(torch.uint8), dim=1, stable=True).indices.T  # (T, B)
    running = torch.arange(num_frames, device=device)[:, None] < num_kept  # (T, B)
    num_candidates = num_candidates[:, lines].gather(0, frames) * running
    most = num_candidates.amax(1) if batch else num_candidates.new_zeros(num_frames)
    fewest = num_candidates.masked_fill(~running, num_classes).amin(1) if batch else most
    counts = torch.cat([running.sum(1), most, fewest, num_candidates.sum(1)]).tolist()  # the one host sync
    num_lines = [rows for rows in counts[:num_frames] if rows]
    num_steps = len(num_lines)
    widths, fewest, num_pairs = (counts[k * num_frames : k * num_frames + num_steps] for k in (1, 2, 3))

    rows = (frames[:num_steps] * batch + lines).view(-1)  # into (T * B, C)
    log_probs = log_probs.reshape(-1, num_classes).index_select(0, rows).view(num_steps, batch, num_classes)
    candidate = candidate.reshape(-1, num_classes).index_select(0, rows).view(num_steps, batch, num_classes)
    candidate &= running[:num_steps, :, None]
    after_blank = after_blank[:, lines].gather(0, frames[:num_steps])

    # The pairs in (step, row, class) order; pair numbers count from each step's first pair.
    step, row, classes = torch.nonzero_static(candidate, size=sum(num_pairs)).unbind(1)
    num_candidates = num_candidates[:num_steps]
    ends = num_candidates.view(-1).cumsum(0).view(num_steps, batch)
    step_start = F.pad(ends[:-1, -1], (1, 0)) if num_steps else ends.new_zeros(0)  # (T',)
    first = ends - num_candidates - step_start[:, None]  # (T', B)
    column = torch.arange(step.shape[0], device=device) - step_start[step] - first[step, row]
    blank_pair = first + candidate[..., :blank].sum(2)
    pair_of = torch.full((num_steps, batch, 1 + num_classes), -1, dtype=torch.int32, device=device)
    pair_of.view(-1).index_copy_(0, (step * batch + row) * (1 + num_classes) + 1 + classes,
                                 (first[step, row] + column).int())
    pair_log_probs = log_probs.view(-1).take((step * batch + row) * num_classes + classes)
    return _PrunedFrames(lines, log_probs, torch.stack([row, classes, column]), pair_log_probs, pair_of, first,
                         blank_pair, after_blank, num_pairs, widths, fewest, num_lines, skipped_log_prob)


def _search_pruned(beams: _Beams, frames: _PrunedFrames, blank: int, beam_width: int, fusion: Fusion | None,
                   history: list[tuple[Tensor, Tensor]]) -> _Beams:
    """Run the search over ``frames`` (:func:`_prune_frames`), the beams' rows in ``frames.lines`` order.

    At step ``t`` only the first ``num_lines[t]`` rows have a frame left; the others are set aside, final.
    Appends each step's ``(parent, label)`` ``(num_lines[t], K_t)`` to ``history``; returns all rows' beams, as
    wide as the widest (dead slots added).
    """
    done = []
    for log_probs, candidates in frames.steps():
        rows = log_probs.shape[0]
        if rows < beams.last.shape[0]:
            beams, finished = beams.split(rows)
            done.append(finished)
        beams, parent, label = _step(beams, log_probs, blank, candidates, beam_width, fusion)
        history.append((parent, label))
    done.append(beams)
    width = beams.last.shape[1]
    return _Beams(*(None if parts[0] is None else torch.cat(parts[::-1])
                    for parts in zip(*(part.widen(width) for part in done))))


def _initial_beams(batch: int, like: Tensor, fusion: Fusion | None = None) -> _Beams:
    """One slot per line, holding the empty prefix with probability one (the search widens the beams up to
    ``beam_width`` as the prefixes multiply)."""
    p_blank = like.new_zeros(batch, 1)
    zeros = torch.zeros(batch, 1, dtype=torch.int64, device=like.device)
    beams = _Beams(p_blank, torch.full_like(p_blank, float("-inf")), p_blank, zeros - 1, zeros, zeros)
    if fusion is None:
        return beams
    beams = beams._replace(prior=like.new_zeros(batch, 1), lm_state=zeros + fusion.lm_start,
                           lexicon_state=zeros + fusion.lexicon.start)
    if fusion.word_lm is not None:
        beams = beams._replace(word_state=zeros, word_node=zeros + fusion.word_lm.root)
    if fusion.hotwords is not None:
        beams = beams._replace(hotword_state=zeros + fusion.hotwords.root)
    return beams


def _final_prior(beams: _Beams, fusion: Fusion) -> Tensor:
    """``(B, K)`` what the fusion adds to a finished prefix: its prior, the LM's end of line, the word LM's last
    word and end of line, the hotword ending the line (potentials taken back), and ``-inf`` where the lexicon
    does not accept it. With a word LM: one host sync."""
    accepted = fusion.lexicon.accepting[beams.lexicon_state]
    prior = beams.prior + fusion.lm_end[beams.lm_state]
    if fusion.word_lm is not None:
        tables, node = fusion.word_lm, beams.word_node
        prior = prior - tables.potential(node, prior.dtype) + fusion.word_scorer.score_ends(
            beams.word_state, tables.word_id[node], node != tables.root).to(prior.dtype)
    if fusion.hotwords is not None:
        state = beams.hotword_state
        prior = prior + fusion.hotwords.commit[state] - fusion.hotwords.potential[state]
    return torch.where(accepted, prior, float("-inf"))


def _step(beams: _Beams, log_probs: Tensor, blank: int, candidates: _Candidates, beam_width: int,
          fusion: Fusion | None = None) -> tuple[_Beams, Tensor, Tensor]:
    """Advance every beam by one frame, keeping ``beam_width`` prefixes, or all candidates while they are fewer.

    The candidates of a line are laid out ``(M, K)``: row ``m`` (line ``b``, class ``c``), column ``k`` is the
    extension ``p + c`` of the prefix ``p`` in slot ``k`` of line ``b``, except at the blank's pair, which stands
    for ``p`` unchanged.

    Args:
        beams: current ``W`` prefixes per line.
        log_probs: ``(B, C)`` float log-probabilities of this frame.
        blank: index of the blank class.
        candidates: this frame's :class:`_Candidates`. Where skipped certain blanks came before the frame
            (``after_blank``), all mass of the line's prefixes first moves into their ends-in-blank part.
        fusion: priors to rank by and the lexicon to obey, or None. With a word LM: one host sync (the word
            LM's scores of the candidates that end a word).

    Returns:
        ``(beams, parent, label)``: the new top-K prefixes, ``K = min(beam_width, W * candidates.width)``, and
        ``(B, K)`` int64 the slot each came from and the label it appended (``blank`` if it is its parent
        unchanged).
    """
    width = beams.last.shape[1]
    total, p_blank, p_label = beams.total, beams.p_blank, beams.p_label
    if candidates.after_blank is not None:
        after_blank = candidates.after_blank
        p_blank, p_label = torch.where(after_blank, total, p_blank), p_label.masked_fill(after_blank, float("-inf"))
    last_log_prob = log_probs.gather(1, beams.last.clamp(min=0))  # the empty prefix's p_label is -inf anyway

    # Prefix p unchanged: the frame is a blank, or a repeat of p's last label.
    stay_blank = total + log_probs[:, blank, None]
    stay_label = p_label + last_log_prob

    # Prefix p + c ends in c; a repeat of p's last label must follow a blank. Flat index: pair * K + slot.
    extend = total.index_select(0, candidates.line) + candidates.log_probs  # (M, K)
    flat = extend.view(-1)
    slots = torch.arange(width, device=total.device)
    last_pair = candidates.find(beams.last)  # (B, K)
    own_stay = candidates.blank_pair * width + slots  # (B, K) each slot's entry of the blank pair: overwritten below
    repeat = torch.where(last_pair >= 0, last_pair * width + slots, own_stay)
    flat.scatter_(0, repeat.view(-1), (p_blank + last_log_prob).view(-1))
    if fusion is not None and fusion.lexicon.sink >= 0:  # extensions that leave the lexicon are impossible
        lexicon_next = _pair_states(fusion.lexicon.next_state, beams.lexicon_state, candidates)
        extend.masked_fill_(lexicon_next == fusion.lexicon.sink, float("-inf"))
    stay_label = torch.logaddexp(stay_label, _merge_duplicates(beams, flat, last_pair, own_stay))

    # The blank pairs become the prefixes unchanged: scores is extend, with them written in.
    stay_total = torch.logaddexp(stay_blank, stay_label)
    scores = extend.index_copy_(0, candidates.blank_pair[:, 0], stay_total)
    if fusion is not None:
        prior, words_after = _pair_prior(beams, fusion, candidates)
        ranking = scores + prior
    else:
        ranking = scores
    keep = min(beam_width, width * candidates.width)
    padded = keep > width * candidates.fewest  # lines with fewer candidates than slots: the rest are dead
    pair, parent = _top_k_pairs(ranking, keep, candidates, padded)
    if padded:
        dead = pair < 0
        pair = torch.where(dead, candidates.blank_pair, pair)
    chosen = pair * width + parent  # into the flat (M, K)
    label = candidates.classes.take(pair)
    extended = label != blank
    new_total = flat.take(chosen)
    p_blank = stay_blank.gather(1, parent).masked_fill_(extended, float("-inf"))
    p_label = torch.where(extended, new_total, stay_label.gather(1, parent))
    if padded:
        new_total, p_blank, p_label = (x.masked_fill_(dead, float("-inf")) for x in (new_total, p_blank, p_label))
    parent_key = beams.key.gather(1, parent)
    new_beams = _Beams(
        p_blank=p_blank,
        p_label=p_label,
        total=new_total,
        last=torch.where(extended, label, beams.last.gather(1, parent)),
        key=torch.where(extended, _extend_hash(parent_key, label), parent_key),
        parent_key=torch.where(extended, parent_key, beams.parent_key.gather(1, parent)),
    )
    if fusion is not None:
        new_beams = _advance_fusion(new_beams._replace(prior=prior.take(chosen)), beams, fusion, parent, label,
                                    words_after)
    return new_beams, parent, label


def _pair_states(table: Tensor, state: Tensor, candidates: _Candidates) -> Tensor:
    """``(M, K)`` ``table[state[b, k], c]`` for every candidate pair (line ``b``, class ``c``) and slot ``k``;
    ``table`` ``(S, C)``, ``state`` ``(B, K)``."""
    return table.take((state * table.shape[1]).index_select(0, candidates.line) + candidates.classes)


def _pair_prior(beams: _Beams, fusion: Fusion, candidates: _Candidates) -> tuple[Tensor, Tensor | None]:
    """The prior of every candidate, ``(M, K)`` by pair and slot (the blank pair: the prefix unchanged, prior
    unchanged), and with a word LM ``(B, K)`` int64 the word LM state id after the slot's partial word (where it
    ends a word), else None. The word LM's and hotwords' terms are computed for all ``C`` classes, then the
    candidates' taken."""
    prior = beams.prior.index_select(0, candidates.line) + _pair_states(fusion.step, beams.lm_state, candidates)
    words_after, change = None, None
    if fusion.word_lm is not None:
        tables, node = fusion.word_lm, beams.word_node
        potential = tables.potential(node, prior.dtype)
        change = (~tables.continues[node]).to(prior.dtype) * tables.penalty - potential[..., None]
        change[..., tables.blank] = 0.0
        if tables.space >= 0:  # the space ends a non-empty partial word: the host scores the word
            ends_word = (node != tables.root) & (beams.total > float("-inf"))
            value, words_after = fusion.word_scorer.score_words(beams.word_state, tables.word_id[node], ends_word)
            change[..., tables.space] = value.to(prior.dtype) - potential
    if fusion.hotwords is not None:
        tables, state = fusion.hotwords, beams.hotword_state
        boost = tables.potential[tables.next_state[state]] - tables.potential[state][..., None]
        if tables.space >= 0:  # a word end after a hotword earns it
            boost[..., tables.space] += tables.commit[state]
        change = boost if change is None else change + boost
    if change is not None:  # (B, K, C) -> (M, K)
        batch, width, num_classes = change.shape
        slots = torch.arange(width, device=prior.device)
        prior = prior + change.view(-1).take((candidates.line[:, None] * width + slots) * num_classes
                                             + candidates.classes)
    return prior, words_after


def _advance_fusion(new_beams: _Beams, beams: _Beams, fusion: Fusion, parent: Tensor, label: Tensor,
                    words_after: Tensor | None) -> _Beams:
    """``new_beams`` with the automata states of the chosen candidates: the parent slot's states advanced by the
    appended label (``(B, K)`` ``parent``, ``label``). The blank columns of the tables keep the state, so stays
    need no special case."""
    lexicon_state = beams.lexicon_state.gather(1, parent)
    if fusion.lexicon.sink >= 0:  # without a lexicon its one node stays
        lexicon_state = _next_state(fusion.lexicon.next_state, lexicon_state, label)
    new_beams = new_beams._replace(lm_state=_next_state(fusion.lm_next, beams.lm_state.gather(1, parent), label),
                                   lexicon_state=lexicon_state)
    if fusion.word_lm is not None:
        tables = fusion.word_lm
        node, state = beams.word_node.gather(1, parent), beams.word_state.gather(1, parent)
        if words_after is not None:
            ends_word = (label == tables.space) & (node != tables.root)
            state = torch.where(ends_word, words_after.gather(1, parent), state)
        new_beams = new_beams._replace(word_state=state, word_node=tables.next_node(node, label))
    if fusion.hotwords is not None:
        new_beams = new_beams._replace(
            hotword_state=fusion.hotwords.next_state[beams.hotword_state.gather(1, parent), label])
    return new_beams


def _next_state(table: Tensor, state: Tensor, label: Tensor) -> Tensor:
    """``table[state, label]`` for an int32 ``(S, C)`` ``table`` and int64 ``state``, ``label`` of one shape, as one
    flat take; int64, so that ``state * C`` cannot overflow in the next lookup."""
    return table.take(state * table.shape[1] + label).long()


def _merge_duplicates(beams: _Beams, extend: Tensor, last_pair: Tensor, own_stay: Tensor) -> Tensor:
    """Take the extensions ``p + c`` that equal a live prefix ``q`` of the beam out of ``extend``.

    Live prefixes are distinct, so each live ``q`` has at most one live parent ``p`` in the beam,
    found by ``key(p) == parent_key(q)``; its extension by ``last(q)`` is set to ``-inf`` in place.

    Args:
        beams: current prefixes.
        extend: ``(M * K,)`` float ends-in-label log-probs of the extensions, flat by ``pair * K + slot``.
        last_pair: ``(B, K)`` int64 the candidate pair of each prefix's last label, ``-1`` for the empty prefix
            and for a last label that is no candidate (its extension is ``-inf``).
        own_stay: ``(B, K)`` int64 each slot's own entry of its line's blank pair (overwritten by the caller).

    Returns:
        ``(B, K)`` float log-prob each prefix receives from its parent's extension (``-inf`` if none).
    """
    width = beams.total.shape[1]
    alive = beams.total > float("-inf")
    # Look every parent key up among the live keys, sorted (keys are >= 0, dead slots -1): O(K log K), not K^2.
    live_keys, slot_of = torch.where(alive, beams.key, -1).sort(1)
    found = torch.searchsorted(live_keys, beams.parent_key).clamp_(max=width - 1)
    has_parent = (live_keys.gather(1, found) == beams.parent_key) & alive & (last_pair >= 0)
    twin = torch.where(has_parent, last_pair * width + slot_of.gather(1, found), own_stay).view(-1)  # (B * Kq,)
    incoming = extend.take(twin).masked_fill_(~has_parent.view(-1), float("-inf"))
    extend.index_fill_(0, twin, float("-inf"))  # own stays are overwritten by the caller
    return incoming.view_as(has_parent)


def _top_k_pairs(ranking: Tensor, k: int, candidates: _Candidates, padded: bool) -> tuple[Tensor, Tensor]:
    """Each line's ``k`` largest entries of ``ranking`` ``(M, W)`` (by candidate pair and slot), largest first,
    ties to the lower (slot, class): ``(B, k)`` int64 their pairs and slots. ``padded``: ``k`` may exceed a line's
    ``W * n`` entries; the pairs past them are ``-1``.

    The entries are written into a ``(B, W * N)`` table, each line's at ``slot * N + column``, as int64 keys that
    order like the scores and, among equal ones, reversed like the positions, so one :func:`torch.topk` (float32)
    or stable sort (float64) per line picks them; the table's padding holds the smallest int64, below every key.
    A float's bits, read as a signed integer, with the magnitude bits of negative numbers flipped, order like the
    float (``-0.0`` just below ``0.0``). A float32 key carries its position in its low 32 bits.
    """
    width, columns = ranking.shape[1], candidates.width
    span = width * columns
    position = candidates.column + torch.arange(width, device=ranking.device) * columns  # (M, K)
    if ranking.dtype == torch.float32:
        bits = ranking.view(torch.int32)
        keys = ((bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(torch.int64) << 32) | (span - 1 - position)
    else:
        bits = ranking.to(torch.float64).view(torch.int64)
        keys = bits ^ ((bits >> 63) & 0x7FFFFFFFFFFFFFFF)
    table = keys.new_full((candidates.first.shape[0] * span,), torch.iinfo(torch.int64).min)
    table.index_copy_(0, (candidates.line[:, None] * span + position).view(-1), keys.view(-1))
    table = table.view(-1, span)
    if ranking.dtype == torch.float32:
        top = table.topk(k, dim=1).values
        position = span - 1 - (top & 0xFFFFFFFF)
    else:
        top, position = table.sort(dim=1, descending=True, stable=True)
        top, position = top[:, :k], position[:, :k]
    slot = position // columns
    pair = candidates.first + position - slot * columns
    return (pair.masked_fill_(top == torch.iinfo(torch.int64).min, -1) if padded else pair), slot


def _extend_hash(key: Tensor, label: Tensor) -> Tensor:
    """Key of a prefix extended by ``label``: two polynomial hashes mod ``2**31 - 1``, packed.

    ``key`` and ``label`` are int64 of one shape; every product stays below ``2**62``.
    """
    high = (key >> 31) * _HASH_BASES[0] + label + 1
    low = (key & _HASH_MOD) * _HASH_BASES[1] + label + 1
    return (high % _HASH_MOD) << 31 | (low % _HASH_MOD)


def _backtrack(history: list[tuple[Tensor, Tensor]], slot: Tensor, blank: int) -> Tensor:
    """Labels appended along the way to ``slot`` ``(B,)``, as ``(B, T)`` int64 with ``blank`` for stays.

    ``history`` holds per frame the ``(parent, label)`` ``(B', K)`` returned by :func:`_step` for the first
    ``B' <= B`` rows; the others stay in their slot that frame.
    """
    path = slot.new_full((slot.shape[0], len(history)), blank)
    slot = slot[:, None].clone()
    for t in range(len(history) - 1, -1, -1):
        parent, label = history[t]
        rows = label.shape[0]
        path[:rows, t] = label.gather(1, slot[:rows])[:, 0]
        slot[:rows] = parent.gather(1, slot[:rows])
    return path


def _compact(labels: Tensor, keep: Tensor) -> list[list[int]]:
    """Per row of ``labels`` ``(B, L)`` int64, the entries where ``keep`` ``(B, L)`` bool, in order."""
    kept_first = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices
    rows = torch.cat([keep.sum(1, keepdim=True), labels.gather(1, kept_first)], dim=1).tolist()
    return [row[1 : 1 + row[0]] for row in rows]
