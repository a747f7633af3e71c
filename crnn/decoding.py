"""CTC decoding of time-major log-probs ``(T, B, C)``: best path (greedy) and batched prefix beam search.

Every decoder returns a :class:`Decoded`: per line the label ids (blank removed, repeats collapsed) as a Python
list, and a log-score. Mapping ids to text is the charset's job. Everything runs in tensors on the log-probs'
device; the beam search loops over time only, extending every prefix of every line by every class at once.

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
    """

    def __init__(self, beam_width: int = 10, lm_path: str | None = None, lm_weight: float = 0.5,
                 insertion_bonus: float = 0.0, lexicon_path: str | None = None, lexicon_mode: str = "word",
                 allow: str | None = None, word_lm_path: str | None = None, word_lm_weight: float = 0.5,
                 word_unk_offset: float = -10.0, word_bonus: float = 0.0, word_lm_vocabulary: str | None = None,
                 hotwords=None, hotword_weight: float = 2.0, charset=None):
        if beam_width < 1:
            raise ValueError(f"beam_width must be positive, got {beam_width}")
        if allow is not None and not isinstance(allow, str):  # Hydra reads decoder.allow=0123 as the int 123
            raise TypeError(f"allow must be a string of characters, got {allow!r} (quote it on Hydra's command "
                            "line: 'decoder.allow=\"0123456789\"')")
        self.beam_width = beam_width
        self.lm = NgramLM.read_arpa(lm_path) if lm_path else None
        self.lm_weight, self.insertion_bonus = float(lm_weight), float(insertion_bonus)
        self.lexicon = Lexicon.from_file(lexicon_path, lexicon_mode) if lexicon_path else None
        self.allow = allow
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
        return beam_search(log_probs, input_lengths, beam_width=self.beam_width, blank=blank, fusion=self.fusion)

    def __repr__(self) -> str:
        extras = "".join([f", lm={self.lm!r}, lm_weight={self.lm_weight}" if self.lm else "",
                          f", insertion_bonus={self.insertion_bonus}" if self.insertion_bonus else "",
                          f", lexicon={self.lexicon!r}" if self.lexicon else "",
                          f", allow={self.allow!r}" if self.allow is not None else "",
                          f", word_lm={self.word_lm!r}" if self.word_lm else "",
                          f", hotwords={self.hotwords!r}" if self.hotwords else ""])
        return f"BeamSearchDecoder(beam_width={self.beam_width}{extras})"


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
                fusion: Fusion | None = None) -> Decoded:
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

    Returns:
        :class:`Decoded`: the best labelling of each line as a list of label ids, and ``(B,)`` float
        log-probabilities of those labellings summed over all their paths (exact whenever no path of the
        labelling was pruned, e.g. for a beam as wide as all prefixes). With a lexicon that no surviving
        prefix satisfies (possible in ``line`` mode) a line gets the empty labelling and ``-inf``.
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
    for t in range(num_frames):
        beams, parent, label = _step(beams, log_probs[t], blank, fusion)
        history.append((parent, label))
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


def _step(beams: _Beams, log_probs: Tensor, blank: int, fusion: Fusion | None = None) -> tuple[_Beams, Tensor, Tensor]:
    """Advance every beam by one frame.

    Candidates are indexed flat as ``slot * C + class``: class ``c != blank`` is the extension
    ``p + c`` of the prefix ``p`` in that slot, and the blank column stands for ``p`` unchanged.

    Args:
        beams: current ``K`` prefixes per line.
        log_probs: ``(B, C)`` float log-probabilities of this frame.
        blank: index of the blank class.
        fusion: priors to rank by and the lexicon to obey, or None. With a word LM: one host sync (the word
            LM's scores of the candidates that end a word).

    Returns:
        ``(beams, parent, label)``: the new top-K prefixes, and ``(B, K)`` int64 the slot each came
        from and the label it appended (``blank`` if it is its parent unchanged).
    """
    batch, width = beams.last.shape
    num_classes = log_probs.shape[1]
    total = torch.logaddexp(beams.p_blank, beams.p_label)  # (B, K)
    has_last = beams.last >= 0
    last = torch.where(has_last, beams.last, blank)  # the empty prefix points at its own blank column
    last_log_prob = log_probs.gather(1, last)

    # Prefix p unchanged: the frame is a blank, or a repeat of p's last label.
    stay_blank = total + log_probs[:, blank, None]
    stay_label = torch.where(has_last, beams.p_label + last_log_prob, float("-inf"))

    # Prefix p + c ends in c; a repeat of p's last label must follow a blank.
    extend = total[..., None] + log_probs[:, None, :]  # (B, K, C)
    extend.scatter_(2, last[..., None], (beams.p_blank + last_log_prob)[..., None])
    if fusion is not None and fusion.lexicon.sink >= 0:  # extensions that leave the lexicon are impossible
        lexicon_next = fusion.lexicon.next_state[beams.lexicon_state]  # (B, K, C)
        extend.masked_fill_(lexicon_next == fusion.lexicon.sink, float("-inf"))
    extend = extend.view(batch, width * num_classes)
    stay_label = torch.logaddexp(stay_label, _merge_duplicates(beams, total, last, extend, blank))

    is_stay = torch.arange(num_classes, device=last.device) == blank
    stay_total = torch.logaddexp(stay_blank, stay_label)
    scores = torch.where(is_stay, stay_total[..., None], extend.view(batch, width, num_classes))
    scores = scores.view(batch, width * num_classes)
    if fusion is None:
        chosen = _top_k_first(scores, width)
    else:
        candidate_prior, words_after = _candidate_prior(beams, total, fusion)
        candidate_prior = candidate_prior.view(batch, width * num_classes)
        chosen = _top_k_first(scores + candidate_prior, width)
    parent, label = chosen // num_classes, chosen % num_classes
    extended = label != blank
    parent_key = beams.key.gather(1, parent)
    new_beams = _Beams(
        p_blank=torch.where(extended, float("-inf"), stay_blank.gather(1, parent)),
        p_label=torch.where(extended, scores.gather(1, chosen), stay_label.gather(1, parent)),
        last=torch.where(extended, label, beams.last.gather(1, parent)),
        key=torch.where(extended, _extend_hash(parent_key, label), parent_key),
        parent_key=torch.where(extended, parent_key, beams.parent_key.gather(1, parent)),
    )
    if fusion is not None:
        new_beams = _advance_fusion(new_beams._replace(prior=candidate_prior.gather(1, chosen)), beams, fusion,
                                    parent, label, words_after)
    return new_beams, parent, label


def _candidate_prior(beams: _Beams, total: Tensor, fusion: Fusion) -> tuple[Tensor, Tensor | None]:
    """The prior of every candidate, ``(B, K, C)`` by slot and class (the blank column: the prefix unchanged,
    prior unchanged), and with a word LM ``(B, K)`` int64 the word LM state id after the slot's partial word
    (where it ends a word), else None. ``total``: ``(B, K)`` the slots' CTC log-probs (``-inf``: dead)."""
    prior = beams.prior[..., None] + fusion.step[beams.lm_state]
    words_after = None
    if fusion.word_lm is not None:
        tables, node = fusion.word_lm, beams.word_node
        potential = tables.potential(node, prior.dtype)
        change = (~tables.continues[node]).to(prior.dtype) * tables.penalty - potential[..., None]
        change[..., tables.blank] = 0.0
        if tables.space >= 0:  # the space ends a non-empty partial word: the host scores the word
            ends_word = (node != tables.root) & (total > float("-inf"))
            value, words_after = fusion.word_scorer.score_words(beams.word_state, tables.word_id[node], ends_word)
            change[..., tables.space] = value.to(prior.dtype) - potential
        prior = prior + change
    if fusion.hotwords is not None:
        tables, state = fusion.hotwords, beams.hotword_state
        prior = prior + tables.potential[tables.next_state[state]] - tables.potential[state][..., None]
        if tables.space >= 0:  # a word end after a hotword earns it
            prior[..., tables.space] += tables.commit[state]
    return prior, words_after


def _advance_fusion(new_beams: _Beams, beams: _Beams, fusion: Fusion, parent: Tensor, label: Tensor,
                    words_after: Tensor | None) -> _Beams:
    """``new_beams`` with the automata states of the chosen candidates: the parent slot's states advanced by the
    appended label (``(B, K)`` ``parent``, ``label``). The blank columns of the tables keep the state, so stays
    need no special case."""
    new_beams = new_beams._replace(
        lm_state=fusion.lm_next[beams.lm_state.gather(1, parent), label],
        lexicon_state=fusion.lexicon.next_state[beams.lexicon_state.gather(1, parent), label],
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


def _merge_duplicates(beams: _Beams, total: Tensor, last: Tensor, extend: Tensor, blank: int) -> Tensor:
    """Take the extensions ``p + c`` that equal a live prefix ``q`` of the beam out of ``extend``.

    Live prefixes are distinct, so each live ``q`` has at most one live parent ``p`` in the beam,
    found by ``key(p) == parent_key(q)``; its extension by ``last(q)`` is set to ``-inf`` in place.

    Args:
        beams: current prefixes; ``total`` ``(B, K)`` their log-probs, ``last`` ``(B, K)`` int64
            their last labels (``blank`` for the empty prefix).
        extend: ``(B, K * C)`` float ends-in-label log-probs of the extensions, flat by ``slot * C + c``.
        blank: index of the blank class.

    Returns:
        ``(B, K)`` float log-prob each prefix receives from its parent's extension (``-inf`` if none).
    """
    width = last.shape[1]
    num_classes = extend.shape[1] // width
    alive = total > float("-inf")
    is_parent = beams.parent_key[:, :, None] == beams.key[:, None, :]  # (B, Kq, Kp)
    is_parent &= (alive & (beams.last >= 0))[:, :, None] & alive[:, None, :]
    has_parent, parent_slot = is_parent.to(torch.uint8).max(2)  # one pass; the index is the first maximum
    has_parent = has_parent.bool()
    own_blank = torch.arange(width, device=last.device) * num_classes + blank
    twin = torch.where(has_parent, parent_slot * num_classes + last, own_blank)  # (B, Kq)
    incoming = torch.where(has_parent, extend.gather(1, twin), float("-inf"))
    extend.scatter_(1, twin, float("-inf"))  # own blank columns are overwritten by the caller
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


def _extend_hash(key: Tensor, label: Tensor) -> Tensor:
    """Key of a prefix extended by ``label``: two polynomial hashes mod ``2**31 - 1``, packed.

    ``key`` and ``label`` are int64 of one shape; every product stays below ``2**62``.
    """
    high = (key >> 31) * _HASH_BASES[0] + label + 1
    low = (key & _HASH_MOD) * _HASH_BASES[1] + label + 1
    return (high % _HASH_MOD) << 31 | (low % _HASH_MOD)


def _backtrack(history: list[tuple[Tensor, Tensor]], slot: Tensor, blank: int) -> Tensor:
    """Labels appended along the way to ``slot`` ``(B,)``, as ``(B, T)`` int64 with ``blank`` for stays.

    ``history`` holds per frame the ``(parent, label)`` ``(B, K)`` returned by :func:`_step`.
    """
    path = slot.new_full((slot.shape[0], len(history)), blank)
    slot = slot[:, None]
    for t in range(len(history) - 1, -1, -1):
        parent, label = history[t]
        path[:, t] = label.gather(1, slot)[:, 0]
        slot = parent.gather(1, slot)
    return path


def _compact(labels: Tensor, keep: Tensor) -> list[list[int]]:
    """Per row of ``labels`` ``(B, L)`` int64, the entries where ``keep`` ``(B, L)`` bool, in order."""
    kept_first = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices
    rows = torch.cat([keep.sum(1, keepdim=True), labels.gather(1, kept_first)], dim=1).tolist()
    return [row[1 : 1 + row[0]] for row in rows]
