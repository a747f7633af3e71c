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

from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from crnn.hotwords import Hotwords, HotwordTables
from crnn.lexicon import Lexicon, LexiconTables
from crnn.lm import LMTables, NgramLM
from crnn.word_lm import WordLM, WordLMTables

__all__ = ["BeamSearchDecoder", "Decoded", "Decoder", "Fusion", "GreedyDecoder", "beam_search", "greedy_decode"]

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
    """

    def __init__(self, beam_width: int = 10, lm_path: str | None = None, lm_weight: float = 0.5,
                 insertion_bonus: float = 0.0, lexicon_path: str | None = None, lexicon_mode: str = "word",
                 allow: str | None = None, word_lm_path: str | None = None, word_lm_weight: float = 0.5,
                 word_unk_offset: float = -10.0, word_bonus: float = 0.0, word_lm_vocabulary: str | None = None,
                 hotwords=None, hotword_weight: float = 2.0, charset=None, token_min_logp: float | None = -5.0):
        if beam_width < 1:
            raise ValueError(f"beam_width must be positive, got {beam_width}")
        if token_min_logp is not None and not token_min_logp <= 0:
            raise ValueError(f"token_min_logp must be a log-probability (<= 0) or None, got {token_min_logp}")
        if allow is not None and not isinstance(allow, str):  # Hydra reads decoder.allow=0123 as the int 123
            raise TypeError(f"allow must be a string of characters, got {allow!r} (quote it on Hydra's command "
                            "line: 'decoder.allow=\"0123456789\"')")
        self.beam_width = beam_width
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
                           token_min_logp=self.token_min_logp)

    def __repr__(self) -> str:
        extras = "".join([f", lm={self.lm!r}, lm_weight={self.lm_weight}" if self.lm else "",
                          f", insertion_bonus={self.insertion_bonus}" if self.insertion_bonus else "",
                          f", lexicon={self.lexicon!r}" if self.lexicon else "",
                          f", allow={self.allow!r}" if self.allow is not None else "",
                          f", word_lm={self.word_lm!r}" if self.word_lm else "",
                          f", hotwords={self.hotwords!r}" if self.hotwords else ""])
        return f"BeamSearchDecoder(beam_width={self.beam_width}, token_min_logp={self.token_min_logp}{extras})"


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
    ``lm_next``: ``(S, C)`` int64; ``lm_end``: ``(S,)`` float ``lm_weight * log P_lm(</s> | state)``;
    ``lexicon``: :class:`crnn.lexicon.LexiconTables`; ``class_mask``: ``(C,)`` float, 0 for allowed classes
    (and the blank), ``-inf`` for the others, added to the log-probs; ``word_lm``: the vocabulary trie
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
            tables = LMTables(torch.zeros(1, num_classes), torch.zeros(1, num_classes, dtype=torch.int64),
                              torch.zeros(1), 0)
        step = lm_weight * tables.log_probs + insertion_bonus * not_blank
        if lexicon is not None:
            lexicon_tables = lexicon.tables(class_chars)
        else:
            lexicon_tables = LexiconTables(torch.zeros(1, num_classes, dtype=torch.int64), torch.ones(1, dtype=bool),
                                           0, -1)
        class_mask = torch.zeros(num_classes)
        if allow is not None:
            outside = sorted(set(allow) - set(charset.characters))
            if outside:
                raise ValueError(f"allow: characters {''.join(outside)!r} are not in the model's charset")
            class_mask = torch.where(not_blank & ~torch.tensor([char is not None and char in allow for char in class_chars]),
                                     float("-inf"), 0.0)
        return cls(step, tables.next_state, lm_weight * tables.end, tables.start, lexicon_tables, class_mask,
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
    ``p_blank = p_label = -inf`` are dead and may duplicate a live prefix. The fields from ``prior`` on are None
    without a :class:`Fusion`; the last three also without its word LM or hotwords.
    """

    p_blank: Tensor  # float log P(prefix, path ends in blank)
    p_label: Tensor  # float log P(prefix, path ends in its last label)
    last: Tensor  # int64 last label, -1 for the empty prefix
    key: Tensor  # int64 hash of the labels
    parent_key: Tensor  # int64 hash of the labels but the last
    prior: Tensor | None = None  # float lm_weight * log P_lm(prefix) + insertion_bonus * |prefix| + ...
    lm_state: Tensor | None = None  # int64 LM state after the prefix
    lexicon_state: Tensor | None = None  # int64 lexicon node after the prefix
    word_state: Tensor | None = None  # int64 word LM state id (WordLM.states) after the prefix's finished words
    word_node: Tensor | None = None  # int64 vocabulary trie node of the prefix's partial word
    hotword_state: Tensor | None = None  # int64 hotword automaton state after the prefix


def beam_search(log_probs: Tensor, input_lengths: Tensor, beam_width: int = 10, blank: int = 0,
                fusion: Fusion | None = None, token_min_logp: float | None = None) -> Decoded:
    """CTC prefix beam search (Hannun et al., 2014), optionally fused with an LM, a lexicon and allowed classes.

    Each prefix carries the probability of all paths collapsing to it, split by whether the path
    ends in blank or in the prefix's last label; extensions that reproduce a prefix already in the
    beam are merged into it, so the beam never holds a labelling twice. Among equal scores the
    candidate with the lower (beam slot, class) index wins, so results are deterministic. Prefix
    identity uses a 62-bit hash: two different labellings in one line colliding has probability
    about ``2**-62`` per comparison.

    With a ``fusion`` the candidates are ranked by ``log P_ctc + lm_weight * log P_lm + insertion_bonus * |y|``
    (the final choice also with the LM's end of line), extensions the lexicon does not allow are dropped, and
    classes outside ``allow`` get probability 0; the CTC probabilities the beam carries are unchanged by it. Per
    frame this adds, for ``B`` lines, width ``K`` and ``C`` classes, one ``(B, K, C)`` gather of the LM table
    and one of the lexicon table (the same order as the search's own ``(B, K, C)`` work) and ``(B, K)``
    gathers of the next states; still no host sync.

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
            classes that remain. The result is the exact search's on those pruned log-probs (apart from the order
            among tied candidates), so scores sum over the paths through the kept classes only.

    Returns:
        :class:`Decoded`: the best labelling of each line as a list of label ids, and ``(B,)`` float
        log-probabilities of those labellings summed over all their paths (exact whenever no path of the
        labelling was pruned, e.g. for a beam as wide as all prefixes). With a lexicon that no surviving
        prefix satisfies a line gets the empty labelling and ``-inf``: in ``line`` mode, and in ``word`` mode
        when a narrow beam keeps only prefixes that end inside a word.
    """
    if beam_width < 1:
        raise ValueError(f"beam_width must be positive, got {beam_width}")
    if log_probs.dtype in (torch.float16, torch.bfloat16):
        log_probs = log_probs.float()
    num_frames, batch, _ = log_probs.shape
    if fusion is not None:
        fusion = fusion.to(log_probs.device, log_probs.dtype)
        log_probs = log_probs + fusion.class_mask
    log_probs = _blank_after_end(log_probs, input_lengths.to(log_probs.device), blank)
    beams = _initial_beams(batch, beam_width, log_probs, fusion)
    history = []
    if token_min_logp is None:
        for t in range(num_frames):
            beams, parent, label = _step(beams, log_probs[t], blank, fusion)
            history.append((parent, label))
    else:
        frames = _prune_frames(log_probs, blank, token_min_logp)
        beams = _search_pruned(beams, frames, blank, fusion, history)
    totals = torch.logaddexp(beams.p_blank, beams.p_label)
    ranking = totals if fusion is None else totals + _final_prior(beams, fusion)
    best = ranking.argmax(1)  # the first of equal maxima, like the tie rule in _top_k_first
    scores = totals.gather(1, best[:, None])[:, 0]
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
    """One frame's candidate classes in a pruned search, ``N`` per line (see :func:`_prune_frames`).

    ``classes``: ``(B, N)`` int64, first the line's candidates (the blank and the classes that survived the
    pruning) in ascending order, then other classes; ``lookup``: the same with those others replaced by ``C``,
    so each row is sorted; ``log_probs``: ``(B, N)`` float the classes' log-probs (``-inf`` for the others);
    ``blank_column``: ``(B, 1)`` int64 the blank's column; ``after_blank``: ``(B, 1)`` bool, a skipped certain
    blank came before this frame.
    """

    classes: Tensor
    lookup: Tensor
    log_probs: Tensor
    blank_column: Tensor
    after_blank: Tensor

    def rows(self, rows: int, columns: int) -> _Candidates:
        """The first ``rows`` lines and ``columns`` candidates."""
        return _Candidates(self.classes[:rows, :columns], self.lookup[:rows, :columns].contiguous(),  # searchsorted
                           self.log_probs[:rows, :columns], self.blank_column[:rows], self.after_blank[:rows])


class _PrunedFrames(NamedTuple):
    """The frames a pruned search visits (:func:`_prune_frames`): ``T'`` steps, lines reordered.

    ``lines``: ``(B,)`` int64 the input line in each row, the lines with more kept frames first.
    ``log_probs``: ``(T', B, C)`` each row's kept frames in order, pruned classes at ``-inf``, then anything
    (never read). ``candidates``: :class:`_Candidates` of every step, each field with a leading ``T'``.
    ``num_candidates`` and ``num_lines``: ``T'`` Python ints, per step the most candidates of a row, and the
    rows with a kept frame left (the first ones). ``skipped_log_prob``: ``(B,)`` in input order, the skipped
    frames' blank log-probs summed.
    """

    lines: Tensor
    log_probs: Tensor
    candidates: _Candidates
    num_candidates: list[int]
    num_lines: list[int]
    skipped_log_prob: Tensor


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
    ``num_lines[t]``, and each row's kept frames gathered to the front, all at once (no loop over lines). The one
    host sync reads the step, candidate and line counts.

    Args:
        log_probs: ``(T, B, C)`` float log-probabilities, frames after each line's end certain blanks.
        blank: index of the blank class.
        token_min_logp: log-probability below which a class is pruned.
    """
    num_frames, batch, num_classes = log_probs.shape
    is_blank = torch.arange(num_classes, device=log_probs.device) == blank
    kept = (log_probs >= token_min_logp) | is_blank
    kept.scatter_(2, log_probs.argmax(2, keepdim=True), True)
    log_probs = log_probs.masked_fill(~kept, float("-inf"))
    candidate = (log_probs > float("-inf")) | is_blank  # (T, B, C)
    num_candidates = candidate.sum(2)  # (T, B)
    certain_blank = num_candidates == 1
    skipped_log_prob = torch.where(certain_blank, log_probs[..., blank], 0.0).sum(0)
    after_blank = F.pad(certain_blank[:-1], (0, 0, 1, 0), value=False)

    # Row r holds line lines[r]; its t-th kept frame is frame frames[t, r]. Entries past a row's kept frames
    # (padding) are never read: step t runs on the rows with a kept frame t only, the first num_lines[t].
    num_kept, lines = (~certain_blank).sum(0).sort(descending=True, stable=True)  # (B,)
    frames = torch.sort(certain_blank[:, lines].T.to(torch.uint8), dim=1, stable=True).indices.T  # (T, B)
    padding = torch.arange(num_frames, device=log_probs.device)[:, None] >= num_kept  # (T, B)
    num_candidates = num_candidates[:, lines].gather(0, frames).masked_fill(padding, 1)
    most = num_candidates.amax(1) if batch else num_candidates.new_zeros(num_frames)
    counts = torch.cat([(~padding).sum(1), most]).tolist()  # the one host sync
    num_lines = [rows for rows in counts[:num_frames] if rows]
    num_steps = len(num_lines)
    num_candidates = counts[num_frames : num_frames + num_steps]

    rows = (frames[:num_steps] * batch + lines).view(-1)  # into (T * B, C)
    log_probs = log_probs.reshape(-1, num_classes).index_select(0, rows).view(num_steps, batch, num_classes)
    candidate = candidate.reshape(-1, num_classes).index_select(0, rows).view(num_steps, batch, num_classes)
    after_blank = after_blank[:, lines].gather(0, frames[:num_steps])
    # Candidates first, each group in ascending class order: the exact search's tie rule among candidates.
    rank = torch.arange(num_classes, 0, -1, device=log_probs.device)
    rank, classes = torch.where(candidate, rank, -rank).topk(max(num_candidates, default=1), dim=2)
    lookup = classes.masked_fill(rank < 0, num_classes)
    candidates = _Candidates(classes, lookup, log_probs.gather(2, classes), (lookup < blank).sum(2, keepdim=True),
                             after_blank[..., None])
    return _PrunedFrames(lines, log_probs, candidates, num_candidates, num_lines, skipped_log_prob)


def _search_pruned(beams: _Beams, frames: _PrunedFrames, blank: int, fusion: Fusion | None,
                   history: list[tuple[Tensor, Tensor]]) -> _Beams:
    """Run the search over ``frames`` (:func:`_prune_frames`), the beams' rows in ``frames.lines`` order.

    At step ``t`` only the first ``num_lines[t]`` rows have a frame left; the others are set aside, final.
    Appends each step's ``(parent, label)`` ``(num_lines[t], K)`` to ``history``; returns all rows' beams.
    """
    done = []
    for t, (num_candidates, rows) in enumerate(zip(frames.num_candidates, frames.num_lines)):
        if rows < beams.last.shape[0]:
            done.append(_Beams(*(None if field is None else field[rows:] for field in beams)))
            beams = _Beams(*(None if field is None else field[:rows] for field in beams))
        candidates = _Candidates(*(field[t] for field in frames.candidates)).rows(rows, num_candidates)
        beams, parent, label = _step(beams, frames.log_probs[t, :rows], blank, fusion, candidates)
        history.append((parent, label))
    done.append(beams)
    return _Beams(*(None if parts[0] is None else torch.cat(parts[::-1]) for parts in zip(*done)))


def _initial_beams(batch: int, width: int, like: Tensor, fusion: Fusion | None = None) -> _Beams:
    """Slot 0 holds the empty prefix with probability one; the other slots are dead."""
    p_blank = like.new_full((batch, width), float("-inf"))
    p_blank[:, 0] = 0.0
    zeros = torch.zeros(batch, width, dtype=torch.int64, device=like.device)
    beams = _Beams(p_blank, torch.full_like(p_blank, float("-inf")), zeros - 1, zeros, zeros)
    if fusion is None:
        return beams
    beams = beams._replace(prior=like.new_zeros(batch, width), lm_state=zeros + fusion.lm_start,
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


def _step(beams: _Beams, log_probs: Tensor, blank: int, fusion: Fusion | None = None,
          candidates: _Candidates | None = None) -> tuple[_Beams, Tensor, Tensor]:
    """Advance every beam by one frame.

    Candidates are indexed flat as ``slot * N + j``: column ``j`` of a slot holding prefix ``p`` is the
    extension ``p + c`` by the ``j``-th candidate class ``c``, except the blank's column, which stands for ``p``
    unchanged. Without ``candidates`` every class is a candidate (``N = C``, ``c = j``).

    Args:
        beams: current ``K`` prefixes per line.
        log_probs: ``(B, C)`` float log-probabilities of this frame.
        blank: index of the blank class.
        fusion: priors to rank by and the lexicon to obey, or None. With a word LM: one host sync (the word
            LM's scores of the candidates that end a word).
        candidates: each line's candidate classes of a pruned search (:class:`_Candidates`), or None for all
            ``C``. Where skipped certain blanks came before the frame (``candidates.after_blank``), all mass of
            the line's prefixes first moves into their ends-in-blank part.

    Returns:
        ``(beams, parent, label)``: the new top-K prefixes, and ``(B, K)`` int64 the slot each came
        from and the label it appended (``blank`` if it is its parent unchanged).
    """
    batch, width = beams.last.shape
    total = torch.logaddexp(beams.p_blank, beams.p_label)  # (B, K)
    p_blank, p_label = beams.p_blank, beams.p_label
    if candidates is not None:
        after_blank = candidates.after_blank
        p_blank, p_label = torch.where(after_blank, total, p_blank), p_label.masked_fill(after_blank, float("-inf"))
    has_last = beams.last >= 0
    last = torch.where(has_last, beams.last, blank)  # the empty prefix points at its own blank column
    last_log_prob = log_probs.gather(1, last)

    # Prefix p unchanged: the frame is a blank, or a repeat of p's last label (the empty prefix's p_label is -inf).
    stay_blank = total + log_probs[:, blank, None]
    stay_label = p_label + last_log_prob

    # Prefix p + c ends in c; a repeat of p's last label must follow a blank.
    if candidates is None:
        classes, num_candidates = None, log_probs.shape[1]
        extend = total[..., None] + log_probs[:, None, :]  # (B, K, C)
        extend.scatter_(2, last[..., None], (p_blank + last_log_prob)[..., None])
        last_column, stay_column = beams.last, blank
    else:
        classes, stay_column = candidates.classes, candidates.blank_column
        num_candidates = classes.shape[1]
        extend = total[..., None] + candidates.log_probs[:, None, :]  # (B, K, N)
        last_column = torch.searchsorted(candidates.lookup, last).clamp_(max=num_candidates - 1)
        listed = candidates.lookup.gather(1, last_column) == last  # else the repeat was pruned
        extend.scatter_(2, torch.where(listed, last_column, stay_column)[..., None],  # the stay column: overwritten
                        (p_blank + last_log_prob)[..., None])
        last_column = last_column.masked_fill(~(listed & has_last), -1)
    if fusion is not None and fusion.lexicon.sink >= 0:  # extensions that leave the lexicon are impossible
        lexicon_next = _candidate_columns(fusion.lexicon.next_state, beams.lexicon_state, classes)  # (B, K, N)
        extend.masked_fill_(lexicon_next == fusion.lexicon.sink, float("-inf"))
    extend = extend.view(batch, width * num_candidates)
    stay_label = torch.logaddexp(stay_label, _merge_duplicates(beams, total, extend, last_column, stay_column))

    # The stay columns become the prefixes unchanged: scores is extend, with them written in.
    stay_total = torch.logaddexp(stay_blank, stay_label)
    scores = extend.view(batch, width, num_candidates)
    if classes is None:
        scores[:, :, blank] = stay_total
    else:
        scores.scatter_(2, stay_column[:, None, :].expand(-1, width, -1), stay_total[..., None])
    scores = extend
    if fusion is not None:  # the blank columns of the step table are 0
        candidate_prior, words_after = _candidate_prior(beams, total, fusion, classes)
        candidate_prior = candidate_prior.view(batch, width * num_candidates)
        ranking = scores + candidate_prior
    else:
        ranking = scores
    chosen = _top_k_first(ranking, width) if candidates is None else _top_k_ranked(ranking, width)
    parent = chosen // num_candidates
    label = chosen - parent * num_candidates
    if classes is not None:
        label = classes.gather(1, label)
    extended = label != blank
    parent_key = beams.key.gather(1, parent)
    new_beams = _Beams(
        p_blank=stay_blank.gather(1, parent).masked_fill(extended, float("-inf")),
        p_label=torch.where(extended, scores.gather(1, chosen), stay_label.gather(1, parent)),
        last=torch.where(extended, label, beams.last.gather(1, parent)),
        key=torch.where(extended, _extend_hash(parent_key, label), parent_key),
        parent_key=torch.where(extended, parent_key, beams.parent_key.gather(1, parent)),
    )
    if fusion is not None:
        new_beams = _advance_fusion(new_beams._replace(prior=candidate_prior.gather(1, chosen)), beams, fusion,
                                    parent, label, words_after)
    return new_beams, parent, label


def _candidate_prior(beams: _Beams, total: Tensor, fusion: Fusion, classes: Tensor | None
                     ) -> tuple[Tensor, Tensor | None]:
    """The prior of every candidate, ``(B, K, N)`` by slot and candidate column (all ``C`` classes without
    ``classes`` ``(B, N)``; the blank column: the prefix unchanged, prior unchanged), and with a word LM ``(B, K)``
    int64 the word LM state id after the slot's partial word (where it ends a word), else None. ``total``:
    ``(B, K)`` the slots' CTC log-probs (``-inf``: dead). The word LM's and hotwords' terms are computed for all
    ``C`` classes, then the candidates' columns taken."""
    prior = beams.prior[..., None] + _candidate_columns(fusion.step, beams.lm_state, classes)
    words_after, change = None, None
    if fusion.word_lm is not None:
        tables, node = fusion.word_lm, beams.word_node
        potential = tables.potential(node, prior.dtype)
        change = (~tables.continues[node]).to(prior.dtype) * tables.penalty - potential[..., None]
        change[..., tables.blank] = 0.0
        if tables.space >= 0:  # the space ends a non-empty partial word: the host scores the word
            ends_word = (node != tables.root) & (total > float("-inf"))
            value, words_after = fusion.word_scorer.score_words(beams.word_state, tables.word_id[node], ends_word)
            change[..., tables.space] = value.to(prior.dtype) - potential
    if fusion.hotwords is not None:
        tables, state = fusion.hotwords, beams.hotword_state
        boost = tables.potential[tables.next_state[state]] - tables.potential[state][..., None]
        if tables.space >= 0:  # a word end after a hotword earns it
            boost[..., tables.space] += tables.commit[state]
        change = boost if change is None else change + boost
    if change is not None:
        prior = prior + (change if classes is None else change.gather(2, classes[:, None, :].expand_as(prior)))
    return prior, words_after


def _advance_fusion(new_beams: _Beams, beams: _Beams, fusion: Fusion, parent: Tensor, label: Tensor,
                    words_after: Tensor | None) -> _Beams:
    """``new_beams`` with the automata states of the chosen candidates: the parent slot's states advanced by the
    appended label (``(B, K)`` ``parent``, ``label``). The blank columns of the tables keep the state, so stays
    need no special case."""
    new_beams = new_beams._replace(
        lm_state=_next_state(fusion.lm_next, beams.lm_state.gather(1, parent), label),
        lexicon_state=_next_state(fusion.lexicon.next_state, beams.lexicon_state.gather(1, parent), label),
    )
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
    """``table[state, label]`` for ``(S, C)`` ``table`` and ``state``, ``label`` of one shape, as one flat take."""
    return table.take(state * table.shape[1] + label)


def _candidate_columns(table: Tensor, state: Tensor, classes: Tensor | None) -> Tensor:
    """``(B, K, N)`` the candidate classes' columns of ``table`` ``(S, C)`` at each prefix's ``state``
    ``(B, K)``: all ``C`` columns without ``classes``, else those of ``classes`` ``(B, N)``."""
    rows = table.index_select(0, state.view(-1)).view(*state.shape, table.shape[1])
    if classes is None:
        return rows
    return rows.gather(2, classes[:, None, :].expand(-1, state.shape[1], -1))


def _merge_duplicates(beams: _Beams, total: Tensor, extend: Tensor, last_column: Tensor,
                      stay_column: Tensor | int) -> Tensor:
    """Take the extensions ``p + c`` that equal a live prefix ``q`` of the beam out of ``extend``.

    Live prefixes are distinct, so each live ``q`` has at most one live parent ``p`` in the beam,
    found by ``key(p) == parent_key(q)``; its extension by ``last(q)`` is set to ``-inf`` in place.

    Args:
        beams: current prefixes; ``total`` ``(B, K)`` their log-probs.
        extend: ``(B, K * N)`` float ends-in-label log-probs of the extensions, flat by ``slot * N + j``.
        last_column: ``(B, K)`` int64 the candidate column of each prefix's last label, ``-1`` for the empty
            prefix and for a last label that is no candidate (its extension is ``-inf``).
        stay_column: the blank's column, an int or ``(B, 1)`` int64 per line.

    Returns:
        ``(B, K)`` float log-prob each prefix receives from its parent's extension (``-inf`` if none).
    """
    width = total.shape[1]
    num_candidates = extend.shape[1] // width
    alive = total > float("-inf")
    # Look every parent key up among the live keys, sorted (keys are >= 0, dead slots -1): O(K log K), not K^2.
    live_keys, slot_of = torch.where(alive, beams.key, -1).sort(1)
    found = torch.searchsorted(live_keys, beams.parent_key).clamp_(max=width - 1)
    has_parent = (live_keys.gather(1, found) == beams.parent_key) & alive & (last_column >= 0)
    parent_slot = slot_of.gather(1, found)
    own_stay = torch.arange(width, device=total.device) * num_candidates + stay_column
    twin = torch.where(has_parent, parent_slot * num_candidates + last_column, own_stay)  # (B, Kq)
    incoming = extend.gather(1, twin).masked_fill(~has_parent, float("-inf"))
    extend.scatter_(1, twin, float("-inf"))  # own stay columns are overwritten by the caller
    return incoming


def _top_k_first(scores: Tensor, k: int) -> Tensor:
    """Indices ``(B, k)`` int64, ascending, of the ``k`` largest of ``scores`` ``(B, N)``.

    Ties at the k-th value go to the lowest indices, unlike :func:`torch.topk`, whose choice among
    ties is unspecified and device-dependent.
    """
    kth = scores.topk(k, dim=1, sorted=False).values.amin(1, keepdim=True)
    above, tie = scores > kth, scores == kth
    take = above | (tie & (tie.cumsum(1) <= k - above.sum(1, keepdim=True)))
    slot = torch.where(take, take.cumsum(1) - 1, k)  # column k collects the rest
    positions = torch.arange(scores.shape[1], device=scores.device).expand_as(slot)
    return slot.new_zeros(scores.shape[0], k + 1).scatter_(1, slot, positions)[:, :k]


def _top_k_ranked(scores: Tensor, k: int) -> Tensor:
    """Indices ``(B, k)`` int64 of the ``k`` largest of ``scores`` ``(B, N)``, largest first, ties to the lower
    index: the same set as :func:`_top_k_first`, ordered by rank, in one :func:`torch.topk` for float32.

    A float32's bits, read as an int32 and with the magnitude bits of negative numbers flipped, order like the
    float (``-0.0`` just below ``0.0``); shifted up 32 bits with ``N - 1 - index`` below them, every key is
    distinct, larger for a larger score and, among equal ones, for a lower index. Other dtypes fall back to
    :func:`_top_k_first`.
    """
    if scores.dtype != torch.float32:
        return _top_k_first(scores, k)
    bits = scores.contiguous().view(torch.int32)
    bits = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(torch.int64)
    last_index = scores.shape[1] - 1
    keys = (bits << 32) | torch.arange(last_index, -1, -1, device=scores.device)
    return last_index - (keys.topk(k, dim=1).values & 0xFFFFFFFF)


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
