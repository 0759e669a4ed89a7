"""One synthetic study, drawn on demand: what the web app's "Try a demo study" button loads. It is drawn by the
same code as the demo data set (`render_image`, saved as JPEG like `generate_demo`), so a model trained on
the demo sees an image like the ones it was trained on; nothing is downloaded or shipped as a file."""

from __future__ import annotations

import io

from PIL import Image

from cxrlt.data.demo.draw import ALL_FINDINGS, render_image

DEMO_FINDINGS = ("Cardiomegaly", "Pleural Effusion")
DEMO_SIZE = (320, 256)      # (height, width), the demo data set's default


def demo_study(findings=DEMO_FINDINGS, seed: int = 7, size: tuple[int, int] = DEMO_SIZE) -> list[tuple[str, bytes, str]]:
    """A frontal and a lateral image of one synthetic patient with `findings` drawn in:
    [(file name, JPEG bytes, view)], frontal first."""
    findings = tuple(f for f in findings if f in ALL_FINDINGS)
    out = []
    for k, view in enumerate(("frontal", "lateral")):
        arr = render_image(view, findings, (seed, k), size, patient_seed=seed)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        out.append((f"demo-{view}.jpg", buf.getvalue(), view))
    return out
