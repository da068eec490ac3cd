"""Data sets: the bundled diabetes data, CSV files, and the demo split.

A CSV has a header row naming the columns; the last column is the target.
Every cell must be a finite number. The text is UTF-8, with or without the
byte-order mark that spreadsheets write (which would otherwise become part of
the first column's name, and no job would match it). A bad file is refused with a
:class:`DataError` whose one-line message names the file, row and column.
"""

from __future__ import annotations

import csv
import importlib.util
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np


#: CSV files are UTF-8; a byte-order mark, if any, is not part of the first column's name.
ENCODING = "utf-8-sig"


class DataError(ValueError):
    """A data set that cannot be used, with where and why."""


@dataclass(frozen=True)
class Dataset:
    """Named feature columns, a named target, and the rows."""

    features: tuple[str, ...]
    target: str
    X: np.ndarray
    y: np.ndarray

    @property
    def columns(self) -> tuple[str, ...]:
        return (*self.features, self.target)

    def table(self) -> np.ndarray:
        """Features and target side by side."""
        return np.column_stack([self.X, self.y])

    def take(self, index: np.ndarray) -> "Dataset":
        """The rows at ``index``."""
        return Dataset(self.features, self.target, self.X[index], self.y[index])


DIABETES_FEATURES = ("age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6")


def load_diabetes() -> Dataset:
    """scikit-learn's diabetes data (442 rows, 10 features), shipped with the package.

    Read from scikit-learn's own data files and scaled as ``sklearn.datasets.load_diabetes``
    scales them (centred, divided by the standard deviation and by ``sqrt(rows)``; the test
    suite checks the two agree bit for bit), without importing scikit-learn: that import
    alone costs most of a second of every demo's start.
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the diabetes data set needs scikit-learn installed")
    folder = Path(spec.submodule_search_locations[0]) / "datasets" / "data"
    X = np.loadtxt(folder / "diabetes_data_raw.csv.gz")
    y = np.loadtxt(folder / "diabetes_target.csv.gz")
    mean, std = np.nanmean(X, axis=0), np.nanstd(X, axis=0)
    X = (X - mean) / std / len(X) ** 0.5
    return Dataset(DIABETES_FEATURES, "progression", X, y.astype(float))


def _cell(path: Path, row: int, col: int, name: str, text: str) -> float:
    where = f"{path}: row {row}, column {col + 1} ({name})"
    if text.strip() == "":
        raise DataError(f"{where}: missing value")
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"{where}: not a number: {text.strip()[:40]!r}") from None
    if not math.isfinite(value):
        raise DataError(f"{where}: not a finite number: {text.strip()!r}")
    return value


def load_csv(path: str | Path) -> Dataset:
    """Read and check a CSV; the last column is the target.

    A well-formed file is parsed by numpy in C (a million rows in a few
    seconds); anything numpy refuses, or any non-finite value, is read again
    cell by cell for an error that names the row and column.
    """
    path = Path(path)
    fast = _load_fast(path)
    if fast is not None:
        return fast
    return _load_checked(path)


def _header_problem(header: list[str]) -> str:
    """What is wrong with a header row, or "" if nothing is."""
    if len(header) < 2:
        return f"need at least two columns (features and a target), got {len(header)}"
    if len(set(header)) != len(header) or any(h == "" for h in header):
        return "column names must be non-empty and distinct"
    return ""


def _load_fast(path: Path) -> Dataset | None:
    try:
        with path.open(newline="", encoding=ENCODING) as handle:
            header = next(csv.reader(handle), None)
            if header is None:
                return None
            header = [h.strip() for h in header]
            if _header_problem(header):
                return None
            with warnings.catch_warnings():  # a header-only file: the checked reader says so
                warnings.simplefilter("ignore", UserWarning)
                table = np.loadtxt(handle, delimiter=",", dtype=float, ndmin=2)
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if table.shape[0] == 0 or table.shape[1] != len(header) or not np.isfinite(table).all():
        return None
    return Dataset(tuple(header[:-1]), header[-1], table[:, :-1], table[:, -1])


def _load_checked(path: Path) -> Dataset:
    try:
        handle = path.open(newline="", encoding=ENCODING)
    except OSError as exc:
        raise DataError(f"{path}: cannot open: {exc.strerror}") from None
    try:
        with handle:
            header, rows = _checked_rows(path, csv.reader(handle))
    except UnicodeDecodeError:
        raise DataError(_not_utf8(path)) from None
    table = np.array(rows, dtype=float)
    return Dataset(tuple(header[:-1]), header[-1], table[:, :-1], table[:, -1])


def _checked_rows(path: Path, reader) -> tuple[list[str], list[list[float]]]:
    """The header and the rows, each cell checked; the first problem raised with its row and column."""
    header = next(reader, None)
    if header is None:
        raise DataError(f"{path}: empty file")
    header = [h.strip() for h in header]
    problem = _header_problem(header)
    if problem:
        raise DataError(f"{path}: row 1: {problem}")
    rows = []
    for number, record in enumerate(reader, start=2):
        if not record or all(c.strip() == "" for c in record):
            continue
        if len(record) != len(header):
            raise DataError(f"{path}: row {number}: {len(record)} cells, header has {len(header)}")
        rows.append([_cell(path, number, i, header[i], c) for i, c in enumerate(record)])
    if not rows:
        raise DataError(f"{path}: no data rows after the header")
    return header, rows


def _not_utf8(path: Path) -> str:
    """Where a file stops being UTF-8 (the reader decodes in blocks, so it cannot say which row)."""
    data = path.read_bytes()
    try:
        data.decode(ENCODING)
        return f"{path}: not UTF-8 text"
    except UnicodeDecodeError as exc:
        row = data.count(b"\n", 0, exc.start) + 1
        return f"{path}: row {row}: not UTF-8 text (byte 0x{data[exc.start]:02x}); save the file as UTF-8"


def load(name: str) -> Dataset:
    """``diabetes`` or a CSV path."""
    return load_diabetes() if name == "diabetes" else load_csv(name)


def demo_split(data: Dataset, parts: int) -> list[Dataset]:
    """Rows shuffled with seed 0 and cut into ``parts`` near-equal parts (DESIGN §5)."""
    if parts < 2 or parts > len(data.y):
        raise DataError(f"cannot split {len(data.y)} rows into {parts} parts")
    order = np.random.default_rng(0).permutation(len(data.y))
    return [data.take(index) for index in np.array_split(order, parts)]


def write_csv(data: Dataset, path: str | Path) -> None:
    """Write a data set as a CSV that :func:`load_csv` reads back exactly."""
    with Path(path).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(data.columns)
        for row in data.table():
            writer.writerow([repr(float(v)) for v in row])
