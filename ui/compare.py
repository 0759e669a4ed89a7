"""The Experiments page's tables, from the files `cxrlt compare` writes (pure pandas, no Streamlit): a compact
table of the headline metrics with their intervals, the paired differences of two chosen models, and the raw
columns made readable (3 decimals, no folders)."""

from __future__ import annotations

import math

import pandas as pd

HEADLINE = {"mAP": "mAP", "mAUC": "mAUC", "mAP_head": "head mAP", "mAP_medium": "medium mAP",
            "mAP_tail": "tail mAP"}
HIDDEN = ("folder",)          # where the artefacts sit on the server: not for the page


def _num(v) -> float:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return math.nan
    return v


def with_ci(v, lo, hi, note="", signed: bool = False) -> str:
    """0.192 [0.170, 0.193]; a note (withheld, unreliable) after it; '–' without a value."""
    v, lo, hi = _num(v), _num(lo), _num(hi)
    if math.isnan(v):
        return "–"
    f = "{:+.3f}" if signed else "{:.3f}"
    out = f.format(v) + (f" [{f.format(lo)}, {f.format(hi)}]" if not (math.isnan(lo) or math.isnan(hi)) else "")
    note = "" if note is None or (isinstance(note, float) and math.isnan(note)) else str(note)
    return f"{out} ({note})" if note else out


def compact(results: pd.DataFrame) -> pd.DataFrame:
    """One row per model: what it is, then mAP, mAUC and head / medium / tail mAP with 95% intervals."""
    rows = []
    for r in results.to_dict("records"):
        row = {"model": r["variant"], "kind": r.get("kind", ""), "loss": r.get("loss", "")}
        for key, title in HEADLINE.items():
            if key in r:
                row[title] = with_ci(r[key], r.get(f"{key}_ci_low"), r.get(f"{key}_ci_high"), r.get(f"{key}_ci_note"))
        row["images"] = int(r["n_images"]) if "n_images" in r and not pd.isna(r["n_images"]) else "–"
        rows.append(row)
    return pd.DataFrame(rows)


def pair(pairs: pd.DataFrame, a: str, b: str) -> pd.DataFrame:
    """B - A on each headline metric with its paired 95% interval (the report stores each pair once, in
    report order; the other order is the same numbers negated)."""
    fwd = pairs[(pairs["a"] == a) & (pairs["b"] == b)]
    rev = pairs[(pairs["a"] == b) & (pairs["b"] == a)]
    rows = []
    for r in fwd.to_dict("records"):
        rows.append((r["metric"], r["a_value"], r["b_value"], r["diff"], r["diff_low"], r["diff_high"], r["interval"]))
    for r in rev.to_dict("records"):
        rows.append((r["metric"], r["b_value"], r["a_value"], -r["diff"], -r["diff_high"], -r["diff_low"],
                     r["interval"]))
    out = []
    for metric, va, vb, d, lo, hi, note in rows:
        verdict = note
        if note == "excludes 0":
            verdict = "B higher" if d > 0 else "A higher"
        elif note == "includes 0":
            verdict = "not distinguishable"
        out.append({"metric": HEADLINE.get(metric, metric), f"A: {a}": f"{_num(va):.3f}", f"B: {b}": f"{_num(vb):.3f}",
                    "B − A [95% interval]": with_ci(d, lo, hi, signed=True), "verdict": verdict})
    return pd.DataFrame(out)


def raw(results: pd.DataFrame) -> pd.DataFrame:
    """Every column but the server folders, numbers rounded to 3 decimals."""
    frame = results.drop(columns=[c for c in HIDDEN if c in results])
    return frame.apply(lambda c: c.round(3) if pd.api.types.is_float_dtype(c) else c)
