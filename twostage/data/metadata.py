"""The optional per-person metadata table (age, sex, weight, height) at a dataset root."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import TwostageError

METADATA_NAMES = ("meta_data.csv", "meta_data.xlsx")
_COLUMN_ALIASES = {"나이": "age", "성별": "sex", "체중": "weight", "몸무게": "weight", "키": "height",
                   "신장": "height", "gender": "sex"}


def _column_name(name: object) -> str:
    """'  Weight (kg)' -> 'weight'; Korean headers of the original table -> English."""
    text = str(name or "").strip().lower()
    for alias, english in _COLUMN_ALIASES.items():
        if text.startswith(alias):
            return english
    text = text.split("(")[0].strip()
    return "_".join(text.replace("-", " ").split())


def _person_id(value: object) -> str:
    """Folder-style person ID: 'ID001' stays, numbers 1 / '1' / 1.0 become 'ID001'."""
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        return text
    return f"ID{int(number):03d}" if number.is_integer() else text


def _cell(value: object) -> object:
    if not isinstance(value, str):
        return value
    text = value.strip()
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def load_metadata(root: str | os.PathLike) -> dict[str, dict]:
    """The optional per-person table (meta_data.csv or .xlsx at the dataset root), by ID.

    Column names are lower-cased with spaces as underscores ("Weight (kg)" -> "weight");
    numeric IDs become folder-style ("1" -> "ID001") so rows join `Sample.id`. Returns {} when
    there is no table. xlsx needs openpyxl (`pip install openpyxl` or `twostage[xlsx]`).
    """
    root = Path(root)
    candidates = [d / n for d in (root, root.parent) for n in METADATA_NAMES]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        return {}
    if path.suffix == ".csv":
        import csv

        try:
            with open(path, newline="", encoding="utf-8-sig") as f:
                rows = [r for r in csv.reader(f)]
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise TwostageError(f"{path}: cannot read metadata ({e})") from None
    else:
        try:
            import openpyxl
        except ImportError:
            raise TwostageError(f"{path}: reading .xlsx needs openpyxl: pip install openpyxl "
                                "(or twostage[xlsx]), or save the table as meta_data.csv") from None
        try:
            book = openpyxl.load_workbook(path, read_only=True, data_only=True)
            rows = [list(r) for r in book.worksheets[0].iter_rows(values_only=True)]
            book.close()
        except Exception as e:  # noqa: BLE001 - openpyxl raises many types for a bad file
            raise TwostageError(f"{path}: cannot read metadata ({e})") from None
    rows = [r for r in rows if any(c not in (None, "") for c in r)]
    if not rows:
        return {}
    header = [_column_name(c) for c in rows[0]]
    if "id" not in header:
        raise TwostageError(f"{path}: no ID column (columns: {', '.join(h for h in header if h)})")
    id_col = header.index("id")
    table: dict[str, dict] = {}
    for n, row in enumerate(rows[1:], start=2):
        if id_col >= len(row) or row[id_col] in (None, ""):
            continue
        pid = _person_id(row[id_col])
        if pid in table:
            raise TwostageError(f"{path}: row {n}: ID {pid} appears twice")
        table[pid] = {h: _cell(v) for h, v in zip(header, row) if h and h != "id"}
    return table
