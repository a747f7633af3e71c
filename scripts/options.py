"""Command-line options the recognition tools share (``predict.py``, ``evaluate.py``): decoder, batch, device."""

from __future__ import annotations

import argparse

from crnn.decoding import BeamSearchDecoder, Decoder, GreedyDecoder

DECODERS = ("greedy", "beam")


def positive_int(text: str) -> int:
    """``argparse`` type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_recognition_arguments(parser: argparse.ArgumentParser, batch_size: int) -> None:
    """``--decoder``, ``--beam-width``, ``--batch-size`` (default ``batch_size``) and ``--device``."""
    parser.add_argument("--decoder", choices=DECODERS, default="greedy")
    parser.add_argument("--beam-width", type=positive_int, default=10, help="prefixes kept per frame by --decoder beam")
    parser.add_argument("--batch-size", type=positive_int, default=batch_size)
    parser.add_argument("--device", default="auto", help="auto (accelerator if available), cpu, cuda, cuda:1, ...")


def decoder_from_args(args: argparse.Namespace) -> Decoder:
    """The decoder that ``--decoder`` / ``--beam-width`` ask for."""
    return BeamSearchDecoder(args.beam_width) if args.decoder == "beam" else GreedyDecoder()
