"""The report's sections for the optional steps: distillation (`optimize.distill`) and the
supervised head (`optimize.supervised`). Plain text tables from the report's JSON objects, so
`optimize.evaluate` can write them without importing the stages."""

from __future__ import annotations

from typing import Any


def _auc(q: dict[str, Any] | None) -> str:
    if not q or q.get("roc_auc") is None:
        return "-"
    ci = q.get("roc_auc_ci")
    return f"{q['roc_auc']:.4f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def _ffr(q: dict[str, Any] | None) -> str:
    ffr = (q or {}).get("ffr")
    return "-" if ffr is None else f"{ffr:.2%}"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    return ["  ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=True)).rstrip()
            for r in [head, *rows]]


def _recall(q: dict[str, Any] | None, classes: list[str]) -> list[str]:
    rec = (q or {}).get("recall_equal_ffr") or {}
    return [f"{rec[c]:.3f}" if c in rec else "-" for c in classes]


def distillation_lines(d: dict[str, Any]) -> list[str]:
    """Teacher vs student: parameters, size, latency, AUC and recall at equal false-fail."""
    classes = sorted({c for m in ("teacher", "student") for p in ("val", "test")
                      for c in ((d[m].get(p) or {}).get("recall_equal_ffr") or {})})
    rows = []
    for name in ("teacher", "student"):
        m = d[name]
        rows.append([f"{name} {'-'.join(map(str, d.get('sizes', {}).get(name, [])))}",
                     f"{m['params']:,}", f"{m['size_bytes'] / 1e3:.0f} kB",
                     f"{m['p50_us']:.1f}", _auc(m.get("val")), _auc(m.get("test")),
                     _ffr(m.get("test")), *_recall(m.get("test"), classes)])
    par = d["parity_with_teacher"]
    return [*_table(["network (FP32)", "params", "size", "p50 us", "AUC val", "AUC test",
                     "FFR test", *[f"{c} @eq.FFR" for c in classes]], rows),
            f"student vs teacher on the test part: decisions agree "
            f"{par['decision_agreement']:.2%}, rank correlation {par['spearman']:.4f}",
            d["verdict"]]


def supervised_lines(s: dict[str, Any]) -> list[str]:
    """Unsupervised INT8 model vs INT8 with the head, on validation and test."""
    if not s.get("offered"):
        return [s["verdict"]]
    classes = sorted({c for m in ("unsupervised", "head") for p in ("val", "test")
                      for c in ((s[m].get(p) or {}).get("recall_equal_ffr") or {})})
    rows = []
    for name, title in (("unsupervised", "autoencoder"), ("head", "with the head")):
        m = s[name]
        rows.append([title, _auc(m.get("val")), _auc(m.get("test")), _ffr(m.get("test")),
                     *_recall(m.get("test"), classes)])
    out = _table(["scorer (INT8)", "AUC val", "AUC test", "FFR test",
                  *[f"{c} @eq.FFR" for c in classes]], rows)
    ci = s.get("test_auc_diff_ci")
    if ci:
        out.append(f"test AUC difference (head - autoencoder), paired bootstrap 95%: "
                   f"[{ci[0]:+.4f}, {ci[1]:+.4f}]")
    out.append(f"INT8 vs FP32 with the head, test decisions agree "
               f"{s['int8_vs_fp32_head']['decision_agreement']:.2%}")
    out.append(s["verdict"])
    return out


def markdown(report: dict[str, Any]) -> list[str]:
    """The `## Distillation` and `## Supervised head` sections (empty when neither ran)."""
    lines: list[str] = []
    if report.get("distillation"):
        lines += ["## Distillation (teacher -> student)", "", "```",
                  *distillation_lines(report["distillation"]), "```", ""]
    if report.get("supervised"):
        lines += ["## Supervised head (labels)", "", "```",
                  *supervised_lines(report["supervised"]), "```", ""]
    return lines
