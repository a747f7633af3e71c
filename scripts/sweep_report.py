"""Summarise a Hydra multirun (e.g. ``python train.py -m experiment=ablation_losses``) into a report.

    python scripts/sweep_report.py MULTIRUN_DIR [--out DIR] [--threshold 0.05] [--group-by loss]

Reads every run directory below ``MULTIRUN_DIR`` (any folder with a ``.hydra/overrides.yaml``):

- ``final_metrics.json`` (written by ``crnn.pipeline.train``): val/test CER and accuracy of the best checkpoint;
- ``csv/metrics.csv`` (the CSV logger): the ``val/cer`` curve over training steps and, where the
  ``crnn.callbacks.FitClock`` callback ran, ``time/fit_seconds`` next to it;
- ``test_predictions.tsv`` (``crnn.callbacks.PredictionWriter``), if present: per-character error rates;
- ``.hydra/overrides.yaml`` and ``.hydra/config.yaml``: what the run varied.

Runs are grouped into *variants* by their overrides minus ``seed`` and minus overrides shared by every run
(so ``loss=...`` for the bundled ablations; ``--group-by KEY`` picks keys explicitly). Writes ``report.md`` and
``val_cer.png`` (val CER vs step: mean over seeds per variant, band from the lowest to the highest seed;
log scale above 0.1 % CER and linear below, so a CER of 0 stays on the plot) to
``--out`` (default: ``MULTIRUN_DIR``) and prints the main table.

Per-character errors: each test line is aligned to its prediction by a minimum-edit-distance alignment; a
reference character is an error when the alignment substitutes or deletes it (insertions belong to no
reference character and are counted apart), so errors + insertions = edit distance and the per-character
rates are consistent with the CER. Characters are ranked by their frequency in the test references (pooled
over runs); the *frequent* group is the most frequent third of the charset, the *rare* group the least
frequent third. The per-character table is written when the run config skews character frequencies
(``data.zipf_exponent > 0`` or ``data.char_weights``) or with ``--per-char``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from crnn.callbacks import read_predictions

THRESHOLD = 0.05


# ---------------------------------------------------------------------------------------------- alignment
def align(ref: str, hyp: str) -> list[tuple[str, str | None, str | None]]:
    """A minimum-edit-distance alignment of ``hyp`` to ``ref`` (Levenshtein, unit costs).

    Returns operations in order, each ``(op, ref_char, hyp_char)`` with ``op`` one of ``"match"``,
    ``"sub"``, ``"del"`` (a reference character missing from ``hyp``; ``hyp_char`` is None) or
    ``"ins"`` (an extra ``hyp`` character; ``ref_char`` is None). The number of non-matches equals
    the edit distance. Among equally short alignments, the backtrace prefers match/sub, then deletion.
    """
    n, m = len(ref), len(hyp)
    dist = [list(range(m + 1))] + [[i] + [0] * m for i in range(1, n + 1)]
    for i in range(1, n + 1):
        row, prev = dist[i], dist[i - 1]
        for j in range(1, m + 1):
            row[j] = min(prev[j - 1] + (ref[i - 1] != hyp[j - 1]), prev[j] + 1, row[j - 1] + 1)
    ops = []
    i, j = n, m
    while i > 0 or j > 0:
        if i > 0 and j > 0 and dist[i][j] == dist[i - 1][j - 1] + (ref[i - 1] != hyp[j - 1]):
            ops.append(("match" if ref[i - 1] == hyp[j - 1] else "sub", ref[i - 1], hyp[j - 1]))
            i, j = i - 1, j - 1
        elif i > 0 and dist[i][j] == dist[i - 1][j] + 1:
            ops.append(("del", ref[i - 1], None))
            i -= 1
        else:
            ops.append(("ins", None, hyp[j - 1]))
            j -= 1
    return ops[::-1]


@dataclass
class CharErrors:
    """Per reference character: occurrences and errors (substituted or deleted); plus insertions."""

    count: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    insertions: int = 0

    @classmethod
    def of(cls, pairs: Iterable[tuple[str, str]]) -> CharErrors:
        """Tally ``(target, prediction)`` pairs."""
        tally = cls()
        for ref, hyp in pairs:
            for op, r, _ in align(ref, hyp):
                if op == "ins":
                    tally.insertions += 1
                    continue
                tally.count[r] += 1
                tally.errors[r] += op != "match"
        return tally

    def rate(self, chars: Iterable[str]) -> float:
        """Errors / occurrences pooled over ``chars`` (NaN if none occurs)."""
        chars = list(chars)
        total = sum(self.count[c] for c in chars)
        return sum(self.errors[c] for c in chars) / total if total else math.nan


def frequency_groups(count: Counter, charset: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
    """``(frequent, rare)``: the most and the least frequent third of the characters by ``count``
    (characters of ``charset`` that never occur count as rarest). Ties keep charset order."""
    chars = list(dict.fromkeys([*(charset or []), *count]))
    ranked = sorted(chars, key=lambda c: -count[c])
    third = max(1, len(ranked) // 3)
    return ranked[:third], ranked[-third:]


# --------------------------------------------------------------------------------------------------- runs
@dataclass
class Run:
    path: Path
    overrides: dict[str, str]
    config: dict
    metrics: dict | None
    curve: list[dict[str, float]]  # val rows: step, val/cer, (time/fit_seconds)
    predictions: list[tuple[str, str]] | None

    @property
    def seed(self) -> str:
        return self.overrides.get("seed", str(self.config.get("seed", "?")))

    def reach(self, threshold: float) -> tuple[float, float] | None:
        """``(step, fit seconds or NaN)`` of the first validation with val CER <= ``threshold``, else None."""
        for row in self.curve:
            if row["val/cer"] <= threshold:
                return row["step"], row.get("time/fit_seconds", math.nan)
        return None


def _read_curve(path: Path) -> list[dict[str, float]]:
    """The validation curve of a CSV logger's metrics.csv: rows ``{"step", "val/cer"[, "time/fit_seconds"]}``
    sorted by step, ``step`` being the number of training steps done (Lightning logs epoch-end validation
    at the 0-based index of the epoch's last step, hence + 1).

    Only validations during ``fit`` count: rows with ``time/fit_seconds`` if the FitClock callback ran, else
    rows of epochs that also logged ``train/loss`` (the later ``trainer.validate`` of the best checkpoint is
    logged in an epoch with no training)."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    val = [row for row in rows if row.get("val/cer")]
    if any(row.get("time/fit_seconds") for row in val):
        val = [row for row in val if row.get("time/fit_seconds")]
    else:
        trained = {row.get("epoch") for row in rows if row.get("train/loss")}
        val = [row for row in val if row.get("epoch") in trained]
    curve: dict[float, dict[str, float]] = {}
    for row in val:
        step = float(row["step"]) + 1
        entry = {"step": step, "val/cer": float(row["val/cer"])}
        if row.get("time/fit_seconds"):
            entry["time/fit_seconds"] = float(row["time/fit_seconds"])
        curve.setdefault(step, entry)
    return [curve[s] for s in sorted(curve)]


def load_runs(multirun_dir: Path) -> list[Run]:
    """Every run below ``multirun_dir`` (folders holding ``.hydra/overrides.yaml``), in path order."""
    runs = []
    for overrides_file in sorted(multirun_dir.rglob(".hydra/overrides.yaml")):
        run_dir = overrides_file.parent.parent
        overrides = dict(o.split("=", 1) for o in (yaml.safe_load(overrides_file.read_text()) or []) if "=" in o)
        config_file = run_dir / ".hydra" / "config.yaml"
        config = yaml.safe_load(config_file.read_text()) if config_file.exists() else {}
        metrics_file = run_dir / "final_metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else None
        curves = sorted(run_dir.rglob("metrics.csv"))
        runs.append(Run(run_dir, overrides, config or {}, metrics, _read_curve(curves[0]) if curves else [],
                        read_predictions(run_dir) or None))
    return runs


def variant_keys(runs: Sequence[Run], group_by: Sequence[str] | None = None) -> list[str]:
    """Override keys that tell variants apart: ``group_by``, else those varying across runs, minus ``seed``."""
    if group_by:
        return list(group_by)
    keys = dict.fromkeys(k for run in runs for k in run.overrides)
    return [k for k in keys if k != "seed" and len({run.overrides.get(k) for run in runs}) > 1]


def group(runs: Sequence[Run], keys: Sequence[str]) -> dict[str, list[Run]]:
    """Runs by variant label (``value`` for one key, ``k=v, ...`` for several), in first-seen order."""
    groups: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        values = [(k, run.overrides.get(k, "-")) for k in keys]
        label = values[0][1] if len(values) == 1 else ", ".join(f"{k}={v}" for k, v in values) or "all"
        groups[label].append(run)
    return dict(groups)


# ------------------------------------------------------------------------------------------------ summary
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fmt(values: Sequence[float], scale: float = 1.0, digits: int = 2, unit: str = "") -> str:
    """``mean ± std`` of the non-NaN values (``-`` if none)."""
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "-"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}{unit}"


def skewed(runs: Sequence[Run]) -> bool:
    """Whether the runs' data draws characters with skewed frequencies."""
    for run in runs:
        data = run.config.get("data") or {}
        if (data.get("zipf_exponent") or 0) > 0 or data.get("char_weights"):
            return True
    return False


def summary_rows(groups: dict[str, list[Run]], threshold: float, char_groups: tuple[list[str], list[str]] | None):
    """One dict of formatted cells per variant."""
    rows = []
    for label, runs in groups.items():
        done = [r for r in runs if r.metrics]
        reached = [r.reach(threshold) for r in done]
        hit = [x for x in reached if x is not None]
        row = {
            "variant": label,
            "runs": f"{len(done)}/{len(runs)}",
            "test CER %": fmt([r.metrics["test/cer"] for r in done], 100),
            "test acc %": fmt([r.metrics["test/acc"] for r in done], 100, 1),
            "val CER %": fmt([r.metrics["val/cer"] for r in done], 100),
            f"steps to val CER ≤ {threshold:.0%}": (fmt([s for s, _ in hit], 1, 0) if hit else "never")
            + (f" ({len(hit)}/{len(done)})" if hit and len(hit) < len(done) else ""),
            f"s to val CER ≤ {threshold:.0%}": fmt([t for _, t in hit], 1, 0) if hit else "-",
            "fit s": fmt([r.metrics["train_seconds"] for r in done], 1, 0),
        }
        if char_groups is not None:
            tallies = [CharErrors.of(r.predictions) for r in done if r.predictions]
            frequent, rare = char_groups
            row["frequent-char err %"] = fmt([t.rate(frequent) for t in tallies], 100)
            row["rare-char err %"] = fmt([t.rate(rare) for t in tallies], 100)
        rows.append(row)
    return rows


def markdown_table(rows: Sequence[dict[str, str]]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(row[h]) for h in header) + " |" for row in rows]
    return "\n".join(lines)


def per_char_table(groups: dict[str, list[Run]], ranked: Sequence[str], pooled: Counter) -> str:
    """Characters by test frequency (rows) x variants (columns): error rate mean over seeds, in %."""
    total = sum(pooled.values()) or 1
    labels = list(groups)
    tallies = {label: [CharErrors.of(r.predictions) for r in runs if r.predictions] for label, runs in groups.items()}
    lines = ["| char | share of test chars % | " + " | ".join(labels) + " |", "|" + "---|" * (len(labels) + 2)]
    for c in ranked:
        cells = []
        for label in labels:
            rates = [t.rate([c]) for t in tallies[label]]
            mean, _ = mean_std(rates)
            cells.append("-" if math.isnan(mean) else f"{100 * mean:.1f}")
        lines.append(f"| `{c}` | {100 * pooled[c] / total:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(groups: dict[str, list[Run]], path: Path, threshold: float, title: str) -> None:
    """val CER vs step: per variant the mean over seeds, and a band from the lowest to the highest seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    for label, runs in groups.items():
        by_step: dict[float, list[float]] = defaultdict(list)
        for run in runs:
            for row in run.curve:
                by_step[row["step"]].append(row["val/cer"])
        if not by_step:
            continue
        steps = sorted(by_step)
        values = [by_step[s] for s in steps]
        (line,) = ax.plot(steps, [statistics.fmean(v) for v in values], marker=".", label=f"{label} (n={len(runs)})")
        ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], color=line.get_color(), alpha=0.15)
    ax.axhline(threshold, color="grey", linestyle="--", linewidth=0.8)
    ax.set_yscale("symlog", linthresh=1e-3)  # log above 0.1 % CER, linear below: a CER of 0 stays visible
    ax.set_ylim(bottom=0)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation CER (symlog scale)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def report(multirun_dir: Path, out: Path | None = None, threshold: float = THRESHOLD,
           group_by: Sequence[str] | None = None, per_char: bool | None = None) -> str:
    """Write ``report.md`` and ``val_cer.png`` to ``out`` (default ``multirun_dir``); return the main table."""
    out = out or multirun_dir
    runs = load_runs(multirun_dir)
    if not runs:
        raise SystemExit(f"no runs (.hydra/overrides.yaml) below {multirun_dir}")
    keys = variant_keys(runs, group_by)
    groups = group(runs, keys)
    with_preds = [r for r in runs if r.predictions]
    per_char = skewed(runs) if per_char is None else per_char
    char_groups = pooled = None
    if per_char and with_preds:
        pooled = sum((CharErrors.of(r.predictions).count for r in with_preds), Counter())
        charset = (with_preds[0].config.get("data") or {}).get("charset")
        char_groups = frequency_groups(pooled, charset)
    rows = summary_rows(groups, threshold, char_groups)
    table = markdown_table(rows)

    out.mkdir(parents=True, exist_ok=True)
    plot(groups, out / "val_cer.png", threshold, multirun_dir.name if multirun_dir.name else str(multirun_dir))
    shared = {k: v for k, v in runs[0].overrides.items() if k not in keys and k != "seed"
              and all(r.overrides.get(k) == v for r in runs)}
    seeds = sorted({r.seed for r in runs}, key=str)
    text = [
        f"# Sweep report: `{multirun_dir}`",
        "",
        f"{len(runs)} runs ({sum(r.metrics is not None for r in runs)} finished); variants by "
        f"{', '.join(f'`{k}`' for k in keys) or '-'}; seeds {', '.join(seeds)}; shared overrides "
        f"{' '.join(f'`{k}={v}`' for k, v in shared.items()) or '-'}.",
        "",
        "Mean ± standard deviation over seeds. CER and accuracy: the checkpoint with the best validation CER, "
        "on the test set. Steps/seconds: first validation at or below the threshold (mean over the seeds that "
        "reached it; `(k/n)` if not all did); seconds are fit wall time including validation runs.",
    ]
    if char_groups:
        frequent, rare = char_groups
        total = sum(pooled.values())
        text += [
            "",
            f"Per-character error = substitutions + deletions of a reference character / its occurrences (minimum "
            f"edit-distance alignment). Frequent = the {len(frequent)} most frequent characters of the test "
            f"references (`{''.join(frequent)}`, {100 * sum(pooled[c] for c in frequent) / total:.1f} % of "
            f"characters), rare = the {len(rare)} least frequent (`{''.join(rare)}`, "
            f"{100 * sum(pooled[c] for c in rare) / total:.1f} %).",
        ]
    text += ["", table, "", "![val CER vs step](val_cer.png)", ""]
    failed = [r for r in runs if r.metrics is None]
    if failed:
        text += ["Runs without final_metrics.json (failed or unfinished):", ""]
        text += [f"- `{r.path}`: {' '.join(f'{k}={v}' for k, v in r.overrides.items())}" for r in failed] + [""]
    if char_groups:
        ranked = sorted(pooled, key=lambda c: -pooled[c])
        text += ["## Per-character test error rate (%), mean over seeds", "", per_char_table(groups, ranked, pooled), ""]
    text += ["## Runs", "", "| run | overrides | test CER % | val CER % | steps | fit s |", "|---|---|---|---|---|---|"]
    for r in runs:
        m = r.metrics or {}
        cells = [f"{100 * m['test/cer']:.2f}", f"{100 * m['val/cer']:.2f}", str(m["steps"]),
                 f"{m['train_seconds']:.0f}"] if m else ["-"] * 4
        text.append(f"| {r.path.relative_to(multirun_dir)} | {' '.join(f'{k}={v}' for k, v in r.overrides.items())} | "
                    + " | ".join(cells) + " |")
    (out / "report.md").write_text("\n".join(text) + "\n")
    return table


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("multirun_dir", type=Path, help="a Hydra sweep directory (hydra.sweep.dir)")
    parser.add_argument("--out", type=Path, default=None, help="where report.md and val_cer.png go (default: MULTIRUN_DIR)")
    parser.add_argument("--threshold", type=float, default=THRESHOLD, help="val CER for 'steps to reach' (default 0.05)")
    parser.add_argument("--group-by", nargs="+", default=None, metavar="KEY",
                        help="override keys that define a variant (default: those varying across runs, except seed)")
    parser.add_argument("--per-char", action=argparse.BooleanOptionalAction, default=None,
                        help="per-character error table (default: when the data skews character frequencies)")
    args = parser.parse_args(argv)
    table = report(args.multirun_dir, args.out, args.threshold, args.group_by, args.per_char)
    print(table)
    print(f"\nwrote {(args.out or args.multirun_dir) / 'report.md'} and val_cer.png", file=sys.stderr)


if __name__ == "__main__":
    main()
