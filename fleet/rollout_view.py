"""A rollout as text for the terminal: the `rollout status` table with its progress bars, the
one-line progress a non-terminal stderr gets, the `rollout list` table and the dry-run plan.

Pure functions of their input (a `fleet.rollout.snapshot`, a plan and its stages, rollout
rows): they return text and print nothing, so the commands in `fleet/cli_rollout.py` decide
where it goes.
"""

from __future__ import annotations

import datetime as dt
import textwrap
from collections.abc import Mapping, Sequence, Set
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fleet.inventory import Inventory
    from fleet.rollout import Bundle, Plan, StagePlan
    from fleet.state import RolloutRow


def progress_key(snap: dict[str, Any]) -> tuple:
    """What `progress_line` shows, so a caller prints a line only when it changes."""
    st = next((s for s in snap["stages"] if s["name"] == snap["stage"]), None) or {}
    return (snap["state"], snap["stage"], snap["phase"], st.get("done"), st.get("failed"),
            st.get("state"))


def progress_line(snap: dict[str, Any]) -> str:
    st = next((s for s in snap["stages"] if s["name"] == snap["stage"]), None) or {}
    line = (f"{snap['id']} {snap['state']} {snap['stage']} {st.get('state', '')}: "
            f"{st.get('done', 0)}/{st.get('devices', 0)} done, {st.get('failed', 0)} failed")
    if snap["state"] != "running" and snap.get("reason"):
        line += f" ({snap['reason']})"
    return line


def driver_line(snap: dict[str, Any]) -> str:
    """Who drives the rollout and when it was last heard from; for a rollout that needs a
    driver and has none, what to run."""
    d = snap.get("driver") or {}
    if d.get("live"):
        return f"  driver  {d['owner']} (heartbeat {d.get('heartbeat_age_s')} s ago)"
    if not d.get("needs_driver"):
        return "  driver  none (nothing to drive while " + snap["state"] + ")"
    if d.get("controller"):
        return (f"  driver  none yet: the controller {d['controller']} picks it up "
                f"(heartbeat {d.get('controller_heartbeat_age_s')} s ago)")
    last = f"; last driver {d['owner']}, heard from {d['heartbeat_age_s']} s ago" \
        if d.get("owner") and d.get("heartbeat_age_s") is not None else ""
    return (f"  driver  NONE: nobody is driving it{last}; start a controller: edgefleet "
            f"fleet controller, or: edgefleet fleet rollout resume {snap['id']} --once")


def bar(done: int, failed: int, total: int, width: int = 24) -> str:
    if total <= 0:
        return "[" + " " * width + "]"
    d = round(width * done / total)
    f = min(width - d, round(width * failed / total))
    return "[" + "#" * d + "x" * f + "." * (width - d - f) + "]"


def render_status(snap: dict[str, Any], *, bars: bool = True, wide: bool = False) -> str:
    """`rollout status` for people; `wide` (-o wide) adds the bundle's URL and full digest and
    lists every problem, not the first ten."""

    def when(ts: float | None) -> str:
        return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ") if ts \
            else "-"

    b = snap["bundle"]
    elapsed = (snap["finished"] or snap["updated"]) - snap["created"]
    lines = [
        f"rollout {snap['id']}  {snap['state'].upper()}  stage {snap['stage']} "
        f"({snap['phase']})  {elapsed:.1f} s",
        f"  bundle  {b['name']} {b['version']}  sequence {b['sequence']}  "
        f"sha256:{b['digest'] if wide else b['digest'][:16]}  {b['size']} bytes"
        + (f"  {b['url']}" if wide and b.get("url") else ""),
        f"  started {when(snap['created'])} by {snap['created_by']}; {snap['devices']} devices"
        f"; selector {snap['plan'].get('selector') or '(all)'}",
        driver_line(snap),
        f"  {'STAGE':<8} {'KIND':<8} {'DEVICES':>7}  {'PROGRESS':<26} {'DONE':>9} "
        f"{'FAILED':>6} {'SKIP':>4}  STATE",
    ]
    for s in snap["stages"]:
        verdict = s.get("verdict") or {}
        note = ""
        if verdict and s["state"] in ("baking", "failed", "paused", "passed", "partial"):
            ev = verdict.get("evidence") or {}
            if s["kind"] == "shadow":
                note = f"  {verdict.get('verdict')} ({ev.get('dies', 0)} dies)"
            else:
                note = f"  {verdict.get('verdict')} ({ev.get('requests', 0)} requests)"
        if s["in_flight"] and s["state"] == "deploying":
            note += f"  {s['in_flight']} in flight"
        lines.append(
            f"  {s['name']:<8} {s['kind']:<8} {s['devices']:>7}  "
            f"{bar(s['done'], s['failed'], s['devices']) if bars else '':<26} "
            f"{str(s['done']) + '/' + str(s['devices']):>9} {s['failed']:>6} {s['skipped']:>4}  "
            f"{s['state']}{note}")
    if snap.get("rollback"):
        rb = snap["rollback"]
        lines.append(f"  rollback: {rb['done']}/{rb['devices']} done, {rb['failed']} failed")
    if snap.get("reason"):
        lines.append(f"  reason: {snap['reason']}")
    for s in snap["stages"]:
        if s["state"] in ("baking", "failed", "paused") and s.get("verdict"):
            bad = [r for r in s["verdict"]["results"] if r["verdict"] != "pass"]
            for r in bad[:6]:
                val = "" if r["value"] is None else f" = {r['value']:.4g}"
                lines.append(f"  gate {s['name']}: {r['gate']}: {r['verdict']}{val}"
                             + (f" ({r['reason']})" if r.get("reason") else ""))
    probs = snap.get("problems") or []
    if probs:
        lines.append(f"  problems ({len(probs)}):")
        for p in probs if wide else probs[:10]:
            lines.append(f"    {p['device']} {p['step']} {p['status']}: {p['reason']}"
                         + (f" - {p['detail'][:80]}" if p.get("detail") else ""))
        if len(probs) > 10 and not wide:
            lines.append(f"    ... {len(probs) - 10} more (-o wide lists all)")
    return "\n".join(lines)


def rollouts_table(rows: Sequence[RolloutRow], stage_names: Mapping[str, str], *,
                   wide: bool = False) -> str:
    """`rollout list` for people; `stage_names` maps a rollout id to its current stage's name.
    `wide` (-o wide) adds the phase, sequence, full digest, end time and reason."""

    def when(ts: float | None) -> str:
        return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M") if ts else "-"

    head = ("ROLLOUT", "STATE", "STAGE", "MODEL", "SHA256", "STARTED", "BY")
    table = [head + (("PHASE", "SEQ", "FINISHED", "REASON") if wide else ())]
    for r in rows:
        row = (r.id, r.state, stage_names[r.id], f"{r.model_name} {r.model_version}",
               r.bundle_digest if wide else r.bundle_digest[:12], when(r.created), r.created_by)
        if wide:
            row += (r.phase or "-", str(r.sequence), when(r.finished), r.reason or "-")
        table.append(row)
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in table)


def dry_run_text(plan: Plan, stages: Sequence[StagePlan], inv: Inventory, bundle: Bundle,
                 checks: Sequence[str], already: Set[str]) -> str:
    """`rollout start --dry-run` for people: what was checked, the plan's settings, then each
    stage's devices, those in `already` (on the bundle now) marked with a `*`."""
    b = bundle
    lines = [f"dry run: {b.name} {b.version} (sequence {b.sequence}, sha256:{b.digest[:12]}); "
             "nothing is sent"]
    lines += [f"  checked: {c}" for c in checks]
    gates = ", ".join(str(g) for g in plan.bake_gates)
    lines.append(f"  bake {plan.bake_s:g} s after the canary, {plan.wave_bake:g} s after each "
                 f"wave but the last; gates: {gates}")
    if plan.shadow:
        lines.append(f"  shadow gates: {', '.join(str(g) for g in plan.shadow_gate_list)}; "
                     f"at least {plan.shadow_min_dies} dies")
    if plan.label_gates:
        lines.append(f"  label gates: {', '.join(str(g) for g in plan.label_gate_list)} over "
                     f"{plan.label_window_s:g} s of labels; at least {plan.label_min_good} "
                     f"good / {plan.label_min_bad} bad labelled dies")
    lines.append(f"  at most {plan.max_parallel} installing at once; failure budget "
                 f"{plan.max_failures} per stage; on failure: {plan.on_failure}; offline: "
                 f"{plan.offline}")
    for s in stages:
        sites = sorted({inv.devices[d].labels.get(plan.spread[0], "-") if plan.spread else "-"
                        for d in s.devices})
        lines.append(f"{s.name:<8} {s.kind:<8} {len(s.devices):>5} devices  "
                     f"({(plan.spread or ('-',))[0]}: {', '.join(sites)})")
        lines.append(_wrap(", ".join(d + ("*" if d in already else "") for d in s.devices),
                           "    "))
    if already:
        lines.append(f"* already on this bundle ({len(already)}): {', '.join(sorted(already))}")
    return "\n".join(lines)


def _wrap(text: str, indent: str, width: int = 100) -> str:
    return textwrap.fill(text, width, initial_indent=indent, subsequent_indent=indent)
