"""Experiments: the comparison report (tables with bootstrap intervals, plots) of a chosen set of registered
models. The report is made by `cxrlt compare` in a child process (the report reads evaluation outputs with
the library, which imports torch; the web app never does), into CXRLT_COMPARE_DIR (default
reports/compare-ui)/<hash of the choice>, and shown again without recomputing while the choice is the same."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import streamlit as st

import compare
from common import model_name, reports_root

SPLITS = ("test", "dev", "val")


def default_manifest() -> str:
    """CXRLT_MANIFEST, else the pipeline's evaluation manifest (params.yaml paths.cache), else prepared/cache."""
    if os.environ.get("CXRLT_MANIFEST"):
        return os.environ["CXRLT_MANIFEST"]
    try:
        import yaml

        return str(yaml.safe_load(Path("params.yaml").read_text())["paths"]["cache"])
    except (OSError, KeyError, TypeError, ValueError):
        return "prepared/cache"


def out_dir(tags: list[str], manifest: str, split: str, n_boot: int) -> Path:
    key = "\n".join([*sorted(tags), str(Path(manifest).resolve()), split, str(n_boot)])
    return reports_root() / hashlib.sha256(key.encode()).hexdigest()[:12]


def build(paths: list[Path], manifest: str, split: str, n_boot: int, out: Path) -> tuple[bool, str]:
    cmd = [sys.executable, "-m", "cxrlt", "compare", "--manifest", manifest, "--out", str(out), "--split", split,
           "--bootstrap", str(n_boot), *map(str, paths)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        return False, "the report took more than 15 minutes: choose fewer models or fewer bootstrap resamples"
    return p.returncode == 0, (p.stderr or p.stdout)[-3000:]


FIGURES = {"map_by_group": "Bar chart: each model's mAP on head, medium and tail labels, with 95% intervals",
           "ap_vs_frequency": "Scatter plot: each label's average precision against its number of training "
                              "images, one colour per model",
           "zero_shot_auroc": "Bar chart: zero-shot AUROC of each held-out finding, with 95% intervals"}


def _differences(out: Path, names: list[str]) -> None:
    st.markdown("#### Two models: paired differences")
    pairs_csv = out / "pairs.csv"
    if len(names) < 2:
        st.info("Choose two or more models to see their paired differences.")
        return
    if not pairs_csv.exists():
        st.info("This report was built before paired differences existed: press Rebuild the report.")
        return
    c = st.columns(2)
    a = c[0].selectbox("Model A", names, index=0, key="exp_a")
    b = c[1].selectbox("Model B", names, index=1, key="exp_b")
    if a == b:
        st.info("Choose two different models.")
        return
    table = compare.pair(pd.read_csv(pairs_csv), a, b)
    st.dataframe(table, hide_index=True, width="stretch")
    st.caption("B − A on the same resampled patients (paired bootstrap, 95% basic interval): the difference is "
               "distinguishable from zero when its interval excludes 0. One seed a side; the report below says "
               "which differences it calls after Holm's adjustment.")


def show(out: Path) -> None:
    csv = out / "results.csv"
    names: list[str] = []
    if csv.exists():
        results = pd.read_csv(csv)
        names = list(results["variant"])
        st.markdown("#### Results (95% bootstrap intervals over patients)")
        st.dataframe(compare.compact(results), hide_index=True, width="stretch")
        _differences(out, names)
        with st.expander(f"All {len(results.columns)} columns of results.csv"):
            st.dataframe(compare.raw(results), hide_index=True, width="stretch")
    figures = sorted((out / "figures").glob("*.png"))
    if figures:
        st.markdown("#### Plots")
        for col, fig in zip(st.columns(min(len(figures), 3)) * len(figures), figures):
            with col:
                st.image(str(fig), caption=fig.stem.replace("_", " "), width="stretch",
                         alt=FIGURES.get(fig.stem, f"Plot of the comparison report: {fig.stem.replace('_', ' ')}"))
    md = out / "report.md"
    if md.exists():
        with st.expander("The full report (research questions, paired comparisons, literature)"):
            text = re.sub(r"^!\[[^\]]*\]\([^)]*\)\s*$", "", md.read_text(), flags=re.M)  # plots shown above
            st.markdown(text)


def main() -> None:
    from cxrlt.registry import store

    st.header("Experiments")
    name = model_name()
    rows = [r for r in store.list_registered(name) if r.get("val_mAP") is not None]
    if not rows:
        st.info(f"No evaluated model named '{name}' is registered: run `make demo`, or set CXRLT_MODEL_NAME.")
        return
    st.caption("Compare registered models on one split of the manifest they were evaluated on. Every number is "
               "recomputed from the models' saved predictions, with bootstrap intervals over patients.")
    labels = {r["tag"]: f"{r['tag']} · {r['variant']} · val mAP {r['val_mAP']:.3f}" for r in rows}
    serving = next((r for r in rows if r["serving"]), rows[0])
    same_data = [r["tag"] for r in rows if r.get("data_version") == serving.get("data_version")][:6]
    tags = st.multiselect("Models", list(labels), default=same_data, format_func=labels.get, key="exp_tags")
    c = st.columns(3)
    manifest = c[0].text_input("Manifest folder", value=default_manifest(), key="exp_manifest",
                               help="the manifest the models were evaluated on (CXRLT_MANIFEST)")
    split = c[1].selectbox("Split", SPLITS, key="exp_split")
    n_boot = int(c[2].number_input("Bootstrap resamples", 20, 2000, 200, step=20, key="exp_boot"))
    if not tags:
        st.info("Choose at least one model.")
        return
    versions = {r.get("data_version") for r in rows if r["tag"] in tags}
    if len(versions) > 1:
        st.warning("These models were validated on different data sets: their numbers below are comparable "
                   "only if all were evaluated on the chosen manifest.")
    out = out_dir(tags, manifest, split, n_boot)
    have = (out / "report.md").exists()
    if st.button("Rebuild the report" if have else "Build the report", key="exp_build", type="primary"):
        if not (Path(manifest) / "manifest.csv").exists():
            st.error(f"{manifest} is not a manifest folder (no manifest.csv): give the folder the models were "
                     "evaluated on (the pipeline's is params.yaml's paths.cache).")
            return
        with st.spinner(f"Scoring {len(tags)} model(s) with {n_boot} bootstrap resamples..."):
            ok, log = build([store.model_path(t) for t in tags], manifest, split, n_boot, out)
        if not ok:
            st.error("`cxrlt compare` failed:")
            st.code(log)
            return
        have = True
    if have:
        show(out)
    else:
        st.info("Press Build to make the report for this choice.")


main()
