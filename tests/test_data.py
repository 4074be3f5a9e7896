"""Die test data: the generator's physics and defect labels, the CSV/NPZ formats, the loaders'
column rules and error messages, SECOM, and `edgefleet optimize make-data`."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.errors import EdgefleetError
from optimize.data import (
    NON_FEATURE_COLUMNS,
    DataError,
    Dataset,
    DieConfig,
    die_parameters,
    generate_dies,
    load_csv,
    load_dataset,
    load_npz,
    load_spec,
    out_of_spec,
    spec_path_for,
    write_csv,
    write_npz,
    write_spec,
)
from tests.conftest import examples

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"
SECOM = SHARED / "data" / "secom" / "secom_dev.csv"

# Many defects in a small run, so every check sees hundreds of them.
CFG = DieConfig(n_dies=4000, seed=7, gross_rate=0.05, subtle_rate=0.10)


@pytest.fixture(scope="module")
def dies() -> Dataset:
    return generate_dies(CFG)


def _cols(data: Dataset, prefix: str) -> np.ndarray:
    return np.array([i for i, n in enumerate(data.feature_names) if n.startswith(prefix)])


def _skew(values: np.ndarray) -> np.ndarray:
    centred = values - np.nanmean(values, axis=0)
    return np.nanmean(centred**3, axis=0) / np.nanstd(values, axis=0) ** 3


def _auc(negative: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    scores = np.r_[negative, positive]
    ranks = np.empty(len(scores))
    ranks[np.argsort(scores, kind="stable")] = np.arange(1, len(scores) + 1)
    n_pos, n_neg = len(positive), len(negative)
    return float((ranks[n_neg:].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


# --- generator --------------------------------------------------------------------------------


def test_same_seed_writes_byte_identical_csv_and_another_seed_differs(tmp_path: Path):
    cfg = DieConfig(n_dies=300, seed=11)
    a = write_csv(tmp_path / "a.csv", generate_dies(cfg))
    b = write_csv(tmp_path / "b.csv", generate_dies(cfg))
    c = write_csv(tmp_path / "c.csv", generate_dies(replace(cfg, seed=12)))
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    assert spec_path_for(a).read_bytes() == spec_path_for(c).read_bytes()  # same test program


def test_test_program_has_512_named_parameters_with_units_and_limits_independent_of_seed():
    spec = die_parameters(512)
    assert len(spec) == 512
    assert len({p.name for p in spec}) == 512
    groups = {p.group for p in spec}
    for group in ("idd_core", "ileak_core", "ileak_io", "vth_n", "ro_freq", "tmargin_setup",
                  "temp_sensor"):  # fmt: skip
        assert group in groups
    assert all(p.name.startswith(p.group + "_") and p.unit for p in spec)
    assert all(p.low is not None and p.high is not None and p.low < p.high for p in spec)
    assert {"idd_core_01", "ileak_io_03", "vth_n_05", "ro_freq_12", "temp_sensor_02"} <= {
        p.name for p in spec
    }
    assert generate_dies(DieConfig(n_dies=5, seed=1)).spec == spec
    assert len(die_parameters(40)) == 40


def test_every_subtle_die_is_inside_every_limit_even_after_the_csv_round_trip(
    dies: Dataset, tmp_path: Path
):
    subtle = dies.defect == "subtle"
    assert subtle.sum() > 300
    assert not out_of_spec(dies.X[subtle], dies.spec).any()
    loaded = load_csv(write_csv(tmp_path / "d.csv", dies))
    assert not out_of_spec(loaded.X[subtle], loaded.spec).any()
    # Stress: all subtle, under a 4-sigma drift that pushes unclipped dies past the limits.
    pushed = generate_dies(DieConfig(n_dies=1500, seed=3, gross_rate=0.0, subtle_rate=1.0,
                                     drift=True, drift_size=4.0))  # fmt: skip
    assert (pushed.defect == "subtle").all()
    assert not out_of_spec(pushed.X, pushed.spec).any()


def test_every_gross_die_breaks_a_limit_and_no_passing_die_does(dies: Dataset):
    violations = out_of_spec(dies.X, dies.spec).any(axis=1)
    assert violations[dies.defect == "gross"].all()
    assert not violations[dies.defect == "none"].any()


def test_gross_violations_are_far_outside_the_limit_not_on_the_edge(dies: Dataset):
    low = np.array([p.low for p in dies.spec])
    high = np.array([p.high for p in dies.spec])
    X = dies.X[dies.defect == "gross"]
    with np.errstate(invalid="ignore"):
        beyond = np.fmax(low - X, X - high) / (high - low)  # distance outside, in band widths
    assert (np.nanmax(beyond, axis=1) > 0.2).mean() > 0.95


def test_limit_rule_catches_all_gross_and_no_subtle_defects(dies: Dataset):
    rule_fail = out_of_spec(dies.X, dies.spec).any(axis=1)
    assert rule_fail[dies.defect == "gross"].mean() == 1.0
    assert rule_fail[dies.defect == "subtle"].mean() == 0.0
    assert np.array_equal(dies.labels, (dies.defect != "none").astype(int))


def test_subtle_defects_are_separated_by_a_linear_model_of_the_joint_distribution(dies: Dataset):
    X = dies.X.copy()
    passes = np.flatnonzero(dies.defect == "none")
    train, held_out = passes[:2000], passes[2000:]
    X = np.where(np.isnan(X), np.nanmedian(X[train], axis=0), X)
    mean, sd = X[train].mean(axis=0), X[train].std(axis=0)
    Z = (X - mean) / sd
    _, vectors = np.linalg.eigh(Z[train].T @ Z[train])  # ascending eigenvalues
    basis = vectors[:, -6:].T  # (6, F): the process-factor subspace
    error = ((Z - Z @ basis.T @ basis) ** 2).sum(axis=1)
    subtle_err = error[dies.defect == "subtle"]
    assert _auc(error[held_out], subtle_err) > 0.97
    assert (subtle_err > np.quantile(error[held_out], 0.99)).mean() > 0.9


def test_parameters_are_correlated_through_process_factors(dies: Dataset):
    X = dies.X[dies.defect == "none"]
    X = np.where(np.isnan(X), np.nanmean(X, axis=0), X)
    ro, idsat, vth = (_cols(dies, g)[0] for g in ("ro_freq", "idsat_n", "vth_n"))
    corr = np.corrcoef(X[:, [ro, idsat, vth]], rowvar=False)
    assert corr[0, 1] > 0.4  # fast silicon: fast oscillators and strong drive
    assert corr[0, 2] < -0.2  # high Vt: slow oscillators


def test_leakage_is_heavy_tailed_and_ring_oscillators_are_not(dies: Dataset):
    X = dies.X[dies.defect == "none"]
    assert _skew(X[:, _cols(dies, "ileak_")]).min() > 0.8
    assert np.abs(_skew(X[:, _cols(dies, "ro_freq")])).max() < 0.3


def test_drift_shifts_the_speed_factor_late_in_the_run_and_nothing_else(dies: Dataset):
    drifted = generate_dies(replace(CFG, drift=True, drift_start=0.5, drift_size=1.5))
    half = CFG.n_dies // 2
    assert np.array_equal(drifted.X[:half], dies.X[:half], equal_nan=True)
    ro = _cols(dies, "ro_freq")
    passes = (dies.defect == "none") & (drifted.defect == "none")
    sd = np.nanstd(dies.X[passes][:, ro], axis=0)
    shift = (drifted.X[:, ro] - dies.X[:, ro]) / sd  # (n, ro) in pass sigmas
    late = np.arange(CFG.n_dies) >= int(0.9 * CFG.n_dies)
    assert np.nanmean(shift[passes & late]) > 0.8
    mid = (np.arange(CFG.n_dies) >= half) & ~late
    assert 0 < np.nanmean(shift[passes & mid]) < np.nanmean(shift[passes & late])


def test_missing_cells_follow_the_rate_and_can_be_turned_off(dies: Dataset):
    assert 0.0005 < np.isnan(dies.X).mean() < 0.002
    assert not np.isnan(generate_dies(replace(CFG, n_dies=300, missing_rate=0.0)).X).any()


def test_records_carry_unique_ids_increasing_times_and_wafer_positions(dies: Dataset):
    assert len(set(dies.ids.tolist())) == len(dies.ids)
    assert (np.diff(dies.times).astype(int) > 0).all()
    assert set(dies.extra) == {"lot", "wafer", "x", "y"}
    assert dies.extra["wafer"].min() >= 1 and dies.extra["wafer"].max() <= 25
    assert (dies.extra["x"] ** 2 + dies.extra["y"] ** 2).max() <= 64


def test_bad_generator_config_is_refused():
    with pytest.raises(DataError, match="n_params"):
        DieConfig(n_params=3)
    with pytest.raises(DataError, match="gross_rate"):
        DieConfig(gross_rate=0.7, subtle_rate=0.7)


# --- formats ----------------------------------------------------------------------------------


def test_csv_round_trip_keeps_everything(dies: Dataset, tmp_path: Path):
    path = write_csv(tmp_path / "dies.csv", dies)
    header = path.read_text().split("\n", 1)[0].split(",")
    assert header[:8] == ["die_id", "timestamp", "lot", "wafer", "x", "y", "label", "defect"]
    got = load_csv(path)
    assert got.feature_names == dies.feature_names
    assert np.array_equal(np.isnan(got.X), np.isnan(dies.X))
    np.testing.assert_allclose(got.X, dies.X, rtol=6e-6)
    assert np.array_equal(got.labels, dies.labels)
    assert np.array_equal(got.defect, dies.defect)
    assert np.array_equal(got.ids, dies.ids)
    assert np.array_equal(got.times, dies.times)
    assert got.spec == dies.spec
    assert got.extra["lot"].tolist() == dies.extra["lot"].tolist()
    assert got.extra["x"].astype(int).tolist() == dies.extra["x"].tolist()
    assert got.source == path


def test_npz_round_trip_is_exact(dies: Dataset, tmp_path: Path):
    got = load_dataset(write_npz(tmp_path / "dies.npz", dies), dtype=np.float32)
    assert got.X.dtype == np.float32
    assert np.array_equal(got.X, dies.X.astype(np.float32), equal_nan=True)
    assert got.feature_names == dies.feature_names
    assert np.array_equal(got.labels, dies.labels)
    assert np.array_equal(got.times, dies.times)
    assert got.spec == dies.spec
    assert np.array_equal(got.extra["wafer"], dies.extra["wafer"])


def test_spec_sidecar_is_a_documented_json_list_in_column_order(dies: Dataset, tmp_path: Path):
    write_csv(tmp_path / "dies.csv", dies)
    doc = json.loads((tmp_path / "dies.spec.json").read_text())
    assert doc["format"] == "edgefleet-die-spec" and doc["version"] == 1
    assert [p["name"] for p in doc["parameters"]] == list(dies.feature_names)
    assert set(doc["parameters"][0]) == {"name", "group", "unit", "low", "high"}
    assert load_spec(tmp_path / "dies.spec.json") == dies.spec


_finite = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e12, max_value=1e12)


@settings(
    max_examples=examples(40), deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    rows=st.integers(1, 6).flatmap(
        lambda n_cols: st.lists(
            st.lists(st.one_of(_finite, st.just(float("nan"))), min_size=n_cols, max_size=n_cols),
            min_size=1,
            max_size=8,
        )
    )
)
def test_any_float_matrix_survives_the_csv_round_trip(tmp_path: Path, rows: list[list[float]]):
    X = np.array(rows, dtype=np.float64)
    if np.isnan(X).all():
        X[0, 0] = 1.0
    names = tuple(f"p{k}" for k in range(X.shape[1]))
    got = load_csv(write_csv(tmp_path / "h.csv", Dataset(X=X, feature_names=names)))
    assert got.feature_names == names
    assert np.array_equal(np.isnan(got.X), np.isnan(X))
    np.testing.assert_allclose(got.X, X, rtol=6e-6, atol=0)


# --- loader column rules ----------------------------------------------------------------------


def _write(tmp_path: Path, text: str, name: str = "in.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_non_feature_columns_are_recognized_by_name_case_insensitively(tmp_path: Path):
    path = _write(
        tmp_path,
        "Die_ID,TimeStamp,Lot,WAFER,X,y,a,LABEL,b,Defect\n"
        "d1,2024-01-08T06:00:00,L1,1,0,1,1.5,pass,2,none\n"
        "d2,2024-01-08T06:00:03,L1,1,1,1,,FAIL,3.25,gross\n",
    )
    got = load_csv(path)
    assert got.feature_names == ("a", "b")
    assert np.array_equal(got.X, [[1.5, 2.0], [np.nan, 3.25]], equal_nan=True)
    assert got.labels.tolist() == [0, 1]
    assert got.ids.tolist() == ["d1", "d2"]
    assert got.defect.tolist() == ["none", "gross"]
    assert got.times[1] - got.times[0] == np.timedelta64(3, "s")
    assert set(got.extra) == {"Lot", "WAFER", "X", "y"}
    assert {"id", "die_id", "row", "timestamp", "time", "date", "label", "defect", "lot", "wafer",
            "x", "y"} <= NON_FEATURE_COLUMNS  # fmt: skip


def test_non_feature_columns_by_option(tmp_path: Path):
    path = _write(
        tmp_path,
        "serial,tested_at,operator,result,v1,v2\n"
        "s1,2024-01-08T06:00:00,ann,good,1,2\n"
        "s2,2024-01-08T07:00:00,bob,bad,3,4\n",
    )
    got = load_csv(
        path,
        non_feature_columns=["Operator"],
        label_column="result",
        time_column="tested_at",
        id_column="serial",
    )
    assert got.feature_names == ("v1", "v2")
    assert got.labels.tolist() == [0, 1]
    assert got.ids.tolist() == ["s1", "s2"]
    assert got.extra["operator"].tolist() == ["ann", "bob"]
    with pytest.raises(DataError, match="line 2, column 'operator': expected a number"):
        load_csv(path, label_column="result", time_column="tested_at", id_column="serial")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (("pass", "fail"), [0, 1]),
        (("PASS", "Fail"), [0, 1]),
        (("0", "1"), [0, 1]),
        (("false", "TRUE"), [0, 1]),
        (("good", "Bad"), [0, 1]),
        ((" pass ", "-1"), [0, 0]),
    ],
)
def test_labels_map_to_one_for_fail(tmp_path: Path, raw: tuple[str, str], expected: list[int]):
    path = _write(tmp_path, f"label,a\n{raw[0]},1\n{raw[1]},2\n")
    assert load_csv(path).labels.tolist() == expected


@pytest.mark.skipif(not SECOM.exists(), reason=f"shared SECOM data not present at {SECOM}")
def test_secom_fab_data_loads():
    got = load_csv(SECOM)
    assert got.X.shape == (1096, 207)
    assert got.feature_names[0] == "f0" and "row" not in got.feature_names
    assert int(got.labels.sum()) == 78
    assert np.isnan(got.X).any()
    assert (np.diff(got.times).astype(int) >= 0).all()
    assert got.spec is None


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "where", "what"),
    [
        ("a,b,c\n1,2,3\n4,5\n", "line 3", "expected 3 fields"),
        ("a,b,c\n1,2,3\n4,5,6,7\n", "line 3", "found 4"),
        ("a,b\n1,2\n3,x7\n", "line 3, column 'b'", "expected a number"),
        ("label,a\npass,1\nmaybe,2\n", "line 3, column 'label'", "unknown label 'maybe'"),
        ("a,b\n,\nnan,NA\n", "every feature cell is missing", "expected some measurements"),
        ("", "file is empty", "expected a header row"),
        ("a,b\n", "no data rows", "expected at least one die"),
        ("a,b\n1,inf\n", "line 2, column 'b'", "expected a finite number"),
        ("a,a\n1,2\n", "line 1", "duplicate column name"),
        ("timestamp,a\nyesterday,1\n", "line 2, column 'timestamp'", "ISO 8601"),
        ("label,timestamp\npass,2024-01-01\n", "line 1", "no feature columns"),
    ],
)
def test_bad_csv_raises_data_error_naming_file_and_place(
    tmp_path: Path, text: str, where: str, what: str
):
    path = _write(tmp_path, text, "bad input.csv")
    with pytest.raises(DataError) as info:
        load_csv(path)
    message = str(info.value)
    assert isinstance(info.value, EdgefleetError)
    assert str(path) in message and where in message and what in message
    assert "\n" not in message


def test_wrong_width_against_expected_features_names_the_columns(tmp_path: Path):
    path = _write(tmp_path, "a,b\n1,2\n")
    with pytest.raises(DataError, match=r"in\.csv: expected 3 feature columns, found 2; missing c"):
        load_csv(path, expect_features=["a", "b", "c"])


def test_missing_label_or_exclusion_column_given_by_option_is_an_error(tmp_path: Path):
    path = _write(tmp_path, "a,b\n1,2\n")
    with pytest.raises(DataError, match="no label column 'result'"):
        load_csv(path, label_column="result")
    with pytest.raises(DataError, match="non-feature column 'operator' is not in the header"):
        load_csv(path, non_feature_columns=["operator"])


def test_spec_sidecar_without_a_feature_is_an_error(tmp_path: Path):
    path = _write(tmp_path, "a,b\n1,2\n", "d.csv")
    spec = die_parameters(15)
    write_spec(spec_path_for(path), spec)
    with pytest.raises(DataError, match=r"d\.spec\.json: no limits for feature column\(s\) a, b"):
        load_csv(path)


def test_bad_npz_raises_data_error(tmp_path: Path):
    path = tmp_path / "bad.npz"
    np.savez(path, Y=np.zeros(3))
    with pytest.raises(DataError, match=r"bad\.npz: expected an array named 'X'"):
        load_npz(path)
    np.savez(path, X=np.zeros((2, 3)), labels=np.array([0, 2]))
    with pytest.raises(DataError, match=r"bad\.npz: array 'labels'"):
        load_npz(path)
    np.savez(path, X=np.full((2, 3), np.nan))
    with pytest.raises(DataError, match="every value of 'X' is missing"):
        load_npz(path)


# --- CLI --------------------------------------------------------------------------------------


def _edgefleet(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgefleet", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_make_data_writes_csv_and_spec_and_prints_a_summary(tmp_path: Path):
    run = _edgefleet("optimize", "make-data", "--n", "200", "--out", "tmp/d.csv", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "tmp" / "d.csv").exists() and (tmp_path / "tmp" / "d.spec.json").exists()
    summary = run.stdout.strip()
    assert "\n" not in summary and "floor profile, 200 dies x 256 parameters" in summary
    got = load_csv(tmp_path / "tmp" / "d.csv")
    assert got.X.shape == (200, 256) and got.spec is not None
    assert {"lot", "wafer", "x", "y", "tester"} <= set(got.extra)  # kept apart from X


def test_make_data_json_says_what_it_wrote(tmp_path: Path):
    """`-o json`: the data and spec files with the digests of the bytes on disk, and counts."""
    import hashlib
    import json

    run = _edgefleet("optimize", "make-data", "--n", "200", "--out", "d.csv", "-o", "json",
                     cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert (doc["data"], doc["spec"]) == ("d.csv", "d.spec.json")
    for f, digest in ((doc["data"], doc["sha256"]), (doc["spec"], doc["spec_sha256"])):
        assert hashlib.sha256((tmp_path / f).read_bytes()).hexdigest() == digest
    assert (doc["profile"], doc["dies"], doc["parameters"]) == ("floor", 200, 256)
    assert doc["fail"] == sum(doc["defects"].values()) > 0
    got = load_csv(tmp_path / "d.csv")
    assert doc["fail"] == int(got.labels.sum())
    assert _edgefleet("optimize", "make-data", "--out", "e.csv", "-o", "name",
                      cwd=tmp_path).returncode == 2


def test_make_data_classic_profile_keeps_the_earlier_generator(tmp_path: Path):
    run = _edgefleet("optimize", "make-data", "--profile", "classic", "--n", "200", "--out",
                     "d.csv", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "classic profile, 200 dies x 512 parameters" in run.stdout and "subtle" in run.stdout
    assert load_csv(tmp_path / "d.csv").X.shape == (200, 512)
    bad = _edgefleet("optimize", "make-data", "--profile", "nope", "--out", "e.csv", cwd=tmp_path)
    assert bad.returncode == 2 and "--profile must be floor or classic" in bad.stderr


def test_make_data_bad_usage_exits_2_and_unwritable_output_exits_1(tmp_path: Path):
    bad = _edgefleet("optimize", "make-data", "--n", "0", "--out", "d.csv", cwd=tmp_path)
    assert bad.returncode == 2 and not (tmp_path / "d.csv").exists()
    assert (
        "Generate synthetic die test records"
        in _edgefleet("optimize", "make-data", "--help", cwd=tmp_path).stdout
    )
    (tmp_path / "file").write_text("")
    run = _edgefleet("optimize", "make-data", "--n", "5", "--out", "file/d.csv", cwd=tmp_path)
    assert run.returncode == 1
    assert run.stderr.startswith("edgefleet: error: file/d.csv: cannot write")
    assert run.stderr.count("\n") == 1
