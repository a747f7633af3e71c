"""Evaluate a checkpoint on labelled line images: CER, sequence accuracy and normalised edit distance.

Example::

    python scripts/evaluate.py --checkpoint outputs/RUN/checkpoints/last.ckpt /tmp/ds/test /tmp/ds_lmdb/test \\
        --decoder beam --errors errors.tsv

Each dataset is a ``gt.txt`` folder or an LMDB directory (the formats of ``data=folder`` / ``data=lmdb``),
preprocessed as in training. Every line counts, also those whose label has characters outside the model's
charset (the model cannot emit them: they count as errors, and their number is printed). Malformed ``gt.txt``
lines, empty labels and missing or unreadable images stop with an error naming the file and line; with
``--skip-bad`` they are skipped, counted and summarised instead. Prints one line per dataset (and a total
over several), ``--errors`` writes every misread line as ``where<TAB>label<TAB>prediction<TAB>confidence``,
``--json`` the metrics.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from crnn.inference import load_recognizer, recognize, resolve_device
from crnn.metrics import TextMetrics
from crnn.module import CRNNModule
from data import BadInput, LabelledLines, LmdbLines, open_split
from scripts.options import add_recognition_arguments, decoder_from_args

DATA_KINDS = ("missing_image", "unreadable_image", "malformed", "empty_label")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a training checkpoint (.ckpt)")
    parser.add_argument("datasets", nargs="+", help="gt.txt folders or LMDB directories")
    add_recognition_arguments(parser, batch_size=64)
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip (and count) malformed lines, empty labels, missing and unreadable images")
    parser.add_argument("--errors", type=Path, help="write every misread line here (TSV)")
    parser.add_argument("--json", type=Path, help="write the metrics here")
    return parser.parse_args(argv)


def evaluate(module: CRNNModule, dataset: LabelledLines, bad: BadInput, args: argparse.Namespace,
             total: TextMetrics, errors: list[str]) -> dict[str, float | int]:
    """Metrics of one dataset (also added to ``total``); misread lines appended to ``errors`` as TSV rows."""
    metrics, known, decoder = TextMetrics(), set(module.charset.characters), decoder_from_args(args, module.charset)
    lines = unknown = 0
    for start in range(0, len(dataset), args.batch_size):
        batch = [(index, image) for index in range(start, min(start + args.batch_size, len(dataset)))
                 if (image := dataset.image(index, bad)) is not None]  # decode failures go to ``bad``
        if not batch:
            continue
        recognised = recognize(module, [image for _, image in batch], decoder)
        labels = [dataset.records[index].label for index, _ in batch]
        predictions = [text for text, _ in recognised]
        metrics.update(predictions, labels)
        total.update(predictions, labels)
        lines += len(batch)
        unknown += sum(not set(label) <= known for label in labels)
        errors.extend(f"{dataset.records[index].where}\t{label}\t{text}\t{confidence:.4g}"
                      for (index, _), label, (text, confidence) in zip(batch, labels, recognised) if text != label)
    return {"lines": lines, "skipped": bad.num_skipped, "unknown_char_lines": unknown,
            **{name: value.item() for name, value in metrics.compute().items()}}


def describe(name: str, result: dict[str, float | int]) -> str:
    line = (f"{name}\tlines={result['lines']} cer={result['cer']:.4f} acc={result['acc']:.4f} "
            f"ned={result['ned']:.4f}")
    if result.get("skipped"):
        line += f" skipped={result['skipped']}"
    if result.get("unknown_char_lines"):
        line += f" (labels of {result['unknown_char_lines']} lines have characters outside the charset)"
    return line


def main(argv: list[str] | None = None) -> dict[str, dict[str, float | int]]:
    """Print and return ``{dataset: {"lines", "skipped", "unknown_char_lines", "cer", "acc", "ned"}}`` (plus
    ``"total"`` over several datasets)."""
    args = parse_args(argv)
    module = load_recognizer(args.checkpoint, resolve_device(args.device))
    policy = dict.fromkeys(DATA_KINDS, "skip" if args.skip_bad else "error")
    results, total, errors = {}, TextMetrics(), []
    for path in args.datasets:
        bad = BadInput(policy, skip_hint="pass --skip-bad to skip such samples")
        channels, height = module.input_format
        dataset = open_split(path, module.charset, height, channels, bad,
                             require_emittable=False)  # the training checks, minus what the model can emit
        try:
            results[path] = evaluate(module, dataset, bad, args, total, errors)
        finally:
            if isinstance(dataset, LmdbLines):
                dataset.close()
        print(describe(path, results[path]), flush=True)
        if bad.num_skipped:
            print(bad.summary(f"  {path}", results[path]["lines"]), flush=True)
    if len(args.datasets) > 1:
        results["total"] = {"lines": sum(r["lines"] for r in results.values()),
                            **{name: value.item() for name, value in total.compute().items()}}
        print(describe("total", results["total"]))
    if args.errors:
        args.errors.write_text("".join(f"{row}\n" for row in ["where\tlabel\tprediction\tconfidence", *errors]),
                               encoding="utf-8")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
