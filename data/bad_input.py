"""What to do with bad samples in real data: stop with a clear error, or skip them, counted and summarised.

Every problem has a *kind* and a policy, ``"error"`` or ``"skip"``. By default a broken dataset is an error
(``malformed``, ``empty_label``, ``missing_image``, ``unreadable_image``), while samples a given charset or
model cannot handle are skipped and counted (``unknown_char``, ``too_long``, ``too_wide``), the filtering
deep-text-recognition-benchmark and parseq apply:

- ``malformed``: a ``gt.txt`` line that is not ``path<TAB>label`` (no tab, several tabs, empty path, not
  UTF-8) or whose path leaves the dataset folder (absolute or ``..``; unless ``data.allow_outside_paths``), or an
  LMDB label key that is missing or not UTF-8;
- ``empty_label``: an empty label;
- ``unknown_char``: a label character outside the charset;
- ``missing_image``: an image file / LMDB image key that does not exist;
- ``unreadable_image``: an image Pillow cannot identify or ``verify()`` at setup, or cannot decode when a batch
  is read (after passing that check: e.g. corrupt pixel data behind valid checksums);
- ``too_long``: a label the model cannot emit at the image's width: CTC needs at least
  ``len(label) + repeats`` frames (a blank must separate a repeated character);
- ``too_wide``: an image wider than ``data.max_width`` px once resized to the data height (it would pad its
  whole batch to its width).

An error names the sample (``path/gt.txt:LINE``, or ``lmdb_dir:label-%09d``) and the config key that
would skip it; skips are counted per kind and logged with the first few examples.
"""

from __future__ import annotations

from collections.abc import Mapping

KINDS = ("malformed", "empty_label", "unknown_char", "missing_image", "unreadable_image", "too_long", "too_wide")
POLICIES = ("error", "skip")
DEFAULT_POLICY = {kind: "skip" if kind in ("unknown_char", "too_long", "too_wide") else "error" for kind in KINDS}


class BadInputError(ValueError):
    """A bad sample under the ``error`` policy; the message names where it is and what is wrong."""


class BadInput:
    """The problems of one pass over one data source (e.g. one split), under a per-kind policy.

    Args:
        policy: kind -> ``"error"`` or ``"skip"``; kinds left out get :data:`DEFAULT_POLICY`. Unknown kinds or
            policies raise ``ValueError`` (so a typo in ``data.bad_input`` is not silently ignored).
        examples: skipped samples quoted per kind in :meth:`summary`.
        skip_hint: how to skip such samples instead, ``{kind}`` replaced, appended to every error.
    """

    def __init__(self, policy: Mapping[str, str] | None = None, examples: int = 3,
                 skip_hint: str = "set data.bad_input.{kind}=skip to skip such samples") -> None:
        policy = dict(policy or {})
        unknown = set(policy) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown bad-input kinds {sorted(unknown)}; expected some of {list(KINDS)}")
        wrong = {kind: value for kind, value in policy.items() if value not in POLICIES}
        if wrong:
            raise ValueError(f"bad-input policies must be one of {list(POLICIES)}, got {wrong}")
        self.policy = {**DEFAULT_POLICY, **policy}
        self.examples = examples
        self.skip_hint = skip_hint
        self.skipped: dict[str, list[str]] = {kind: [] for kind in KINDS}

    def report(self, kind: str, where: str, what: str) -> None:
        """A bad sample: raise :class:`BadInputError` (policy ``error``) or record it as skipped."""
        if self.policy[kind] == "error":
            raise BadInputError(f"{where}: {what} [{kind}; {self.skip_hint.format(kind=kind)}]")
        self.skipped[kind].append(f"{where}: {what}")

    @property
    def num_skipped(self) -> int:
        return sum(map(len, self.skipped.values()))

    def summary(self, name: str, kept: int) -> str:
        """One line: how many samples of ``name`` were kept and skipped, per kind, with examples."""
        parts = [
            f"{kind} {len(items)} (e.g. {'; '.join(items[: self.examples])})"
            for kind, items in self.skipped.items()
            if items
        ]
        return f"{name}: kept {kept} samples, skipped {self.num_skipped}" + (": " + ", ".join(parts) if parts else "")
