"""The Predict page's logic without Streamlit: checks of the chosen files, default views, the findings of an
answer (with "No Finding" read as the absence of findings), the probability chart and heatmap overlays.
Light imports only (numpy, pandas, PIL, altair; cxrlt's image reader): never torch."""

from __future__ import annotations

import base64
import hashlib
import io
from dataclasses import dataclass

import altair as alt
import numpy as np
import pandas as pd
from PIL import Image

from cxrlt.data.images import is_dicom
from cxrlt.labels import is_normal

MAX_IMAGES = 4                       # the service's default; /model says the served model's limit
MAX_IMAGE_BYTES = 20 * 2**20


def kind_of(data: bytes) -> str | None:
    """'PNG', 'JPEG' or 'DICOM' from the file's first bytes, else None."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if is_dicom(data[:132]):
        return "DICOM"
    return None


def check_selection(files: list[tuple[str, bytes]], max_images: int = MAX_IMAGES,
                    max_bytes: int = MAX_IMAGE_BYTES) -> list[str]:
    """What is wrong with the chosen files as one study (empty when they can be sent)."""
    problems = []
    if len(files) > max_images:
        problems.append(f"{len(files)} images chosen: a study has at most {max_images} images. Remove "
                        f"{len(files) - max_images} of them.")
    for i, (name, data) in enumerate(files, 1):
        if kind_of(data) is None:
            problems.append(f"image {i} ({name}) is not a PNG, JPEG or DICOM file: choose a chest radiograph "
                            "in one of these formats.")
        elif len(data) > max_bytes:
            problems.append(f"image {i} ({name}) is {len(data) / 2**20:.1f} MiB: at most "
                            f"{max_bytes // 2**20} MiB per image.")
    return problems


def files_hash(files: list[tuple[str, bytes]]) -> str:
    """The identity of a study's inputs: the files' contents in order (names do not matter)."""
    h = hashlib.sha256()
    for _, data in files:
        h.update(hashlib.sha256(data).digest())
    return h.hexdigest()[:16]


def header_view(data: bytes) -> str | None:
    """'frontal' / 'lateral' from a DICOM's ViewPosition, else None (PNG/JPEG, or no usable code)."""
    if kind_of(data) != "DICOM":
        return None
    from cxrlt.data.images import read_image

    try:
        return read_image(data)[1].view
    except Exception:  # noqa: BLE001 - the service says what is wrong with the file
        return None


def default_views(header: list[str | None]) -> list[str]:
    """A view per image: the DICOM header's where it has one; else the first image without one is taken as
    frontal and the second as lateral (the usual PA + lateral study); the rest unknown."""
    out, guesses = [], iter(("frontal", "lateral"))
    taken = {v for v in header if v}
    for v in header:
        if v:
            out.append(v)
            continue
        guess = next(guesses, "unknown")
        while guess in taken and guess != "unknown":   # a DICOM already is the frontal: guess the other
            guess = next(guesses, "unknown")
        taken.add(guess)
        out.append(guess)
    return out


def preview(data: bytes):
    """What to show for an upload: PNG/JPEG bytes as they are; a DICOM as the 8-bit picture the service reads."""
    if kind_of(data) == "DICOM":
        from cxrlt.data.images import read_image

        return read_image(data)[0]
    return data


def grey(data: bytes) -> Image.Image:
    from cxrlt.data.images import read_image

    return read_image(data)[0]


@dataclass(frozen=True)
class Findings:
    findings: list[str]          # abnormal labels over threshold, most probable first
    normal: str | None           # the model's "No Finding" label, if it has one
    normal_p: float | None
    normal_t: float | None

    @property
    def normal_over(self) -> bool:
        return self.normal is not None and self.normal_p >= self.normal_t

    @property
    def conflict(self) -> bool:
        return self.normal_over and bool(self.findings)


def read_findings(body: dict) -> Findings:
    probs, thr = body.get("probabilities", {}), body.get("thresholds", {})
    listed = body.get("findings")
    if listed is None:
        listed = sorted((k for k in probs if probs[k] >= thr.get(k, 0.5)), key=lambda k: -probs[k])
    normal = next((k for k in probs if is_normal(k)), None)
    return Findings([k for k in listed if not is_normal(k)], normal,
                    None if normal is None else float(probs[normal]),
                    None if normal is None else float(thr.get(normal, 0.5)))


def heatmap_choices(body: dict, most: int) -> tuple[list[str], list[str]]:
    """The labels a heatmap can be asked for (never No Finding / Normal: the absence of findings has no
    place to point at) and those preselected: the ones the answer already explains, in its order."""
    labels = [k for k in body["probabilities"] if not is_normal(k)]
    shown = dict.fromkeys(e["finding"] for e in body.get("explanations", []))
    return labels, [f for f in shown if f in labels][:most]


def findings_chart(body: dict, top: int | None = None) -> alt.Chart:
    """Horizontal bars of every abnormal label's probability, the threshold as a black tick; full names."""
    probs, thr = body["probabilities"], body["thresholds"]
    df = pd.DataFrame({"label": [k for k in probs if not is_normal(k)]})
    df["probability"] = [float(probs[k]) for k in df["label"]]
    df["threshold"] = [float(thr.get(k, 0.5)) for k in df["label"]]
    df["finding"] = df["probability"] >= df["threshold"]
    df = df.sort_values("probability", ascending=False)
    if top:
        df = df.head(top)
    order = df["label"].tolist()
    y = alt.Y("label:N", sort=order, title=None, axis=alt.Axis(labelLimit=0, labelOverlap=False))
    bars = alt.Chart(df).mark_bar().encode(
        x=alt.X("probability:Q", scale=alt.Scale(domain=[0, 1]), title="probability"), y=y,
        color=alt.Color("finding:N", scale=alt.Scale(domain=[True, False], range=["#d62728", "#9ecae1"]),
                        legend=alt.Legend(title="over threshold", orient="bottom")),
        tooltip=["label", alt.Tooltip("probability:Q", format=".3f"), alt.Tooltip("threshold:Q", format=".3f")])
    ticks = alt.Chart(df).mark_tick(color="black", thickness=2, size=18).encode(x="threshold:Q", y=y)
    # a fixed step per label: a fixed total height squeezes the rows (and hides labels) under Streamlit's
    # autosize "fit" once the legend takes its share
    return (bars + ticks).properties(height=alt.Step(22))


def heat_array(png_b64: str) -> np.ndarray:
    """The service's heatmap (base64 8-bit grey PNG) as floats 0..1."""
    with Image.open(io.BytesIO(base64.b64decode(png_b64))) as im:
        return np.asarray(im.convert("L"), dtype=np.float32) / 255.0


def jet(h: np.ndarray) -> np.ndarray:
    """Evidence 0..1 -> RGB 0..1: blue -> green -> red (the heatmaps' colour scale)."""
    return np.stack([np.clip(1.5 - abs(4 * h - 3), 0, 1), np.clip(1.5 - abs(4 * h - 2), 0, 1),
                     np.clip(1.5 - abs(4 * h - 1), 0, 1)], axis=-1)


def colour_bar(width: int = 300, height: int = 14) -> Image.Image:
    """The heatmaps' colour scale as a horizontal bar, 0 (left) to 1 (right), as blended at full evidence."""
    h = np.tile(np.linspace(0, 1, width, dtype=np.float32), (height, 1))
    return Image.fromarray((jet(h) * 255).astype(np.uint8), mode="RGB")


def heat_is_empty(png_b64: str, floor: float = 1 / 255) -> bool:
    """True when a heatmap holds no positive evidence anywhere (all zero, at the PNG's 8-bit precision)."""
    return float(heat_array(png_b64).max()) < floor


def overlay(image: Image.Image, png_b64: str, alpha: float = 0.45) -> Image.Image:
    """The heatmap over the image. The model saw the image resized (not cropped) to its input square, so
    the heatmap is stretched back to the image's own width and height."""
    base = image.convert("L")
    heat = Image.fromarray((heat_array(png_b64) * 255).astype(np.uint8), mode="L").resize(base.size,
                                                                                          Image.Resampling.BILINEAR)
    h = np.asarray(heat, dtype=np.float32) / 255.0
    colour = jet(h)
    g = np.asarray(base, dtype=np.float32)[..., None] / 255.0
    a = alpha * h[..., None]                                              # cold regions keep the radiograph
    out = (1 - a) * g + a * colour
    return Image.fromarray((np.clip(out, 0, 1) * 255).astype(np.uint8), mode="RGB")


def guarantee_lines(g: dict | None) -> tuple[str, str]:
    """The answer's findings with a guarantee -> (the sets in one line, the guarantee in words)."""
    if not g:
        return "", "This service's answer carries no guarantee (an older service)."
    if not g.get("available"):
        return "", g.get("statement", "No guarantee.")
    confirmed, uncertain = g.get("confirmed", []), g.get("uncertain", [])
    parts = [f"confirmed: {', '.join(confirmed)}" if confirmed else "none confirmed",
             f"uncertain, to check: {', '.join(uncertain)}" if uncertain else "nothing uncertain"]
    if not g.get("set"):
        parts = ["the set is empty: no trained finding is likely enough to enter it"]
    return "Findings with a guarantee: " + "; ".join(parts), g.get("statement", "")
