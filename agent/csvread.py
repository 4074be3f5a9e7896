"""Read a CSV file of dies as batches of (die ids, float32 rows), streaming, at C speed.

`edgefleet agent predict --file` screens files of thousands of 512-parameter dies; reading the
text is most of its work. The file is read in chunks of whole lines (256 KB to 8 MB: memory
stays bounded whatever the file's size), and each chunk is parsed by one of two engines:

- `polars` (the `screen` extra, `pip install edgefleet[screen]`): its CSV reader parses a chunk in
  Rust, without the GIL, at ~40-60 ns per value; used when installed, for files of 8 MB and
  more (importing it costs ~0.15 s).
- `orjson` (the device's base install): the chunk's rows rewritten as one JSON array of arrays
  and parsed by orjson, ~90-130 ns per value with the numpy conversion.

(Figures: a 2-core VM under load, bench/file_screen_bench.py.) Either engine gives up on a
chunk it cannot vouch for (text cells, blank lines, a short or long row; for orjson also any
quote), and the csv module then reads that chunk cell by cell
(`_exact_rows`): every engine gives the same ids and float32 values (a value is parsed to
float64, as Python's float() does, then rounded to float32), and a bad cell is refused with its
file, line and column. A missing value is an empty cell, `nan`, `null` or `na` (any case).

Die ids come from the --id-column column as text (quotes removed, as the csv module reads
them); a file without that column numbers its dies by their data row (1 for the first).
"""

from __future__ import annotations

import csv
import importlib.util
import io
import math
import os
import queue
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

from agent.errors import UsageError

# whole lines up to this size per parse: polars costs ~1 ms a call, so large chunks (8 MB,
# ~1500 dies of 512 parameters); orjson is fastest on smaller ones (cache)
CHUNK_BYTES = {"polars": 8 << 20, "orjson": 256 << 10}
MISSING = ("nan", "null", "na")  # besides the empty cell, in any case
_QUOTED = re.compile(rb'"[^"]*"')


@dataclass(frozen=True)
class Layout:
    """Where a file's die ids and the model's parameters are: column indices in the header."""

    path: Path
    header: list[str]
    id_col: int | None
    cols: list[int]  # the model's feature order


def engines() -> list[str]:
    """The engines this install has, fastest first; EDGEFLEET_CSV_READER=orjson (or polars)
    names the one to use."""
    have = ["orjson"]
    if importlib.util.find_spec("polars") is not None:  # found, not imported (~0.15 s)
        have.insert(0, "polars")
    chosen = os.environ.get("EDGEFLEET_CSV_READER")
    if chosen is None:
        return have
    if chosen not in have:
        raise UsageError(f"EDGEFLEET_CSV_READER={chosen}: this install reads CSV with "
                         f"{' or '.join(have)}", hint="polars: pip install 'edgefleet[screen]'")
    return [chosen]


def read_batches(path: Path, id_column: str, names: list[str] | None, n: int, batch: int,
                 engine: str | None = None, on_read: Callable[[int], None] | None = None
                 ) -> Iterator[tuple[list[str], np.ndarray]]:
    """Yield (die ids, float32 rows (k, n)) of `batch` dies (the last batch may be shorter).
    Columns are the model's feature `names` when the header has them all, else every column
    but the id (there must be `n`). `on_read(bytes)` is told each chunk's size as it is read."""
    if not path.is_file():
        raise UsageError(f"cannot read {path}: no such file")
    engine = engine or engine_for(path.stat().st_size)
    parse = {"polars": _polars_rows, "orjson": _fast_rows}[engine]
    with open(path, "rb") as f:
        layout = _layout(path, f.readline(), id_column, names, n)
        if on_read:
            on_read(f.tell())
        ids: list[str] = []
        rows: list[np.ndarray] = []
        held = 0
        for line_no, k, chunk in _chunks(f, CHUNK_BYTES[engine]):
            if on_read:
                on_read(len(chunk))
            block = parse(chunk, layout, line_no, k) or _exact_rows(chunk, layout, line_no)
            ids += block[0]
            rows.append(block[1])
            held += len(block[1])
            while held >= batch:
                x = np.concatenate(rows) if len(rows) > 1 else rows[0]
                yield ids[:batch], x[:batch]
                ids, rows, held = ids[batch:], [x[batch:]], held - batch
        if held:
            yield ids, np.concatenate(rows)


def engine_for(size: int) -> str:
    """The fastest engine for a file of `size` bytes: importing polars costs ~0.15 s of CPU,
    which a file smaller than one polars chunk does not win back."""
    have = engines()
    return have[0] if size >= CHUNK_BYTES["polars"] or len(have) == 1 else "orjson"


def prefetched(items: Iterator, depth: int = 2) -> Iterator:
    """`items`, produced by a thread up to `depth` ahead: the next batch is parsed (polars runs
    without the GIL) while this thread sends the last one and reads answers. An exception in
    the producer is raised here, in order."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(item, error=None) -> bool:
        while not stop.is_set():  # the consumer may have stopped reading
            try:
                q.put((item, error), timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(end)
        except BaseException as e:  # handed to the consumer, which raises it
            put(end, e)

    t = threading.Thread(target=produce, name="csv-reader", daemon=True)
    t.start()
    try:
        while True:
            item, error = q.get()
            if error is not None:
                raise error
            if item is end:
                return
            yield item
    finally:
        stop.set()
        t.join(timeout=5)


def _layout(path: Path, first: bytes, id_column: str, names: list[str] | None, n: int) -> Layout:
    try:
        header = next(csv.reader([first.decode("utf-8-sig")]), None)  # -sig: a BOM is not text
    except UnicodeDecodeError:
        raise UsageError(f"{path}:1: the header is not UTF-8 text") from None
    if not header:
        raise UsageError(f"{path} is empty", hint="the first line must be a header")
    pos = {h: i for i, h in enumerate(header)}
    id_col = pos.get(id_column)
    if names and all(nm in pos for nm in names):
        cols = [pos[nm] for nm in names]
    else:
        cols = [i for i in range(len(header)) if i != id_col]
        if len(cols) != n:
            raise UsageError(
                f"{path}: the header names {len(cols)} parameter columns and not the model's "
                f"feature names; the agent expects {n}",
                hint="name columns as in the model (edgefleet agent info) or give exactly "
                f"{n} columns")
    return Layout(path, header, id_col, cols)


def _chunks(f, size: int) -> Iterator[tuple[int, int, bytes]]:
    """(line number of its first line, its line count, whole lines of about `size` bytes) to
    the end of `f`."""
    line_no, rest = 2, b""
    while data := f.read(size):
        data = rest + data
        cut = data.rfind(b"\n") + 1
        if cut == 0:  # a line longer than a chunk: read on
            rest = data
            continue
        chunk, rest = data[:cut], data[cut:]
        k = _count(chunk, b"\n")
        yield line_no, k, chunk
        line_no += k
    if rest:
        yield line_no, 1, rest


def _count(data: bytes, byte: bytes) -> int:
    """How many times `byte` is in `data`: numpy counts 4 MB in ~0.5 ms, bytes.count in ~4."""
    return int(np.count_nonzero(np.frombuffer(data, np.uint8) == byte[0]))


def _lines(chunk: bytes) -> list[bytes]:
    lines = chunk.split(b"\n")
    if not lines[-1]:
        lines.pop()
    return lines


def _row_ids(line_no: int, k: int) -> list[str]:
    """The ids of a file without an id column: data row numbers (line number - 1)."""
    return [str(line_no - 1 + i) for i in range(k)]


def _polars_rows(chunk: bytes, layout: Layout, line_no: int, k: int):
    """(ids, rows) of a chunk of `k` lines by polars' CSV reader; None when a row is short or
    long (polars would fill or refuse it), a line is blank (a row of nulls to polars), a cell
    is not a number, or an id reads as missing: `_exact_rows` decides those."""
    import polars as pl

    width = len(layout.header)
    if width < 2:  # no commas to count blank lines by
        return None
    # every line has width - 1 commas outside quotes: no short, long or blank row
    if _count(_QUOTED.sub(b"", chunk) if b'"' in chunk else chunk, b",") != k * (width - 1):
        return None
    numeric = set(layout.cols)
    wanted = sorted(numeric | ({layout.id_col} if layout.id_col is not None else set()))
    schema = {f"c{j}": pl.Float64 if j in numeric else pl.String for j in range(width)}
    # an empty cell is null to polars anyway; each other spelling costs ~4 ns per value, and
    # every one has an n: a chunk without one (most files) is read without the list
    missing = _POLARS_MISSING if b"n" in chunk or b"N" in chunk else None
    try:
        df = pl.read_csv(io.BytesIO(chunk), has_header=False, schema=schema, columns=wanted,
                         null_values=missing)
    except (pl.exceptions.PolarsError, ValueError):
        return None
    if df.height != k:
        return None
    if layout.id_col is None:
        ids = _row_ids(line_no, k)
    else:
        ids = df.get_column(f"c{layout.id_col}").to_list()
        if None in ids:
            return None
        df = df.drop(f"c{layout.id_col}")
    x = df.to_numpy()  # the columns in file order; selecting 512 by name costs ~1 ms
    by_file = sorted(layout.cols)
    if by_file != layout.cols:
        x = x[:, [by_file.index(j) for j in layout.cols]]
    return ids, np.ascontiguousarray(x, dtype=np.float32)


# polars reads nan in any case as NaN; each null spelling costs ~4 ns per value, so only the
# common ones (R writes NA) are here, and any other spelling goes to `_exact_rows`
_POLARS_MISSING = ["", "NA", "na", "null", "NULL"]


def _fast_rows(chunk: bytes, layout: Layout, line_no: int, k: int):
    """(ids, rows) for a chunk of plain numeric CSV lines, read by orjson as one JSON array of
    arrays (an empty cell becomes null); None when the chunk has anything else (quotes, nan,
    text cells it needs, blank lines, a short or long row), for `_exact_rows` to read. Lines
    whose only other column is a leading id are passed whole; any other layout (columns the
    model does not use, say a lot or a timestamp) has its cells picked per line."""
    if b'"' in chunk:  # quoted cells, ids too: the csv module unquotes them
        return None
    lines = _lines(chunk)
    id_col, width, cols = layout.id_col, len(layout.header), layout.cols
    whole = width == len(cols) + (id_col is not None) and id_col in (None, 0)
    ids, nums = [], []
    for raw in lines:
        line = raw.rstrip(b"\r")
        if not line:
            return None
        if whole and id_col is None:
            num = line
        elif whole:
            die, _, num = line.partition(b",")
            ids.append(die)
        else:
            cells = line.split(b",")
            if len(cells) != width:
                return None
            if id_col is not None:
                ids.append(cells[id_col])
            num = b",".join([cells[j] for j in cols])
        if num[:1] == b",":  # an empty first or last cell: null
            num = b"null" + num
        if num[-1:] == b",":
            num += b"null"
        if b",," in num:  # empty cells inside the row (twice for runs of them); per line, as
            # replacing in the whole chunk scans it again for every pass (3x slower)
            num = num.replace(b",,", b",null,").replace(b",,", b",null,")
        nums.append(num)
    doc = b"[[" + b"],[".join(nums) + b"]]"
    if any(c in doc for c in (b"t", b"f", b"{", b"\\", b",,")):  # text, inf, ...
        return None
    try:
        x = np.array(orjson.loads(doc), dtype=np.float32)
    except (ValueError, TypeError, OverflowError):
        return None
    if x.shape != (len(lines), len(cols)):  # a short or long row among whole lines
        return None
    if id_col is None:
        ids = _row_ids(line_no, len(lines))
    else:
        try:
            ids = [d.decode("utf-8") for d in ids]
        except UnicodeDecodeError:
            return None
    # whole lines hold the parameters in the file's order; picked cells are in the model's
    idx = [j - (j > id_col) for j in cols] if id_col is not None else cols
    if not whole or idx == list(range(len(cols))):
        return ids, x
    return ids, np.ascontiguousarray(x[:, idx])


def _exact_rows(chunk: bytes, layout: Layout, line_no: int):
    """(ids, rows) read cell by cell with the csv module: any CSV, and errors name the line."""
    path, header = layout.path, layout.header
    ids: list[str] = []
    rows: list[list[float]] = []
    try:
        text = chunk.decode("utf-8")
    except UnicodeDecodeError as e:
        at = line_no + chunk[:e.start].count(b"\n")
        raise UsageError(f"{path}:{at}: not UTF-8 text") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    for rec in reader:
        if not rec:
            continue
        at = line_no + reader.line_num - 1
        if len(rec) != len(header):  # a short or long row: its cells would name wrong columns
            raise UsageError(f"{path}:{at}: {len(rec)} cells, the header has {len(header)}")
        try:
            rows.append([parse_value(rec[j], f"column {header[j]!r}") for j in layout.cols])
        except UsageError as e:
            raise UsageError(f"{path}:{at}: {e}") from None
        ids.append(rec[layout.id_col] if layout.id_col is not None else str(at - 1))
    return ids, np.array(rows, dtype=np.float32).reshape(len(rows), len(layout.cols))


def parse_value(text: str, where: str) -> float:
    """One cell or argument as a float: empty, nan, null or na (any case) are missing (NaN)."""
    t = text.strip()
    if t == "" or t.lower() in MISSING:
        return math.nan
    try:
        return float(t)
    except ValueError:
        raise UsageError(f"{where}: {text!r} is not a number (empty, nan or null = missing)"
                         ) from None
