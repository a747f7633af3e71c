"""LMDB line datasets in the layout of deep-text-recognition-benchmark and parseq: read, write, and a DataModule.

Keys (ASCII bytes): ``num-samples`` (decimal count ``N``), and for ``i`` in ``1..N`` ``image-%09d`` (the
encoded image file's bytes, any format Pillow reads) and ``label-%09d`` (UTF-8 text).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import lmdb
from PIL import Image

from data.bad_input import BadInput, BadInputError
from data.charset import Charset
from data.labelled import LabelledDataModule, LabelledLines, Record


def open_lmdb(path: str | os.PathLike) -> lmdb.Environment:
    """Open an LMDB directory read-only without locking (safe for concurrent readers of a static dataset)."""
    if not Path(path, "data.mdb").is_file():
        raise FileNotFoundError(f"no LMDB dataset (data.mdb) in {path}")
    return lmdb.open(str(path), readonly=True, lock=False, readahead=False, meminit=False)


_SHARED: dict[str, tuple[int, lmdb.Environment]] = {}  # realpath -> (pid that opened it, environment)


def shared_lmdb(path: str | os.PathLike) -> lmdb.Environment:
    """This process's read-only environment for ``path``, opened on first use and then shared.

    py-lmdb refuses to open one path twice in a process, so every reader of a dataset (label reading, the
    datasets of several runs in one process, e.g. an in-process sweep) shares one environment. One inherited
    from the parent by a forked process (a DataLoader worker) is closed there and reopened: closing a
    read-only, lock-free environment only releases the child's own mapping and file descriptor.
    """
    key, pid = os.path.realpath(path), os.getpid()
    opened = _SHARED.get(key)
    if opened is not None and opened[0] == pid:
        return opened[1]
    if opened is not None:
        opened[1].close()
    env = open_lmdb(path)
    _SHARED[key] = (pid, env)
    return env


def close_lmdb(path: str | os.PathLike) -> None:
    """Close this process's shared environment for ``path``, if open (the next reader reopens it)."""
    opened = _SHARED.pop(os.path.realpath(path), None)
    if opened is not None and opened[0] == os.getpid():
        opened[1].close()


def read_lmdb_labels(path: str | os.PathLike, bad: BadInput | None = None) -> list[Record]:
    """The records of an LMDB dataset: ``where`` is ``PATH:label-%09d``, ``key`` the 1-based index.

    A label key that is missing or not UTF-8 is reported to ``bad`` as ``malformed`` (``None``: raise);
    a missing or non-numeric ``num-samples`` always raises :class:`BadInputError`.
    """
    bad = bad if bad is not None else BadInput()
    records = []
    with shared_lmdb(path).begin() as txn:
        count = txn.get(b"num-samples")
        if count is None or not count.strip().isdigit():
            raise BadInputError(f"{path}: 'num-samples' is missing or not a number ({count!r})")
        for index in range(1, int(count) + 1):
            key = f"label-{index:09d}"
            where = f"{path}:{key}"
            raw = txn.get(key.encode())
            if raw is None:
                bad.report("malformed", where, f"no {key} although num-samples is {int(count)}")
                continue
            try:
                records.append(Record(where, raw.decode("utf-8"), index))
            except UnicodeDecodeError as err:
                bad.report("malformed", where, f"label is not UTF-8 ({err})")
    return records


def write_lmdb(samples: Iterable[tuple[bytes, str]], output: str | os.PathLike, map_size: int = 1 << 40) -> int:
    """Write ``(encoded image bytes, label)`` pairs as an LMDB dataset at ``output``; returns the count.

    ``map_size`` only reserves address space (the file grows with the data on Linux and macOS).
    """
    Path(output).mkdir(parents=True, exist_ok=True)
    count = 0
    with lmdb.open(str(output), map_size=map_size) as env, env.begin(write=True) as txn:
        for count, (image, label) in enumerate(samples, start=1):
            txn.put(f"image-{count:09d}".encode(), image)
            txn.put(f"label-{count:09d}".encode(), label.encode("utf-8"))
        txn.put(b"num-samples", str(count).encode())
    return count


class LmdbLines(LabelledLines):
    """:class:`LabelledLines` whose keys are 1-based indices into the LMDB dataset at ``path``.

    Images are read through this process's shared environment (:func:`shared_lmdb`), opened lazily in each
    process that reads, DataLoader workers included; nothing of it is pickled.
    """

    marker = "data.mdb"

    def __init__(self, path: str, records: list[Record], charset: Charset, height: int = 32, channels: int = 1) -> None:
        super().__init__(records, charset, height, channels)
        self.path = path

    @classmethod
    def read_records(cls, path: str | os.PathLike, bad: BadInput) -> list[Record]:
        return read_lmdb_labels(path, bad)

    @classmethod
    def from_records(cls, path: str | os.PathLike, records: list[Record], charset: Charset, height: int = 32,
                     channels: int = 1) -> LmdbLines:
        return cls(str(path), records, charset, height, channels)

    def close(self) -> None:
        """Close this process's environment for the dataset (it is reopened on the next read)."""
        close_lmdb(self.path)

    def screen(self, bad: BadInput, output_length: Callable[[int], int] | None = None,
               require_emittable: bool = True) -> LmdbLines:
        """:meth:`LabelledLines.screen`, then close the environment, so that forked DataLoader workers
        inherit none."""
        try:
            return super().screen(bad, output_length, require_emittable)
        finally:
            self.close()

    def open_image(self, key: int) -> Image.Image:
        with shared_lmdb(self.path).begin() as txn:
            data = txn.get(f"image-{key:09d}".encode())
        if data is None:
            raise FileNotFoundError(f"no key image-{key:09d} in {self.path}")
        return Image.open(io.BytesIO(data))


class LmdbDataModule(LabelledDataModule):
    """Train/val/test LMDB directories (``train_dir`` etc.); all arguments as :class:`LabelledDataModule`."""

    lines = LmdbLines
