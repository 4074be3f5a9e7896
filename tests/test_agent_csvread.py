"""agent/csvread.py: the CSV reader of `edgefleet agent predict --file`, on real files. Every
engine gives the cell-by-cell reader's ids and float32 values, and bad rows are refused with
their line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import csvread
from agent.errors import UsageError
from tests.conftest import examples

ENGINES = csvread.engines()
NAMES = ["p0", "p1", "p2"]

CELL = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False, width=32).map(repr),
    st.floats(allow_nan=False, allow_infinity=False).map(lambda v: f"{v:.17g}"),
    st.integers(-(10**30), 10**30).map(str),
    st.sampled_from(["", " 1.5", "2 ", "null", "NULL", "Null", "nan", "NaN", "-nan", "NA", "na",
                     "Na", "1e-3", "1E+5", "-0", "+1", ".5", "1.", "inf", "-Infinity", "INF",
                     '"3"', '"1,5"', "1e39", "-1e-50", "true", "x", "1_0", "0x10", "1e", "-",
                     "١", "1.5f", '1"2', "   "]))
ID = st.one_of(st.integers(0, 10**6).map(str),
               st.sampled_from(["D7", '"W3,7"', '"A""B"', "", "NA", "007", " 9"]))


def _layout(width: int, id_col: int | None, order: list[int], lot: bool) -> csvread.Layout:
    """Columns c0.. with the id at `id_col` and, with `lot`, a text column last."""
    cols = [j for j in range(width) if j != id_col]
    return csvread.Layout(Path("f.csv"), [f"c{j}" for j in range(width + lot)], id_col,
                          [cols[k] for k in order])


@settings(max_examples=examples(300), deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(ID, st.lists(CELL, min_size=2, max_size=4)), min_size=1, max_size=6),
       st.sampled_from([None, 0, 2]), st.permutations([0, 1, 2]),
       st.sampled_from(["\n", "\r\n"]), st.booleans(), st.booleans(),
       st.sampled_from(ENGINES))
def test_every_engine_reads_what_the_exact_reader_does(rows, id_col, order, eol, blank, lot,
                                                       engine):
    """Where an engine takes a chunk, it gives the ids and float32 values the cell-by-cell
    reader gives; where that reader refuses the chunk (a bad cell, a short or long row), the
    engine must not have taken it. Rows have 2-4 cells where 3 are due, blank lines, and a
    text column the model does not use."""
    width = 4 if id_col is not None else 3
    lines = []
    for die, cells in rows:
        cells = list(cells)
        if id_col is not None:
            cells.insert(min(id_col, len(cells)), die)
        lines.append(",".join(cells + (["L1"] if lot else [])) + eol)
        if blank:
            lines.append(eol)
    chunk = "".join(lines).encode()
    layout = _layout(width, id_col, order, lot)
    parse = {"polars": csvread._polars_rows, "orjson": csvread._fast_rows}[engine]
    fast = parse(chunk, layout, 2, len(lines))
    try:
        exact = csvread._exact_rows(chunk, layout, 2)
    except UsageError:
        assert fast is None
        return
    if fast is not None:
        assert fast[0] == exact[0]
        assert np.array_equal(fast[1], exact[1], equal_nan=True)
        assert fast[1].dtype == np.float32 and fast[1].flags.c_contiguous


@pytest.mark.parametrize("engine", ENGINES)
def test_columns_the_model_does_not_use_keep_the_fast_path(engine):
    """A floor export: id, timestamp, lot and tester beside the parameters, in another order
    than the model's. Both engines read it themselves, without the cell-by-cell reader."""
    header = ["die_id", "timestamp", "lot", "p2", "tester", "p0", "p1"]
    chunk = b"17,2024-05-01T10:00:00,L7,3,T01,1,\n18,2024-05-01T10:00:01,L7,6,T02,4,5\n"
    layout = csvread.Layout(Path("f.csv"), header, 0, [5, 6, 3])
    parse = {"polars": csvread._polars_rows, "orjson": csvread._fast_rows}[engine]
    ids, x = parse(chunk, layout, 2, 2)
    assert ids == ["17", "18"]
    assert np.array_equal(x, np.array([[1, np.nan, 3], [4, 5, 6]], np.float32), equal_nan=True)


def _write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode())
    return path


def _read(path: Path, engine: str, batch: int = 256, names=NAMES, n: int = 3):
    got = list(csvread.read_batches(path, "die_id", names, n, batch, engine=engine))
    return got, [i for ids, _ in got for i in ids], np.concatenate([x for _, x in got])


@pytest.mark.parametrize("engine", ENGINES)
def test_a_spreadsheet_export_reads_as_written(tmp_path, engine):
    """BOM, CRLF, quoted ids, a text column the model does not use, columns in another order
    than the model's, missing values of every spelling, blank lines, no final newline."""
    path = _write(tmp_path / "f.csv",
                  '\ufefflot,p2,die_id,p0,p1\r\n'
                  'L1,3,"W3,1",1,2\r\n'
                  'L1,,W3-2,NA,nan\r\n'
                  '\r\n'
                  'L2,6,"7",4,5')
    _, ids, x = _read(path, engine)
    assert ids == ["W3,1", "W3-2", "7"]
    assert np.array_equal(x, np.array([[1, 2, 3], [np.nan] * 3, [4, 5, 6]], np.float32),
                          equal_nan=True)


@pytest.mark.parametrize("engine", ENGINES)
def test_batches_are_whole_across_chunks_and_errors_name_the_line(tmp_path, monkeypatch,
                                                                 engine):
    monkeypatch.setitem(csvread.CHUNK_BYTES, engine, 100)  # many chunks; batches straddle them
    rows = [f"{i},{i}.5,{-i},1e{i % 30}" for i in range(1000)]
    path = _write(tmp_path / "f.csv", "die_id,p0,p1,p2\n" + "\n".join(rows) + "\n")
    got, ids, x = _read(path, engine, batch=64)
    assert [len(b[0]) for b in got] == [64] * 15 + [40]
    assert ids == [str(i) for i in range(1000)]
    assert np.array_equal(x[:, 2], np.array([f"1e{i % 30}" for i in range(1000)], np.float32))
    rows[700] = "700,1,x,3"
    _write(path, "die_id,p0,p1,p2\n" + "\n".join(rows) + "\n")
    with pytest.raises(UsageError, match=r"f\.csv:702: column 'p1': 'x' is not a number"):
        _read(path, engine)
    rows[700] = "700,1,2"
    _write(path, "die_id,p0,p1,p2\n" + "\n".join(rows) + "\n")
    with pytest.raises(UsageError, match=r"f\.csv:702: 3 cells, the header has 4"):
        _read(path, engine)
    rows[700] = "700,1,2,3,4"
    _write(path, "die_id,p0,p1,p2\n" + "\n".join(rows) + "\n")
    with pytest.raises(UsageError, match=r"f\.csv:702: 5 cells, the header has 4"):
        _read(path, engine)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_file_without_ids_numbers_dies_by_data_row(tmp_path, monkeypatch, engine):
    monkeypatch.setitem(csvread.CHUNK_BYTES, engine, 3)  # each line longer than a chunk
    path = _write(tmp_path / "f.csv", "a,b,c\n1,2,3\n4,5,6\n")
    _, ids, x = _read(path, engine, names=["x", "y", "z"])  # not the model's names: by position
    assert ids == ["1", "2"] and x.tolist() == [[1, 2, 3], [4, 5, 6]]


def test_the_docs_example_file_reads_as_the_doc_says(tmp_path):
    """docs/protocol.md, "Screening a CSV file": its example, on a 3-feature model."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "protocol.md").read_text()
    example = doc.split("```csv\n", 1)[1].split("```", 1)[0]
    names = [f"param_{i:03d}" for i in range(3)]
    for engine in ENGINES:
        _, ids, x = _read(_write(tmp_path / "dies.csv", example), engine, names=names)
        assert ids == ["1000017", "W3,12-07"]
        assert np.array_equal(x, np.array([[0.51, np.nan, 1.2], [0.49, np.nan, 1.1]],
                                          np.float32), equal_nan=True)


def test_a_header_that_does_not_map_is_refused(tmp_path):
    path = _write(tmp_path / "f.csv", "die_id,a,b\nD1,1,2\n")
    with pytest.raises(UsageError, match="the header names 2 parameter columns .* expects 3"):
        _read(path, ENGINES[0])
    with pytest.raises(UsageError, match="is empty"):
        _read(_write(tmp_path / "e.csv", ""), ENGINES[0])
    with pytest.raises(UsageError, match="no such file"):
        _read(tmp_path / "none.csv", ENGINES[0])
    path.write_bytes(b"die_id,p0,p1,p2\nD1,1,2,\xff\n")
    with pytest.raises(UsageError, match=r"f\.csv:2: not UTF-8 text"):
        _read(path, ENGINES[0])


def test_polars_reads_large_files_only_and_the_environment_picks_a_reader(monkeypatch):
    """Importing polars costs more than it saves on a file under one polars chunk."""
    assert csvread.engine_for(1000) == "orjson"
    assert csvread.engine_for(8 << 20) == ENGINES[0]
    monkeypatch.setenv("EDGEFLEET_CSV_READER", "orjson")
    assert csvread.engine_for(8 << 20) == "orjson"
    monkeypatch.setenv("EDGEFLEET_CSV_READER", "pandas")
    with pytest.raises(UsageError, match="EDGEFLEET_CSV_READER=pandas: this install reads"):
        csvread.engine_for(1000)


def test_prefetched_keeps_order_and_raises_the_readers_error_in_turn():
    def items():
        yield from range(5)
        raise UsageError("f.csv:9: bad")

    got = []
    with pytest.raises(UsageError, match="f.csv:9"):
        for i in csvread.prefetched(items()):
            got.append(i)
    assert got == [0, 1, 2, 3, 4]


def test_a_consumer_that_stops_early_stops_the_reader_thread():
    produced = []

    def items():
        for i in range(1000):
            produced.append(i)
            yield i

    it = csvread.prefetched(items(), depth=2)
    assert next(it) == 0
    it.close()  # joins the thread
    assert len(produced) <= 4
