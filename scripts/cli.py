"""``ctc-crnn <tool> [options]``: every script of ``scripts/`` as one installed command (``pyproject.toml``).

``ctc-crnn predict --checkpoint last.ckpt images/`` runs the same code as ``python scripts/predict.py ...``;
``ctc-crnn --help`` lists the tools, ``ctc-crnn <tool> --help`` a tool's options. Training stays
``python train.py`` (Hydra finds ``conf/`` beside it).
"""

from __future__ import annotations

import ast
import importlib.util
import runpy
import sys
from collections.abc import Sequence
from pathlib import Path

TOOLS = {  # command -> module of scripts/
    "predict": "predict",
    "evaluate": "evaluate",
    "render-dataset": "render_dataset",
    "show-augment": "show_augment",
    "make-lmdb": "make_lmdb",
    "train-char-lm": "train_char_lm",
    "export-onnx": "export_onnx",
    "plot-alignment": "plot_alignment",
    "sweep-report": "sweep_report",
    "bench-ctc": "bench_ctc",
    "bench-decode": "bench_decode",
}


def usage() -> str:
    """The command's help: one line per tool, from the first line of its module docstring."""
    width = max(map(len, TOOLS))
    lines = [f"  {name:<{width}}  {summary(module)}" for name, module in TOOLS.items()]
    head = "usage: ctc-crnn <tool> [options]   (ctc-crnn <tool> --help for a tool's options)"
    return "\n".join([head, "", "tools:", *lines])


def summary(module: str) -> str:
    """First line of a tool's docstring, read without importing it (importing torch for --help is slow)."""
    source = Path(importlib.util.find_spec(f"scripts.{module}").origin).read_text(encoding="utf-8")
    return ast.get_docstring(ast.parse(source)).splitlines()[0].replace("``", "")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the tool ``argv[0]`` with the options ``argv[1:]`` as ``python scripts/<tool>.py`` would (its
    ``__main__`` block, so also its exit status); returns 0 after a tool that does not exit itself. No tool or
    an unknown one prints the list and returns 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(usage())
        return 0
    module = TOOLS.get(argv[0].replace("_", "-")) if argv else None
    if module is None:
        print((f"ctc-crnn: unknown tool {argv[0]!r}\n\n" if argv else "") + usage(), file=sys.stderr)
        return 2
    saved, sys.argv = sys.argv, [f"ctc-crnn {argv[0]}", *argv[1:]]  # argparse names the tool in its usage
    try:
        runpy.run_module(f"scripts.{module}", run_name="__main__")
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
