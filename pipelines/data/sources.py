"""Where a dataset's rows come from: a Parquet file, a JSON Lines file (``.jsonl``, ``.jsonl.gz``), a
folder written by ``datasets``' ``save_to_disk``, or a dataset of the Hugging Face hub by id.

A source is one string in a pipeline's ``data`` section:

* ``path/to/file.parquet``, ``path/to/file.jsonl``, ``path/to/file.jsonl.gz``: read with pyarrow, in
  record batches, only the columns asked for;
* ``path/to/folder``: a ``Dataset.save_to_disk`` folder (Arrow files, memory-mapped by ``datasets``);
* ``hub:ORG/NAME`` or ``hub:ORG/NAME:SPLIT`` (default split ``train``; any split expression
  ``datasets`` takes, e.g. ``train_prefs[:2000]``): ``datasets.load_dataset``. A local folder of data
  files works the same way (``hub:./my_data:train``), which is how the tests reach this path with no
  network.

Every error names the source, and the column and row where there is one.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from pipelines.errors import DataError

HUB = "hub:"
FILE_KINDS = {".parquet": "parquet", ".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".json": "jsonl"}
BATCH_ROWS = 8192
# pyarrow's JSON reader infers one type per column from a block of rows: large blocks let it see
# enough rows before it decides, and a later row of another type is an error naming the row.
JSON_BLOCK_BYTES = 16 << 20


def kind_of(source: str | Path) -> str:
    """``parquet``, ``jsonl``, ``saved`` (a ``save_to_disk`` folder) or ``hub``."""
    source = str(source)
    if source.startswith(HUB):
        return "hub"
    path = Path(source)
    if path.is_dir():
        return "saved"
    name = path.name.lower()
    for suffix, kind in sorted(FILE_KINDS.items(), key=lambda kv: -len(kv[0])):
        if name.endswith(suffix):
            return kind
    raise DataError(f"{source}: unknown data source; give a .parquet, .jsonl, .jsonl.gz or .json file, a folder "
                    f"saved with datasets' save_to_disk, or hub:ORG/NAME[:SPLIT]")


def check(source: str, what: str) -> str:
    """The source's kind, after checking that a file or folder source exists."""
    kind = kind_of(source)
    if kind in ("parquet", "jsonl") and not Path(source).is_file():
        raise DataError(f"{source}: {what} file not found")
    if kind == "saved" and not (Path(source) / "dataset_info.json").is_file():
        raise DataError(f"{source}: a folder but not one written by datasets' save_to_disk (no dataset_info.json)")
    return kind


def _dataset(source: str, kind: str) -> Any:
    """The ``datasets.Dataset`` of a ``saved`` or ``hub`` source."""
    import datasets

    try:
        if kind == "saved":
            ds = datasets.load_from_disk(source)
        else:
            ident, _, split = source[len(HUB):].partition(":")
            ds = datasets.load_dataset(ident, split=split or "train")
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise DataError(f"{source}: cannot load the dataset ({str(exc).splitlines()[0]})") from None
    if isinstance(ds, datasets.DatasetDict):
        raise DataError(f"{source}: holds the splits {sorted(ds)}; point at one split's folder "
                        f"({Path(source) / sorted(ds)[0]})")
    return ds


def _json_reader(source: str) -> Any:
    try:
        return pa_json.open_json(source, read_options=pa_json.ReadOptions(block_size=JSON_BLOCK_BYTES))
    except pa.ArrowInvalid as exc:
        raise DataError(f"{source}: not valid JSON Lines ({_json_error(source, exc)})") from None


def _json_kind(value: Any) -> str:
    for kind, types in (("a boolean", bool), ("a number", (int, float)), ("a string", str), ("a list", list)):
        if isinstance(value, types):
            return kind
    return "an object"


def _json_error(source: str, exc: Exception) -> str:
    """Where Arrow's JSON reader failed, as an editor shows it: the 1-based line, and the field whose
    type changed from the one its first line gave it (Arrow's own message counts rows from 0 within a
    block). Read line by line: memory stays flat."""
    first: dict[str, tuple[str, int]] = {}
    with (gzip.open if source.endswith(".gz") else open)(source, "rt", encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as bad:
                return f"line {number}: not JSON ({bad.msg})"
            if not isinstance(row, dict):
                return f"line {number}: not a JSON object"
            for name, value in row.items():
                if value is None:
                    continue
                kind, seen = first.setdefault(name, (_json_kind(value), number))
                if _json_kind(value) != kind:
                    return f"line {number}: field {name!r} is {_json_kind(value)}, where line {seen} has {kind}"
    return _arrow_message(exc)


def _arrow_message(exc: Exception) -> str:
    return str(exc).splitlines()[0].removeprefix("JSON parse error: ")


def column_names(source: str, what: str) -> list[str]:
    """The columns of a source, read without its rows where the format allows."""
    kind = check(source, what)
    try:
        if kind == "parquet":
            return pq.read_schema(source).names
        if kind == "jsonl":
            return _json_reader(source).schema.names
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{source}: not a readable {kind} file ({_arrow_message(exc)})") from None
    return list(_dataset(str(source), kind).column_names)


def batches(source: str, columns: list[str], what: str, batch_rows: int | None = None) -> Iterator[pa.RecordBatch]:
    """The named columns in record batches of at most ``batch_rows`` rows (default ``BATCH_ROWS``), in
    file order; memory stays within a batch (a JSON block) whatever the number of rows."""
    kind = check(source, what)
    batch_rows = batch_rows or BATCH_ROWS
    try:
        if kind == "parquet":
            yield from pq.ParquetFile(source).iter_batches(batch_size=batch_rows, columns=columns)
        elif kind == "jsonl":
            for batch in _json_reader(source):
                batch = batch.select(columns)
                for start in range(0, batch.num_rows, batch_rows):
                    yield batch.slice(start, batch_rows)
        else:
            yield from _dataset(str(source), kind).data.table.select(columns).to_batches(max_chunksize=batch_rows)
    except (pa.ArrowInvalid, OSError) as exc:
        why = _json_error(source, exc) if kind == "jsonl" else _arrow_message(exc)
        raise DataError(f"{source}: cannot read {what} ({why})") from None


def read_columns(source: str, columns: list[str], what: str, limit: int | None = None) -> dict[str, list[Any]]:
    """The named columns as Python lists (at most ``limit`` rows), read batch by batch."""
    out: dict[str, list[Any]] = {c: [] for c in columns}
    rows = 0
    for batch in batches(source, columns, what):
        take = batch if limit is None else batch.slice(0, limit - rows)
        for name, column in zip(columns, take.columns, strict=True):
            out[name] += column.to_pylist()
        rows += take.num_rows
        if limit is not None and rows >= limit:
            break
    return out


def texts(source: str) -> Iterator[str]:
    """Every text in a data file, batch by batch (memory flat): its string columns' values and its
    conversations' message contents (what a tokenizer is trained on: ``init_model``)."""
    import pyarrow.compute as pc

    for batch in batches(source, column_names(source, "texts"), "texts"):
        for column in batch.columns:
            if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
                item = column.type.value_type
                if not (pa.types.is_struct(item) and item.get_field_index("content") >= 0):
                    continue
                column = pc.list_flatten(column).field("content")
            if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
                yield from (text for text in column.to_pylist() if text)
