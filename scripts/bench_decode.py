"""Time greedy and prefix beam-search CTC decoding against pyctcdecode; with a checkpoint, also their accuracy.

Example::

    python scripts/bench_decode.py --lines 256 --frames 32 --classes 11 --beam-width 10 --repeats 5
    python scripts/bench_decode.py --checkpoint last.ckpt --data /tmp/codes/test --lm codes.arpa \
        --lexicon codes.txt --lexicon-mode line --beam-widths 10 50
    python scripts/bench_decode.py --checkpoint text.ckpt --data /tmp/words/test --lm chars6.arpa \
        --word-lm words3.arpa --word-lm-weight 0.5 --beam-widths 10

Without ``--checkpoint``: random log-probs, our decoders timed against pyctcdecode without LM, both with the same
``--token-min-logp`` (default -5, pyctcdecode's; ``none``: no class is skipped, ``-inf`` for pyctcdecode) and
pyctcdecode's beam pruning off (``beam_prune_logp=-inf``: no beam is dropped for trailing the best by a margin),
as ours has none.

With ``--checkpoint`` and ``--data`` (a ``gt.txt`` folder or LMDB directory): the model's log-probs of every
line are computed once, then every decoder (greedy, beam, beam + LM, beam + lexicon, beam + LM + lexicon at each
``--beam-widths``; pyctcdecode without and with KenLM) decodes them all, and each gets CER, word accuracy
(``1 - word edit distance / reference words``), line accuracy, lines/s of decoding alone (the median of
``--repeats`` passes over the set), and the line error
rate of its most confident 50 / 80 / 95 % of lines (confidence: the decoder's score). Ours prune with
``--token-min-logp`` (default -5; ``none``: the exact search). pyctcdecode decodes with its default pruning
(``token_min_logp=-5``, ``beam_prune_logp=-10``) and the same ARPA file through KenLM: every character is made
its own "word" (labels ``▁c``), so KenLM scores the character n-gram with ``alpha = --lm-weight`` and
``beta = --insertion-bonus``, the same fused score as ours. With ``--word-lm`` (a word KenLM model): beam + word
LM, beam + char LM + word LM (with ``--lm``), and pyctcdecode with the same word model as its own word-level LM
(``alpha = --word-lm-weight``, ``beta = --word-bonus``, ``unk_score_offset = --word-unk-offset / ln 10``); our
rows also print the share of the decoding time spent on the host scoring words. With ``--hotwords``: beam +
hotwords. Then flashlight-text's lexicon-free CTC beam search (the C++ decoder behind torchaudio's
``ctc_decoder``) without and with the same ARPA file through its KenLM wrapper, as a character n-gram: one call
per line, ``lm_weight = --lm-weight * ln 10`` (KenLM scores are log10), prefixes merged by log-add like ours,
``--flashlight-beam-threshold`` (default 50, torchaudio's) and ``--flashlight-tokens`` per frame (default all);
it has no per-character insertion bonus, so its LM row needs ``--insertion-bonus 0``. Each throughput ratio to
pyctcdecode or flashlight is the median of ``--repeats`` rounds of one pass of ours and one of theirs back to
back, so that a shared machine's drifting speed moves both alike. pyctcdecode, kenlm and flashlight-text are
benchmark-only dependencies (skipped when missing).

Several ``--lm-weight`` and ``--insertion-bonus`` values make a grid, for tuning them on a validation set: every
fused decoder runs at every ``(weight, bonus)`` pair, the LM and lexicon tables compiled once (pyctcdecode rows,
word LM and hotword rows only with a single pair).
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import string
import time
from collections.abc import Callable
from typing import NamedTuple

import editdistance
import torch

from crnn.decoding import (BACKENDS, BeamSearchDecoder, Decoder, Fusion, GreedyDecoder, beam_search, greedy_decode,
                           interleaved_lm_tables)
from crnn.lexicon import LEXICON_MODES, Lexicon
from crnn.lm import SPACE, NgramLM
from scripts.options import log_prob_or_none

SYMBOLS = string.ascii_lowercase + string.ascii_uppercase + string.digits


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=256, help="text lines in the batch (B)")
    parser.add_argument("--frames", type=int, default=32, help="frames per line (T)")
    parser.add_argument("--classes", type=int, default=11, help="classes including the blank (C)")
    parser.add_argument("--beam-width", type=int, default=10)
    parser.add_argument("--blank", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs; the median is reported")
    parser.add_argument("--scale", type=float, default=5.0, help="logit scale: larger is peakier")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--token-min-logp", type=log_prob_or_none, default=-5.0, metavar="LOGP",
                        help="our beam search's per-frame class pruning (default -5); 'none': every class")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="our beam search's backend (default auto: numba on the CPU, tensor on CUDA and with a "
                             "word LM); without --checkpoint the other one on the CPU is timed too")
    accuracy = parser.add_argument_group("accuracy on a labelled set (with --checkpoint)")
    accuracy.add_argument("--checkpoint", help="a training checkpoint: decode its log-probs of --data")
    accuracy.add_argument("--data", help="gt.txt folder or LMDB directory")
    accuracy.add_argument("--lm", help="ARPA character n-gram model")
    accuracy.add_argument("--lm-weight", type=float, nargs="+", default=[0.5], help="several: a grid (tuning)")
    accuracy.add_argument("--insertion-bonus", type=float, nargs="+", default=[0.0], help="several: a grid (tuning)")
    accuracy.add_argument("--lexicon", help="word list, one entry per line")
    accuracy.add_argument("--lexicon-mode", choices=LEXICON_MODES, default="word")
    accuracy.add_argument("--word-lm", help="word n-gram model (ARPA or KenLM binary; needs kenlm)")
    accuracy.add_argument("--word-lm-weight", type=float, default=0.5)
    accuracy.add_argument("--word-unk-offset", type=float, default=-10.0)
    accuracy.add_argument("--word-bonus", type=float, default=0.0)
    accuracy.add_argument("--hotwords", nargs="+", help="words or phrases to boost")
    accuracy.add_argument("--hotword-weight", type=float, default=2.0)
    accuracy.add_argument("--flashlight-beam-threshold", type=float, default=50.0,
                          help="flashlight drops hypotheses this far below the best (default 50, torchaudio's)")
    accuracy.add_argument("--flashlight-tokens", type=int, default=None,
                          help="flashlight's classes tried per frame, the most likely first (default: all)")
    accuracy.add_argument("--beam-widths", type=int, nargs="+", default=[10, 50])
    accuracy.add_argument("--batch-size", type=int, default=256, help="lines per decoder call")
    return parser.parse_args(argv)


def make_log_probs(frames: int, lines: int, classes: int, scale: float, seed: int) -> torch.Tensor:
    """``(T, B, C)`` float32 log-probs: log_softmax of standard-normal logits times ``scale``."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(frames, lines, classes, generator=generator) * scale).log_softmax(-1)


def median_seconds(fn: Callable[[], object], repeats: int, device: str) -> tuple[float, object]:
    """Median wall time of ``fn()`` over ``repeats`` runs after one warm-up, and its last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def vocabulary(classes: int, blank: int) -> list[str]:
    """One character per class, ``""`` for the blank (pyctcdecode's convention)."""
    if classes - 1 > len(SYMBOLS):
        raise ValueError(f"at most {len(SYMBOLS) + 1} classes supported")
    symbols = iter(SYMBOLS)
    return ["" if c == blank else next(symbols) for c in range(classes)]


def pyctcdecode_decoder(labels: list[str]):
    """A pyctcdecode decoder without LM, or None if the package is missing."""
    try:
        from pyctcdecode import build_ctcdecoder
    except ImportError:
        return None
    return build_ctcdecoder(labels)


def decode_with_pyctcdecode(decoder, log_probs: torch.Tensor, beam_width: int, token_min_logp: float) -> list[str]:
    """Top text of each line of ``(T, B, C)`` log-probs, one ``decode_beams`` call per line."""
    return [
        decoder.decode_beams(
            line, beam_width=beam_width, beam_prune_logp=float("-inf"), token_min_logp=token_min_logp
        )[0][0]
        for line in log_probs.transpose(0, 1).double().numpy()
    ]


def report(name: str, seconds: float, lines: int) -> None:
    print(f"{name:<28}{seconds * 1e3:10.2f} ms total{seconds * 1e3 / lines:10.4f} ms/line")


class LogProbs(NamedTuple):
    """The model's output for one batch of lines: ``(T, B, C)`` log-probs, ``(B,)`` lengths, ``B`` labels."""

    log_probs: torch.Tensor
    lengths: torch.Tensor
    labels: list[str]


class Scored(NamedTuple):
    """One decoder over the whole set: texts, scores (higher = more confident) and decoding seconds."""

    texts: list[str]
    scores: list[float]
    seconds: float


def model_log_probs(args: argparse.Namespace):
    """The module and its :class:`LogProbs` of every line of ``--data`` in batches of ``--batch-size``."""
    from crnn.inference import load_recognizer
    from data import collate_lines, open_split
    from data.lmdb import LmdbLines

    module = load_recognizer(args.checkpoint, args.device)
    channels, height = module.input_format
    dataset = open_split(args.data, module.charset, height, channels, require_emittable=False)
    batches = []
    for start in range(0, len(dataset), args.batch_size):
        indices = range(start, min(start + args.batch_size, len(dataset)))
        empty = torch.empty(0, dtype=torch.long)
        batch = collate_lines([{"image": dataset.image(i), "text": "", "target": empty} for i in indices])
        log_probs, lengths = module(batch["images"].to(module.device), batch["widths"])
        batches.append(LogProbs(log_probs, lengths, [dataset.records[i].label for i in indices]))
    if isinstance(dataset, LmdbLines):
        dataset.close()
    return module, batches


def median_pass(repeats: int, run: Callable[..., Scored], *args) -> Scored:
    """``run(*args)`` ``repeats`` times (at least once): the last texts and scores, the median seconds."""
    passes = [run(*args) for _ in range(max(1, repeats))]
    return passes[-1]._replace(seconds=statistics.median(scored.seconds for scored in passes))


def interleaved(repeats: int, ours: Callable[[], Scored], theirs: Callable[[], Scored]) -> tuple[Scored, list[float]]:
    """``ours()`` and ``theirs()`` back to back, ``repeats`` rounds (at least one): their last result with the median
    seconds, and each round's throughput ratio of ours to theirs. A shared machine's speed drifts over minutes;
    two passes back to back see about the same one."""
    results, ratios = [], []
    for _ in range(max(1, repeats)):
        mine, result = ours(), theirs()
        results.append(result)
        ratios.append(result.seconds / mine.seconds)
    return results[-1]._replace(seconds=statistics.median(result.seconds for result in results)), ratios


def run_ours(decoder: Decoder, batches: list[LogProbs], charset, device: str) -> Scored:
    texts, scores, seconds = [], [], 0.0
    host = time_word_scoring(decoder)
    for batch in batches:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        labels, line_scores = decoder(batch.log_probs, batch.lengths, charset.blank)
        line_scores = line_scores.tolist()
        seconds += time.perf_counter() - start
        texts += [charset.decode(ids) for ids in labels]
        scores += line_scores
    if host is not None:
        print(f"  host word scoring: {host[0] / seconds:.1%} of the decoding time, {len(decoder.word_lm.states):,} "
              "KenLM states", flush=True)
    return Scored(texts, scores, seconds)


def time_word_scoring(decoder: Decoder) -> list[float] | None:
    """With a word LM: wrap its host-side scoring so that its seconds add up in the returned one-item list."""
    scorer = getattr(decoder, "word_lm", None)
    if scorer is None:
        return None
    spent = [0.0]

    def timed(method):
        def run(*args):
            start = time.perf_counter()
            result = method(*args)
            spent[0] += time.perf_counter() - start
            return result
        return run

    scorer.score_words, scorer.score_ends = timed(scorer.score_words), timed(scorer.score_ends)
    return spent


def pyctcdecode_char_decoder(charset, lm_path: str | None, alpha: float, beta: float):
    """pyctcdecode with every character its own word (labels ``▁c``, the space ``▁<space>``), so that KenLM
    scores ``lm_path`` as a character n-gram; None if pyctcdecode (or, with an LM, kenlm) is missing."""
    try:
        from pyctcdecode import build_ctcdecoder
        if lm_path:
            import kenlm  # noqa: F401
    except ImportError:
        return None
    tokens = ["" if c == charset.blank else charset.decode([c]).replace(" ", SPACE) for c in range(charset.num_classes)]
    labels = [token and "\u2581" + token for token in tokens]
    return build_ctcdecoder(labels, kenlm_model_path=lm_path, unigrams=[t for t in tokens if t] if lm_path else None,
                            alpha=alpha, beta=beta)


def pyctcdecode_word_decoder(charset, args: argparse.Namespace):
    """pyctcdecode with its labels the charset's characters and ``--word-lm`` as its word-level KenLM model; None if
    pyctcdecode or kenlm is missing."""
    try:
        import kenlm  # noqa: F401
        from pyctcdecode import build_ctcdecoder
    except ImportError:
        return None
    labels = ["" if c == charset.blank else charset.decode([c]) for c in range(charset.num_classes)]
    return build_ctcdecoder(labels, kenlm_model_path=args.word_lm, alpha=args.word_lm_weight, beta=args.word_bonus,
                            unk_score_offset=args.word_unk_offset / math.log(10))


def run_pyctcdecode(decoder, batches: list[LogProbs], beam_width: int, words: bool = False) -> Scored:
    """pyctcdecode's best text per line; ``words``: its labels are characters (not ``▁c`` tokens)."""
    texts, scores, seconds = [], [], 0.0
    for batch in batches:
        lines = [line[:n] for line, n in zip(batch.log_probs.transpose(0, 1).double().cpu().numpy(),
                                             batch.lengths.tolist())]
        start = time.perf_counter()
        best = [decoder.decode_beams(line, beam_width=beam_width)[0] for line in lines]
        seconds += time.perf_counter() - start
        texts += [text if words else "".join(" " if word == SPACE else word for word in text.split())
                  for text, *_ in best]
        scores += [beam[3] for beam in best]  # logit_score: pyctcdecode's acoustic score of the text
    return Scored(texts, scores, seconds)


class Flashlight(NamedTuple):
    """A flashlight decoder and its LM, which it does not own (the LM must outlive it)."""

    decoder: object
    lm: object


def flashlight_char_decoder(charset, lm_path: str | None, lm_weight: float, beam_width: int, beam_threshold: float,
                            tokens_per_frame: int | None):
    """flashlight-text's lexicon-free CTC decoder (torchaudio's ``ctc_decoder`` without a lexicon), with
    ``lm_path`` read by its KenLM wrapper as a character n-gram (each class a token named like the ARPA file's
    units, the space ``<space>``), or no LM; None if flashlight-text (or, with an LM, its KenLM) is missing."""
    try:
        from flashlight.lib.text.decoder import (
            CriterionType, KenLM, LexiconFreeDecoder, LexiconFreeDecoderOptions, ZeroLM)
        from flashlight.lib.text.dictionary import Dictionary
    except ImportError:
        return None
    tokens = ["<blank>" if c == charset.blank else charset.decode([c]).replace(" ", SPACE)
              for c in range(charset.num_classes)]
    lm = KenLM(lm_path, Dictionary(tokens)) if lm_path else ZeroLM()  # the token order is the LM's index map
    options = LexiconFreeDecoderOptions(
        beam_size=beam_width, beam_size_token=tokens_per_frame or charset.num_classes, beam_threshold=beam_threshold,
        lm_weight=lm_weight * math.log(10), sil_score=0.0, log_add=True, criterion_type=CriterionType.CTC)
    decoder = LexiconFreeDecoder(options, lm, charset.blank, charset.blank, [])  # silence: the blank (no bonus)
    return Flashlight(decoder, lm)


def run_flashlight(flashlight: Flashlight, batches: list[LogProbs], blank: int, charset) -> Scored:
    """flashlight's best text per line, repeats collapsed and blanks dropped as torchaudio does; its score is the
    fused one's acoustic part (``emittingModelScore``)."""
    texts, scores, seconds = [], [], 0.0
    for batch in batches:
        lines = batch.log_probs.transpose(0, 1).float().cpu().contiguous()  # (B, T, C), one row per line
        start = time.perf_counter()
        best = [flashlight.decoder.decode(line.data_ptr(), length, lines.shape[2])[0]
                for line, length in zip(lines, batch.lengths.tolist())]
        labels = [[k for k, _ in itertools.groupby(result.tokens) if k != blank] for result in best]
        seconds += time.perf_counter() - start
        texts += [charset.decode(labelling) for labelling in labels]
        scores += [result.emittingModelScore for result in best]
    return Scored(texts, scores, seconds)


def accuracy_row(name: str, scored: Scored, references: list[str]) -> str:
    edits = sum(editdistance.eval(p, r) for p, r in zip(scored.texts, references))
    chars = sum(map(len, references))
    word_edits = sum(editdistance.eval(p.split(), r.split()) for p, r in zip(scored.texts, references))
    words = sum(len(r.split()) for r in references)
    wrong = [p != r for p, r in zip(scored.texts, references)]
    order = sorted(range(len(wrong)), key=lambda i: -scored.scores[i])
    risks = []
    for coverage in (0.5, 0.8, 0.95):
        kept = order[: max(1, math.ceil(coverage * len(order)))]
        risks.append(sum(wrong[i] for i in kept) / len(kept))
    return (f"| {name} | {edits / chars:.4f} | {1 - word_edits / words:.4f} | {1 - sum(wrong) / len(wrong):.4f} | "
            f"{len(references) / scored.seconds:,.0f} | " + " | ".join(f"{r:.4f}" for r in risks) + " |")


def compared_fusions(charset, lm: NgramLM | None, lexicon: Lexicon | None, weights: list[float],
                   bonuses: list[float]) -> dict[str, Fusion]:
    """The fusions the accuracy table compares, by row name: ``char LM``, ``lexicon`` (no LM, no bonus) and
    ``char LM + lexicon``, the LM ones at every ``(weight, bonus)`` pair (named ``... (w=W, b=B)`` when there are
    several). Each equals ``Fusion.build(charset, lm, weight, bonus, lexicon)``; the LM and lexicon tables are
    compiled once and the LM's rescaled per pair."""
    grid = [(weight, bonus) for weight in weights for bonus in bonuses]
    not_blank = torch.arange(charset.num_classes) != charset.blank
    with_lm, with_lexicon, with_both = {}, {}, {}
    if lexicon is not None:
        with_lexicon["lexicon"] = Fusion.build(charset, lexicon=lexicon)
    if lm is not None:
        base = Fusion.build(charset, lm, 1.0, 0.0)
        for weight, bonus in grid:
            step, lm_next = interleaved_lm_tables(weight * base.step + bonus * not_blank, base.lm_next)
            fusion = base._replace(step=step, lm_next=lm_next, lm_end=weight * base.lm_end)
            suffix = f" (w={weight:g}, b={bonus:g})" if len(grid) > 1 else ""
            with_lm[f"char LM{suffix}"] = fusion
            if lexicon is not None:
                with_both[f"char LM + lexicon{suffix}"] = fusion._replace(lexicon=with_lexicon["lexicon"].lexicon)
    return with_lm | with_lexicon | with_both


def accuracy_main(args: argparse.Namespace) -> None:
    module, batches = model_log_probs(args)
    charset = module.charset
    references = [label for batch in batches for label in batch.labels]
    print(f"{args.data}: {len(references)} lines, decoders on {args.device}, torch_threads={torch.get_num_threads()}, "
          f"our token_min_logp={args.token_min_logp}, backend={args.backend}")
    start = time.perf_counter()
    lm = NgramLM.read_arpa(args.lm) if args.lm else None
    lexicon = Lexicon.from_file(args.lexicon, args.lexicon_mode) if args.lexicon else None
    compared = compared_fusions(charset, lm, lexicon, args.lm_weight, args.insertion_bonus)
    fusions = {name: fusion.to(module.device, torch.float32) for name, fusion in compared.items()}
    if fusions:
        sizes = [f"LM {next(iter(fusions.values())).step.shape[0]:,} states" if lm else "",
                 f"lexicon {fusions['lexicon'].lexicon.next_state.shape[0]:,} trie nodes" if lexicon else ""]
        print(f"tables ({', '.join(s for s in sizes if s)}) x {charset.num_classes} classes compiled in "
              f"{time.perf_counter() - start:.1f} s")
    print("| decoder | CER | word acc | line acc | lines/s | err@50% | err@80% | err@95% |")
    print("|---|---|---|---|---|---|---|---|")
    runs: dict[str, Scored] = {"greedy": median_pass(args.repeats, run_ours, GreedyDecoder(), batches, charset,
                                                     args.device)}
    print(accuracy_row("greedy", runs["greedy"], references), flush=True)
    single = len(args.lm_weight) == 1 and len(args.insertion_bonus) == 1
    for width in args.beam_widths:
        decoders: dict[str, Decoder] = {f"beam {width}": BeamSearchDecoder(width, token_min_logp=args.token_min_logp,
                                                                         backend=args.backend)}
        for name, fusion in fusions.items():
            decoders[f"beam {width} + {name}"] = (
                lambda log_probs, lengths, blank, width=width, fusion=fusion:
                beam_search(log_probs, lengths, beam_width=width, blank=blank, fusion=fusion,
                            token_min_logp=args.token_min_logp, backend=args.backend))
        if single:
            common = dict(charset=charset, token_min_logp=args.token_min_logp, backend=args.backend)
            words = dict(word_lm_path=args.word_lm, word_lm_weight=args.word_lm_weight,
                         word_unk_offset=args.word_unk_offset, word_bonus=args.word_bonus, **common)
            if args.word_lm:
                decoders[f"beam {width} + word LM"] = BeamSearchDecoder(width, **words)
            if args.word_lm and args.lm:
                decoders[f"beam {width} + char LM + word LM"] = BeamSearchDecoder(
                    width, lm_path=args.lm, lm_weight=args.lm_weight[0], insertion_bonus=args.insertion_bonus[0],
                    **words)
            if args.hotwords:
                decoders[f"beam {width} + hotwords"] = BeamSearchDecoder(
                    width, hotwords=args.hotwords, hotword_weight=args.hotword_weight, **common)
        for name, decoder in decoders.items():
            runs[name] = median_pass(args.repeats, run_ours, decoder, batches, charset, args.device)
            print(accuracy_row(name, runs[name], references), flush=True)
        if not single:
            continue

        def compare(name: str, theirs: Callable[[], Scored], ours_name: str, normalise: bool = False) -> None:
            """Their row, and the throughput ratio of ours (``ours_name``) to theirs from interleaved passes."""
            decoder = decoders[ours_name]
            runs[name], ratios = interleaved(args.repeats, lambda: run_ours(decoder, batches, charset, args.device),
                                             theirs)
            print(accuracy_row(name, runs[name], references), flush=True)
            same = sum((" ".join(a.split()) if normalise else a) == b
                       for a, b in zip(runs[ours_name].texts, runs[name].texts))
            print(f"  ours / {name}: throughput {statistics.median(ratios):.1f}x (median of {len(ratios)} interleaved "
                  f"passes, {min(ratios):.1f}-{max(ratios):.1f}x), same text{' (whitespace normalised)' * normalise} "
                  f"on {same / len(references):.1%} of lines", flush=True)

        for lm_path in ([None, args.lm] if args.lm else [None]):
            theirs = pyctcdecode_char_decoder(charset, lm_path, args.lm_weight[0], args.insertion_bonus[0])
            if theirs is None:
                print(f"(pyctcdecode{' + kenlm' if lm_path else ''} not installed: skipped)")
                continue
            compare(f"pyctcdecode {width}" + (" + KenLM (same char LM)" if lm_path else ""),
                    lambda theirs=theirs: run_pyctcdecode(theirs, batches, width),
                    f"beam {width} + char LM" if lm_path else f"beam {width}")
        for lm_path in ([None, args.lm] if args.lm else [None]):
            name = f"flashlight {width}" + (" + KenLM (same char LM)" if lm_path else "")
            if lm_path and args.insertion_bonus[0] != 0:
                print(f"({name}: flashlight has no per-character insertion bonus: skipped)")
                continue
            theirs = flashlight_char_decoder(charset, lm_path, args.lm_weight[0], width,
                                             args.flashlight_beam_threshold, args.flashlight_tokens)
            if theirs is None:
                print("(flashlight-text not installed: skipped)")
                break
            compare(name, lambda theirs=theirs: run_flashlight(theirs, batches, charset.blank, charset),
                    f"beam {width} + char LM" if lm_path else f"beam {width}")
        if args.word_lm:
            theirs = pyctcdecode_word_decoder(charset, args)
            if theirs is None:
                print("(pyctcdecode + kenlm not installed: skipped)")
                continue
            compare(f"pyctcdecode {width} + KenLM (same word LM)",
                    lambda: run_pyctcdecode(theirs, batches, width, words=True), f"beam {width} + word LM",
                    normalise=True)


def time_word_lm(args: argparse.Namespace, log_probs: torch.Tensor, lengths: torch.Tensor, beam_s: float) -> None:
    """The beam search with ``--word-lm`` on the random log-probs, the last class being the space: its time, the
    ratio to the plain search's ``beam_s``, and the share spent on the host scoring words (the per-frame cost)."""
    from data import Charset

    symbols = [char for char in vocabulary(args.classes, args.blank) if char][:-1] + [" "]
    decoder = BeamSearchDecoder(args.beam_width, word_lm_path=args.word_lm, word_lm_weight=args.word_lm_weight,
                                word_unk_offset=args.word_unk_offset, word_bonus=args.word_bonus,
                                charset=Charset("".join(symbols), blank=args.blank))
    spent = time_word_scoring(decoder)
    seconds, _ = median_seconds(lambda: decoder(log_probs, lengths, args.blank), args.repeats, args.device)
    spent[0] = 0.0
    start = time.perf_counter()
    decoder(log_probs, lengths, args.blank)
    host_share = spent[0] / (time.perf_counter() - start)
    report("beam_search + word LM", seconds, args.lines)
    print(f"word LM: {seconds / beam_s:.2f}x the plain search's time, {(seconds - beam_s) / args.frames * 1e3:.2f} ms "
          f"more per frame ({args.lines} lines x {args.beam_width} beams), host word scoring {host_share:.0%} of the "
          f"decoding time; "
          f"{len(decoder.word_lm.states):,} KenLM states cached")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_grad_enabled(False)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.checkpoint:
        if not args.data:
            raise SystemExit("error: --checkpoint needs --data")
        accuracy_main(args)
        return
    log_probs = make_log_probs(args.frames, args.lines, args.classes, args.scale, args.seed)
    on_device = log_probs.to(args.device)
    lengths = torch.full((args.lines,), args.frames, dtype=torch.int64, device=args.device)
    print(
        f"B={args.lines} T={args.frames} C={args.classes} beam_width={args.beam_width} "
        f"device={args.device} torch_threads={torch.get_num_threads()} token_min_logp={args.token_min_logp} "
        f"backend={args.backend}"
    )

    greedy_s, _ = median_seconds(lambda: greedy_decode(on_device, lengths, args.blank), args.repeats, args.device)
    report("greedy_decode", greedy_s, args.lines)
    beam_s, (ours, _) = median_seconds(
        lambda: beam_search(on_device, lengths, args.beam_width, args.blank, token_min_logp=args.token_min_logp,
                            backend=args.backend),
        args.repeats, args.device
    )
    report("beam_search (ours)", beam_s, args.lines)
    if args.device == "cpu":  # the other backend too
        other = "numba" if args.backend == "tensor" else "tensor"
        other_s, _ = median_seconds(
            lambda: beam_search(on_device, lengths, args.beam_width, args.blank, token_min_logp=args.token_min_logp,
                                backend=other), args.repeats, args.device)
        report(f"beam_search ({other} backend)", other_s, args.lines)
        print(f"ours / {other} backend: {other_s / beam_s:.1f}x")
    if args.word_lm:
        time_word_lm(args, on_device, lengths, beam_s)

    labels = vocabulary(args.classes, args.blank)
    decoder = pyctcdecode_decoder(labels)
    if decoder is None:
        print("pyctcdecode is not installed (pip install pyctcdecode): skipped the comparison")
        return
    theirs_s, theirs = median_seconds(
        lambda: decode_with_pyctcdecode(decoder, log_probs, args.beam_width,
                                        float("-inf") if args.token_min_logp is None else args.token_min_logp),
        args.repeats, "cpu"
    )
    report("pyctcdecode (no LM)", theirs_s, args.lines)
    ours_text = ["".join(labels[c] for c in labelling) for labelling in ours]
    agreement = sum(a == b for a, b in zip(ours_text, theirs)) / args.lines
    print(f"throughput ratio ours/pyctcdecode: {theirs_s / beam_s:.1f}x")
    print(f"best labelling agrees with pyctcdecode on {agreement:.1%} of lines")


if __name__ == "__main__":
    main()
