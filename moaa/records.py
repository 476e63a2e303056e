"""Rows of a data file as users bring them: JSON Lines (.jsonl, .ndjson, .json; gzip'd as .gz; a UTF-8 BOM
is ignored), a .json file holding one JSON array of rows (read whole), Parquet, or a folder written by
`datasets.save_to_disk` (the shapes the Hub's and TRL's datasets come in). The one reader of the pipeline's
prompts and the trainer's data."""
from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Any, Iterator

from moaa.errors import UserError
from moaa.jsonl import iter_lines, read_bytes

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
FORMATS = ".jsonl (or .jsonl.gz), .json, .parquet or a folder written by datasets' save_to_disk"


def records(path: str | Path, what: str, *, split: str | None = None,
            blanks: bool = False) -> Iterator[tuple[int, Any]]:
    """(row number, row) of a data file; for JSON Lines the number is the line's and a line that is not JSON
    comes as its JSONDecodeError (with `blanks`, a blank line as None), for the caller to name. `what` names
    the file in errors ("prompt", "data"); `split` picks a split of a saved DatasetDict."""
    path = Path(path)
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            return _iter_hf_folder(path, split)
        raise UserError(f"{path} is a folder but not a saved Hugging Face dataset (no dataset_info.json); give "
                        "one of its .jsonl or .parquet files, or a folder written by datasets' save_to_disk")
    if not path.exists():
        raise UserError(f"{what} file {path} does not exist")
    if path.suffix == ".parquet":
        return _iter_parquet(path)
    if path.suffix in JSON_SUFFIXES or (path.suffix == ".gz" and Path(path.stem).suffix in JSON_SUFFIXES):
        return _iter_json(path, blanks)
    raise UserError(f"{path}: unknown {what} format; use {FORMATS}")


def row_unit(path: str | Path) -> str:
    """What `records` numbers: "line" for JSON Lines, "row" for a JSON array, Parquet or a datasets folder."""
    path = Path(path)
    if path.is_dir() or path.suffix == ".parquet" or (path.is_file() and _is_json_array(path)):
        return "row"
    return "line"


def _is_json_array(path: Path) -> bool:
    return read_bytes(path, 4096).removeprefix(codecs.BOM_UTF8).lstrip().startswith(b"[")


def _iter_json(path: Path, blanks: bool) -> Iterator[tuple[int, Any]]:
    """JSON Lines by line; a file that is one JSON array (Alpaca's alpaca_data.json) by row number."""
    if _is_json_array(path):
        yield from enumerate(_json_array(path), 1)
        return
    yield from iter_lines(path, blanks=blanks)


def _json_array(path: Path) -> list:
    try:
        rows = json.loads(read_bytes(path).decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno}); give "
                        "JSON Lines (one object per line) or one JSON array of objects") from None
    return rows if isinstance(rows, list) else [rows]


def _iter_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a bad file
        raise UserError(f"cannot read Parquet file {path}: {err}") from None
    yield from enumerate(table.to_pylist(), 1)


def _iter_hf_folder(path: Path, split: str | None) -> Iterator[tuple[int, Any]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as err:
        raise UserError(f"cannot read the datasets folder {path}: {err}") from None
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds)
        pick = split or ("train" if "train" in ds else (names[0] if len(names) == 1 else None))
        if pick not in ds:
            raise UserError(f"{path} has splits {', '.join(names)}; choose one with --split, or give one "
                            f"split's folder ({path / names[0]})")
        ds = ds[pick]
    yield from enumerate(ds, 1)
