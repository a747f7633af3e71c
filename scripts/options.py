"""Command-line options the recognition tools share (``predict.py``, ``evaluate.py``): decoder, batch, device."""

from __future__ import annotations

import argparse

from crnn.decoding import BACKENDS, BeamSearchDecoder, Decoder, GreedyDecoder
from crnn.lexicon import LEXICON_MODES
from data import Charset

DECODERS = ("greedy", "beam")
FUSION_OPTIONS = ("lm", "lexicon", "allow", "word_lm", "hotwords", "hotwords_file")  # those that need --decoder beam


def positive_int(text: str) -> int:
    """``argparse`` type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def log_prob_or_none(text: str) -> float | None:
    """``argparse`` type: a log-probability (a number <= 0, ``-inf`` included) or ``none``."""
    if text.lower() == "none":
        return None
    value = float(text)
    if not value <= 0:
        raise argparse.ArgumentTypeError(f"must be a log-probability (<= 0) or 'none', got {text}")
    return value


def add_recognition_arguments(parser: argparse.ArgumentParser, batch_size: int) -> None:
    """``--decoder``, ``--beam-width``, ``--token-min-logp``, ``--backend``, the beam search's LMs / lexicon /
    allowed characters / hotwords, ``--batch-size`` (default ``batch_size``) and ``--device``."""
    parser.add_argument("--decoder", choices=DECODERS, default="greedy")
    parser.add_argument("--beam-width", type=positive_int, default=10, help="prefixes kept per frame by --decoder beam")
    parser.add_argument("--token-min-logp", type=log_prob_or_none, default=-5.0, metavar="LOGP",
                        help="--decoder beam: per frame, skip classes below this log-prob (default -5, as "
                             "pyctcdecode); 'none': the exact search over every class; -inf as --token-min-logp=-inf")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="--decoder beam: auto (default: numba on the CPU, tensor on CUDA and with --word-lm), "
                             "tensor (the batched search) or numba (the compiled search one line at a time)")
    fusion = parser.add_argument_group("beam search with a language model or lexicon (with --decoder beam)")
    fusion.add_argument("--lm", metavar="PATH", help="ARPA character n-gram model (scripts/train_char_lm.py)")
    fusion.add_argument("--lm-weight", type=float, default=0.5, metavar="W", help="weight of log P_lm (default 0.5)")
    fusion.add_argument("--insertion-bonus", type=float, default=0.0, metavar="B",
                        help="score added per output character (default 0)")
    fusion.add_argument("--lexicon", metavar="PATH", help="word list, one entry per line")
    fusion.add_argument("--lexicon-mode", choices=LEXICON_MODES, default="word",
                        help="word: every output word is an entry; line: the whole output is one (default word)")
    fusion.add_argument("--allow", metavar="CHARS", help="the only characters the output may contain")
    fusion.add_argument("--word-lm", metavar="PATH",
                        help="ARPA or KenLM binary word n-gram model (needs kenlm; train_char_lm.py --unit word)")
    fusion.add_argument("--word-lm-weight", type=float, default=0.5, metavar="W",
                        help="weight of log P_word, per word (default 0.5)")
    fusion.add_argument("--word-unk-offset", type=float, default=-10.0, metavar="X",
                        help="added to log P_word of a word outside the word LM's vocabulary (default -10)")
    fusion.add_argument("--word-bonus", type=float, default=0.0, metavar="B", help="score added per word (default 0)")
    fusion.add_argument("--word-lm-vocabulary", metavar="PATH",
                        help="the word LM's words, one per line (default: the ARPA file's unigrams)")
    fusion.add_argument("--hotwords", nargs="+", metavar="WORD", help="words or quoted phrases to boost")
    fusion.add_argument("--hotwords-file", metavar="PATH", help="hotwords, one per line")
    fusion.add_argument("--hotword-weight", type=float, default=2.0, metavar="W",
                        help="score added per character of a hotword in the output (default 2)")
    parser.add_argument("--batch-size", type=positive_int, default=batch_size)
    parser.add_argument("--device", default="auto", help="auto (accelerator if available), cpu, cuda, cuda:1, ...")


def decoder_from_args(args: argparse.Namespace, charset: Charset) -> Decoder:
    """The decoder that ``--decoder`` and the beam-search options ask for, for a model with ``charset``."""
    if args.decoder != "beam":
        given = [f"--{name.replace('_', '-')}" for name in FUSION_OPTIONS if getattr(args, name) is not None]
        if given or args.insertion_bonus:
            raise SystemExit(f"error: {', '.join(given) or '--insertion-bonus'} needs --decoder beam")
        return GreedyDecoder()
    if args.hotwords and args.hotwords_file:
        raise SystemExit("error: give --hotwords or --hotwords-file, not both")
    return BeamSearchDecoder(args.beam_width, lm_path=args.lm, lm_weight=args.lm_weight,
                             insertion_bonus=args.insertion_bonus, lexicon_path=args.lexicon,
                             lexicon_mode=args.lexicon_mode, allow=args.allow, word_lm_path=args.word_lm,
                             word_lm_weight=args.word_lm_weight, word_unk_offset=args.word_unk_offset,
                             word_bonus=args.word_bonus, word_lm_vocabulary=args.word_lm_vocabulary,
                             hotwords=args.hotwords or args.hotwords_file, hotword_weight=args.hotword_weight,
                             charset=charset, token_min_logp=args.token_min_logp, backend=args.backend)
