"""`edgefleet optimize build` end to end on small data: a bundle that a device verifies and
self-tests, the report, sequence numbering, one-line errors for bad input with nothing left
behind, and the real SECOM data."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from agent.bundle import unpack_bundle, verify_bundle
from agent.engine import Engine
from agent.errors import UsageError
from agent.keys import Keyring, generate_keypair, trust_key
from edgefleet.cli import main
from optimize.data import write_csv
from optimize.package import next_sequence
from optimize.pipeline import load_config
from tests.optimize_support import fast_config_file, small_dies, write_small_csv

# ../shared next to the repository (a worktree may sit a level deeper)
SHARED = next((p / "shared" for p in Path(__file__).resolve().parents[2:]
               if (p / "shared" / "data").is_dir()), Path(__file__).resolve().parents[2] / "shared")
SECOM = SHARED / "data" / "secom" / "secom_dev.csv"


@dataclasses.dataclass
class Built:
    out: Path
    key: Path
    keyring: Path
    config: Path
    data: Path
    stdout: str


def _cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(args)
    captured = capsys.readouterr()
    return int(e.value.code or 0), captured.out, captured.err


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("keys")
    pair = generate_keypair(root / "keys", "release")
    trust_key(root / "keyring", pair.public_path, "release")
    return pair.private_path, root / "keyring"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]) -> Built:
    root = tmp_path_factory.mktemp("build")
    data = write_small_csv(root / "dies.csv")
    config = fast_config_file(root / "fast.json")
    out = root / "out"
    with pytest.MonkeyPatch.context() as mp:
        capture = []
        mp.setattr("typer.echo", lambda msg="", **kw: capture.append(str(msg)))
        with pytest.raises(SystemExit) as e:
            main(["optimize", "build", "--data", str(data), "--key", str(keys[0]), "--out",
                  str(out), "--config", str(config), "-q"])
    assert e.value.code in (0, None)
    return Built(out, keys[0], keys[1], config, data, "\n".join(capture))


def test_build_writes_a_bundle_a_device_verifies_and_self_tests(built, tmp_path):
    bundle = built.out / "model.efb"
    manifest = verify_bundle(bundle, Keyring.load(built.keyring))
    assert manifest.sequence == 1 and manifest.name == "die-ae"
    assert manifest.input.n_features == 32
    assert manifest.input.feature_names == small_dies().feature_names
    assert manifest.top_k == 5 and np.isfinite(manifest.threshold)
    assert len(manifest.rules) == 32  # from the spec sidecar
    assert any(np.isnan(g.params).any() for g in manifest.golden)
    assert manifest.golden_rel_tol >= 0.05 and manifest.golden_abs_tol > 0
    assert manifest.drift_edges is not None and len(manifest.drift_edges) == 32
    assert manifest.evaluation["roc_auc"] > 0.5
    staging = tmp_path / "staging"
    staging.mkdir()
    unpack_bundle(bundle, manifest, staging)
    engine = Engine(staging / "model.onnx", manifest)
    assert engine.self_test() <= manifest.golden_abs_tol + manifest.golden_rel_tol * max(
        abs(g.score) for g in manifest.golden)


def test_build_reports_every_model_with_plots_and_prints_the_table(built):
    report = json.loads((built.out / "report.json").read_text())
    assert set(report["models"]) == {"fp32", "pruned_fp32", "pruned_int8", "rules"}
    for name in ("fp32", "pruned_fp32", "pruned_int8"):
        m = report["models"][name]
        assert m["scores_finite"] and m["size_bytes"] > 0 and 0 <= m["roc_auc"] <= 1
        assert set(m["recall"]) == {"gross", "subtle"}
        assert report["latency"][name]["p50_us"] > 0
    assert report["models"]["pruned_int8"]["params"] < report["models"]["fp32"]["params"]
    assert report["parity"]["int8_vs_pruned_fp32"]["decision_agreement"] >= 0.98
    assert report["export_max_abs_diff"]["pruned_fp32"] < 1e-3
    for f in ("report.md", "roc.png", "scores.png", "latency.png", "models/fp32.onnx",
              "models/pruned_fp32.onnx", "models/pruned_int8.onnx"):
        assert (built.out / f).stat().st_size > 0, f
    assert "![ROC curves](roc.png)" in (built.out / "report.md").read_text()
    assert "pruned INT8" in built.stdout and "sequence 1" in built.stdout
    assert not list(built.out.glob(".build-*"))


def test_next_build_takes_the_next_sequence_unless_one_is_given(built, capsys):
    assert next_sequence(built.out) == 2
    assert next_sequence(built.out / "elsewhere") == 1
    out = built.out.parent / "out2"
    args = ["optimize", "build", "--data", str(built.data), "--key", str(built.key), "--out",
            str(out), "--config", str(built.config), "-q", "--sequence", "41"]
    code, stdout, _ = _cli(args, capsys)
    assert code == 0 and "sequence 41" in stdout
    assert verify_bundle(out / "model.efb", Keyring.load(built.keyring)).sequence == 41
    assert next_sequence(out) == 42
    for name in ("fp32", "pruned_fp32", "pruned_int8"):  # same data, same seed: same models
        f = f"models/{name}.onnx"
        assert (out / f).read_bytes() == (built.out / f).read_bytes(), f


def test_build_without_labels_reports_parity_but_no_recall(built, tmp_path, capsys):
    data = write_csv(tmp_path / "unlabelled.csv",
                     dataclasses.replace(small_dies(), labels=None, defect=None), sidecar=False)
    out = tmp_path / "out"
    code, stdout, err = _cli(["optimize", "build", "--data", str(data), "--key", str(built.key),
                              "--out", str(out), "--config", str(built.config), "-q"], capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    for m in report["models"].values():
        assert "roc_auc" not in m and m["recall"] == {} and m["test_ffr"] is None
    assert report["parity"]["int8_vs_pruned_fp32"]["decision_agreement"] >= 0.98
    assert "flagged test" in stdout and not (out / "roc.png").exists()
    manifest = verify_bundle(out / "model.efb", Keyring.load(built.keyring))
    # static PAT limits (no spec sidecar), minus those the guards left out
    skipped = report["fallback"]["skipped"]
    assert report["fallback"]["source"] == "pat"
    assert len(manifest.rules) == 32 - sum(skipped.values()) >= 16


def test_config_precedence_is_file_then_environment_then_flags(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text('{"train": {"epochs": 5, "lr": 0.01}, "model": {"widths": [64, 16]}}')
    env = {"EDGEFLEET_OPTIMIZE_TRAIN_EPOCHS": "7", "EDGEFLEET_OPTIMIZE_PRUNE_KEEP": "0.5",
           "OTHER": "x"}
    c = load_config(cfg, env=env, overrides={"train": {"epochs": 9, "seed": None}})
    assert (c.train.epochs, c.train.lr, c.train.seed) == (9, 0.01, 0)
    assert c.prune.keep == 0.5 and c.model.widths == (64, 16)
    with pytest.raises(UsageError, match="EDGEFLEET_OPTIMIZE_TRAIN_EPOCHS: expected int"):
        load_config(env={"EDGEFLEET_OPTIMIZE_TRAIN_EPOCHS": "many"})
    with pytest.raises(UsageError, match="unknown section"):
        load_config(env={"EDGEFLEET_OPTIMIZE_TRAINING_EPOCHS": "3"})


def _bad_files(tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (data file, what the one-line error must mention)."""
    good = write_small_csv(tmp / "good.csv")
    lines = good.read_text().splitlines()
    cases: dict[str, tuple[Path, str]] = {}

    def variant(name: str, edit, expect: str) -> None:
        path = tmp / f"{name}.csv"
        new = list(lines)
        edit(new)
        path.write_text("\n".join(new) + "\n")
        cases[name] = (path, expect)

    def ragged(ls):
        ls[5] = ls[5].rsplit(",", 1)[0]

    def wide(ls):
        ls[6] = ls[6] + ",1.0"

    def non_numeric(ls):
        cells = ls[7].split(",")
        cells[-3] = "12.3V"
        ls[7] = ",".join(cells)

    def bad_label(ls):
        ls[8] = ls[8].replace(",pass,", ",maybe,", 1).replace(",fail,", ",maybe,", 1)

    variant("ragged", ragged, "line 6: expected 40 fields")
    variant("wide", wide, "line 7: expected 40 fields")
    variant("non_numeric", non_numeric, "line 8, column")
    variant("bad_label", bad_label, "line 9, column 'label'")
    data = small_dies()
    fails = dataclasses.replace(data, labels=np.where(np.arange(600) % 50 == 0, 0, 1),
                                defect=None)
    cases["few_passes"] = (write_csv(tmp / "few_passes.csv", fails, sidecar=False),
                           "passing dies in the training split")
    blank = dataclasses.replace(data, X=np.full_like(data.X, np.nan))
    cases["all_nan"] = (write_csv(tmp / "all_nan.csv", blank, sidecar=False),
                        "every feature cell is missing")
    spec = tmp / "wrong_spec.csv"
    spec.write_text(good.read_text())
    spec.with_suffix(".spec.json").write_text(
        good.with_suffix(".spec.json").read_text().replace('"idd_core_01"', '"idd_core_99"'))
    cases["spec_mismatch"] = (spec, f"{spec.with_suffix('.spec.json')}: no limits for feature "
                                    "column(s) idd_core_01")  # the sidecar is the bad file
    return cases


def test_bad_input_ends_in_one_line_naming_the_file_and_leaves_nothing(built, tmp_path, capsys):
    for name, (path, expect) in _bad_files(tmp_path).items():
        out = tmp_path / f"out-{name}"
        code, _, err = _cli(["optimize", "build", "--data", str(path), "--key", str(built.key),
                             "--out", str(out), "--config", str(built.config), "-q"], capsys)
        assert code == 1, name
        assert err.count("\n") == 1 and err.startswith("edgefleet: error: "), (name, err)
        assert str(path.with_suffix("")) in err and expect in err, (name, err)
        assert not out.exists(), name  # no bundle, no staging directory, no empty dir


def test_failed_build_keeps_the_previous_bundle(built, tmp_path, capsys):
    before = (built.out / "model.efb").read_bytes()
    path, _ = _bad_files(tmp_path)["few_passes"]
    code, _, _ = _cli(["optimize", "build", "--data", str(path), "--key", str(built.key),
                       "--out", str(built.out), "-q"], capsys)
    assert code == 1
    assert (built.out / "model.efb").read_bytes() == before
    assert not list(built.out.glob(".build-*"))


def test_bad_config_and_usage_are_refused(built, tmp_path, capsys):
    cfg = tmp_path / "bad.json"
    cfg.write_text('{"train": {"epochz": 3}}')
    code, _, err = _cli(["optimize", "build", "--data", str(built.data), "--key",
                         str(built.key), "--out", str(tmp_path / "o"), "--config", str(cfg)],
                        capsys)
    assert code == 2 and "train.epochz: unknown setting" in err
    code, out, _ = _cli(["optimize", "build", "--help"], capsys)
    assert code == 0 and "--target-ffr" in out and "--sequence" in out


@pytest.mark.skipif(not SECOM.exists(), reason=f"shared SECOM data not found at {SECOM}")
def test_secom_build_succeeds_with_finite_scores_and_int8_parity(keys, tmp_path, capsys):
    config = fast_config_file(tmp_path / "fast.json", train={"epochs": 4})
    out = tmp_path / "secom"
    code, _, err = _cli(["optimize", "build", "--data", str(SECOM), "--key", str(keys[0]),
                         "--out", str(out), "--config", str(config), "-q"], capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["features"] == 207
    assert all(m["scores_finite"] for m in report["models"].values())
    assert report["parity"]["int8_vs_pruned_fp32"]["decision_agreement"] >= 0.99
    # the PAT rules' union holds on the later test period (6-sigma limits failed 13.6%)
    fallback = report["fallback"]
    assert fallback["test_ffr"] <= 0.05 and fallback["val_ffr"] <= fallback["budget"]
    assert not any("fallback rules" in r for r in report["gates"]["reasons"])
    manifest = verify_bundle(out / "model.efb", Keyring.load(keys[1]))
    assert manifest.input.n_features == 207 and manifest.drift_edges is not None


def test_a_build_that_fails_a_gate_is_refused_with_reasons_unless_the_risk_is_accepted(
        built, tmp_path, capsys):
    """Exit 1, one line naming every failed gate, the report written, no bundle; with
    --accept-risk the same build is signed and the reason is in the manifest and the report."""
    strict = fast_config_file(tmp_path / "strict.json",
                              gate={"accept_risk": "", "max_ffr_ratio": -1.0})  # always trips
    out = tmp_path / "refused"
    args = ["optimize", "build", "--data", str(built.data), "--key", str(built.key), "--out",
            str(out), "--config", str(strict), "-q"]
    code, _, err = _cli(args, capsys)
    assert code == 1 and err.count("\n") == 1
    assert "build refused, not signed: " in err and "test false-fail" in err
    assert "--accept-risk" in err
    report = json.loads((out / "report.json").read_text())
    assert report["gates"]["passed"] is False and not report["gates"]["signed"]
    assert any("test false-fail" in r for r in report["gates"]["reasons"])
    assert "REFUSED, not signed" in (out / "report.md").read_text()
    assert not (out / "model.efb").exists() and not list(out.glob(".build-*"))
    # the unsigned models are there to replay the refused model's scores
    assert {m.name for m in (out / "models").iterdir()} == {
        "fp32.onnx", "pruned_fp32.onnx", "pruned_int8.onnx"}
    assert all(m.stat().st_size > 0 for m in (out / "models").iterdir())
    # -o json: the same refusal on stderr, and stdout says what was (not) written
    code, stdout, err = _cli([*args, "-o", "json"], capsys)
    assert code == 1 and "build refused, not signed: " in err
    doc = json.loads(stdout)
    assert (doc["bundle"], doc["sha256"], doc["signed"]) == (None, None, False)
    assert doc["gates"]["reasons"] == report["gates"]["reasons"]
    assert doc["report"] == str(out / "report.md") and Path(doc["report_json"]).exists()

    code, stdout, err = _cli([*args, "--accept-risk", "pilot lot, engineer on the floor",
                              "-o", "json"], capsys)
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["bundle"] == str(out / "model.efb") and doc["signed"] is True
    assert doc["sha256"] == hashlib.sha256((out / "model.efb").read_bytes()).hexdigest()
    assert doc["gates"]["accepted_risk"] == "pilot lot, engineer on the floor"
    manifest = verify_bundle(out / "model.efb", Keyring.load(built.keyring))
    assert doc["sequence"] == manifest.sequence and doc["name"] == manifest.name
    gates = manifest.evaluation["gates"]
    assert gates["accepted_risk"] == "pilot lot, engineer on the floor" and gates["signed"]
    assert "accepted risk: pilot lot" in (out / "report.md").read_text()


def test_report_names_the_baselines_the_breakdown_drift_missing_values_and_rules(built):
    report = json.loads((built.out / "report.json").read_text())
    cmp = report["baselines"]
    assert {"model", "static_pat", "pca_t2", "iforest"} <= set(cmp["methods"])
    assert cmp["best_unsupervised"] in cmp["methods"] and "baseline" in cmp["verdict"]
    for m in cmp["methods"].values():
        lo, hi = m["roc_auc_ci"]
        assert lo <= m["roc_auc"] <= hi and m["passes_flagged"][1] > 0
    c = report["confusion"]
    assert c["fail_flagged"] + c["fail_passed"] == report["data"]["test_fails"]
    assert set(report["breakdown"]) == {"lot", "wafer"}  # classic data: no tester column
    d = report["drift"]
    assert d["alert_psi"] >= max(0.1, 2 * d["noise_floor_psi"]) - 1e-6
    assert d["alert_psi"] >= 2 * max(d["lot_to_lot_psi"], d["period_psi"] or 0.0) - 1e-6
    assert d["test_psi"] is None  # 120 test dies: under the 200 the agent needs for a PSI
    assert report["missing"]["max_missing"] >= report["missing"]["most_missing_seen"]
    manifest = verify_bundle(built.out / "model.efb", Keyring.load(built.keyring))
    assert manifest.raw["input"]["max_missing"] == report["missing"]["max_missing"]
    assert manifest.raw["drift_reference"]["alert_psi"] == d["alert_psi"]
    md = (built.out / "report.md").read_text()
    for text in ("## What this build means", "## Baselines", "False-fail per group",
                 "noise floor", "max_missing", "ffr_threshold.png", "missing.png",
                 "ffr_groups.png"):
        assert text in md, text
    assert "{" not in md.split("## Findings")[1].split("##")[0]  # text, not Python reprs


def test_report_says_which_network_and_scorer_shipped_and_why(built):
    """Distillation and the supervised head are judged in every labelled build; the report and
    the manifest say what shipped, and the shipped sizes follow the decision."""
    report = json.loads((built.out / "report.json").read_text())
    d, s = report["distillation"], report["supervised"]
    for name in ("teacher", "student"):
        assert {"params", "size_bytes", "p50_us", "val", "test"} <= set(d[name])
    shipped = d["student" if d["kept"] else "teacher"]["params"]
    assert report["models"]["pruned_int8"]["params"] == shipped
    assert d["kept"] or d["reasons"]
    assert s["offered"] and (s["kept"] or s["reasons"])
    assert s["head"]["test"]["roc_auc_ci"] and s["unsupervised"]["test"]["roc_auc_ci"]
    manifest = verify_bundle(built.out / "model.efb", Keyring.load(built.keyring))
    assert manifest.evaluation["scorer"] == ("autoencoder + supervised head" if s["kept"]
                                             else "autoencoder")
    md = (built.out / "report.md").read_text()
    for text in ("## Distillation (teacher -> student)", "## Supervised head (labels)",
                 d["verdict"], s["verdict"]):
        assert text in md, text
