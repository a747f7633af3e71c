"""Evaluate a checkpoint on labelled line images: CER, sequence accuracy and normalised edit distance.

Example::

    python scripts/evaluate.py --checkpoint outputs/RUN/checkpoints/last.ckpt /tmp/ds/test /tmp/ds_lmdb/test \\
        --decoder beam --errors errors.tsv

Each dataset is a ``gt.txt`` folder or an LMDB directory (the formats of ``data=folder`` / ``data=lmdb``),
preprocessed as in training. Every line counts, also those the model cannot emit (a label character outside
its charset, or a label needing more CTC frames than the image gives): they count with their real edit distance,
and their number is printed (``unemittable=``). ``--protocol`` compares label and prediction as they are
(``raw``), lowercased (``caseless``) or lowercased with only ``0-9a-z`` kept (``alnum36``, the scene-text
benchmarks' protocol), ``--nfkc`` NFKC-normalises both first (see :mod:`crnn.metrics`); ``--by-length`` adds a line
per label length (of the label as the protocol scores it). Malformed ``gt.txt``
lines, empty labels and missing or unreadable images stop with an error naming the file and line; with
``--skip-bad`` they are skipped, counted and summarised instead. Prints one line per dataset (and a total
over several), ``--errors`` writes every line misread (under the protocol) as
``where<TAB>label<TAB>prediction<TAB>confidence``, ``--json`` the metrics.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from crnn.inference import load_recognizer, recognize, resolve_device
from crnn.metrics import PROTOCOLS, TextMetrics, normalize
from crnn.module import CRNNModule
from data import BadInput, LabelledLines, LmdbLines, open_split
from data.labelled import label_frames
from scripts.options import add_recognition_arguments, decoder_from_args

DATA_KINDS = ("missing_image", "unreadable_image", "malformed", "empty_label")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a training checkpoint (.ckpt)")
    parser.add_argument("datasets", nargs="+", help="gt.txt folders or LMDB directories")
    add_recognition_arguments(parser, batch_size=64)
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip (and count) malformed lines, empty labels, missing and unreadable images")
    parser.add_argument("--allow-outside-paths", action="store_true",
                        help="accept gt.txt image paths that leave the dataset folder (absolute or '..'), like "
                             "training's data.allow_outside_paths")
    parser.add_argument("--errors", type=Path, help="write every misread line here (TSV)")
    parser.add_argument("--json", type=Path, help="write the metrics here")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="raw",
                        help="how label and prediction are compared: raw, caseless, or alnum36 (lowercase, 0-9a-z only)")
    parser.add_argument("--nfkc", action="store_true", help="NFKC-normalise label and prediction before the protocol")
    parser.add_argument("--by-length", action="store_true", help="also break the metrics down by label length")
    return parser.parse_args(argv)


class Scores:
    """:class:`TextMetrics` of every line and, per label length (under the protocol), of the lines that long."""

    def __init__(self, protocol: str, nfkc: bool) -> None:
        self.protocol, self.nfkc = protocol, nfkc
        self.all = TextMetrics(protocol, nfkc)
        self.by_length: dict[int, TextMetrics] = {}

    def update(self, predictions: list[str], labels: list[str]) -> None:
        self.all.update(predictions, labels)
        for prediction, label in zip(predictions, labels):
            length = len(normalize(label, self.protocol, self.nfkc))
            self.by_length.setdefault(length, TextMetrics(self.protocol, self.nfkc)).update([prediction], [label])

    def result(self) -> dict[str, float | int | str | list]:
        """``{"protocol", "cer", "acc", "ned", "by_length": [{"length", "lines", "cer", "acc", "ned"}, ...]}``."""
        return {"protocol": self.all.protocol_name, **values(self.all), "by_length": [
            {"length": length, "lines": metrics.lines.item(), **values(metrics)}
            for length, metrics in sorted(self.by_length.items())]}


def values(metrics: TextMetrics) -> dict[str, float]:
    return {name: value.item() for name, value in metrics.compute().items()}


def evaluate(module: CRNNModule, dataset: LabelledLines, bad: BadInput, args: argparse.Namespace,
             total: Scores, errors: list[str]) -> dict[str, float | int | str | list]:
    """Metrics of one dataset (also added to ``total``); misread lines appended to ``errors`` as TSV rows."""
    scores, known = Scores(args.protocol, args.nfkc), set(module.charset.characters)
    decoder = decoder_from_args(args, module.charset)
    lines = unknown = unemittable = 0
    for start in range(0, len(dataset), args.batch_size):
        batch = [(index, image) for index in range(start, min(start + args.batch_size, len(dataset)))
                 if (image := dataset.image(index, bad)) is not None]  # decode failures go to ``bad``
        if not batch:
            continue
        recognised = recognize(module, [image for _, image in batch], decoder)
        labels = [dataset.records[index].label for index, _ in batch]
        predictions = [text for text, _ in recognised]
        scores.update(predictions, labels)
        total.update(predictions, labels)
        lines += len(batch)
        in_charset = [set(label) <= known for label in labels]
        unknown += in_charset.count(False)
        frames = module.model.output_lengths(torch.tensor([image.shape[-1] for _, image in batch])).tolist()
        unemittable += sum(not ok or have < need for ok, have, need in zip(in_charset, frames, label_frames(labels)))
        errors.extend(f"{dataset.records[index].where}\t{label}\t{text}\t{confidence:.4g}"
                      for (index, _), label, (text, confidence) in zip(batch, labels, recognised)
                      if normalize(text, args.protocol, args.nfkc) != normalize(label, args.protocol, args.nfkc))
    return {"lines": lines, "skipped": bad.num_skipped, "unknown_char_lines": unknown, "unemittable": unemittable,
            **scores.result()}


def describe(name: str, result: dict[str, float | int]) -> str:
    line = (f"{name}\tlines={result['lines']} cer={result['cer']:.4f} acc={result['acc']:.4f} "
            f"ned={result['ned']:.4f} protocol={result['protocol']}")
    if result.get("unemittable"):
        line += f" unemittable={result['unemittable']}"
    if result.get("skipped"):
        line += f" skipped={result['skipped']}"
    if result.get("unknown_char_lines"):
        line += f" (labels of {result['unknown_char_lines']} lines have characters outside the charset)"
    return line


def describe_lengths(result: dict) -> list[str]:
    """``--by-length``: one line per label length, ``  length=N<TAB>lines=... cer=... acc=... ned=...``."""
    return [f"  length={row['length']}\tlines={row['lines']} cer={row['cer']:.4f} acc={row['acc']:.4f} "
            f"ned={row['ned']:.4f}" for row in result["by_length"]]


def main(argv: list[str] | None = None) -> dict[str, dict[str, float | int]]:
    """Print and return ``{dataset: {"lines", "skipped", "unknown_char_lines", "unemittable", "protocol", "cer",
    "acc", "ned", "by_length"}}`` (plus ``"total"`` over several datasets); ``by_length`` lists
    ``{"length", "lines", "cer", "acc", "ned"}`` per label length (printed with ``--by-length``)."""
    args = parse_args(argv)
    module = load_recognizer(args.checkpoint, resolve_device(args.device))
    policy = dict.fromkeys(DATA_KINDS, "skip" if args.skip_bad else "error")
    results, total, errors = {}, Scores(args.protocol, args.nfkc), []
    for path in args.datasets:
        bad = BadInput(policy, skip_hint="pass --skip-bad to skip such samples")
        channels, height = module.input_format
        dataset = open_split(path, module.charset, height, channels, bad, require_emittable=False,  # the training
                             allow_outside_paths=args.allow_outside_paths)  # checks, minus what the model can emit
        try:
            results[path] = evaluate(module, dataset, bad, args, total, errors)
        finally:
            if isinstance(dataset, LmdbLines):
                dataset.close()
        print(describe(path, results[path]), flush=True)
        if args.by_length:
            print("\n".join(describe_lengths(results[path])), flush=True)
        if bad.num_skipped:
            print(bad.summary(f"  {path}", results[path]["lines"]), flush=True)
    if len(args.datasets) > 1:
        results["total"] = {"lines": sum(r["lines"] for r in results.values()),
                            "unemittable": sum(r["unemittable"] for r in results.values()), **total.result()}
        print(describe("total", results["total"]))
        if args.by_length:
            print("\n".join(describe_lengths(results["total"])))
    if args.errors:
        args.errors.write_text("".join(f"{row}\n" for row in ["where\tlabel\tprediction\tconfidence", *errors]),
                               encoding="utf-8")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
