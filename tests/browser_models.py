"""What the browser test serves and shows: a tiny synthetic text-head model with an input gate (so the
synthetic refusal's wording and one-click text scoring can be seen), an image that gate refuses, and two
evaluated models for the Experiments page's paired differences."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from conftest import TINY_LABELS


def gated_text_model(root: Path) -> Path:
    """A tiny text-head model trained on nothing, marked synthetic, with an OOD gate fitted on a small
    synthetic demo (its false-rejection target 5%): demo drawings pass, other pictures are refused."""
    import torch

    from cxrlt.artefact.checkpoint import save_artefact
    from cxrlt.data.demo.generate import generate_demo
    from cxrlt.data.manifest import build_manifest
    from cxrlt.gate import calibrate_artefact
    from cxrlt.labels import LabelSpace
    from cxrlt.models import create_model
    from cxrlt.models.text import TextEncoderSpec, embedding_id, encode_labels

    space = LabelSpace.from_counts(TINY_LABELS, n_train=1000, synthetic=True)
    spec = TextEncoderSpec(name="tiny", prompt="description")
    torch.manual_seed(0)
    model = create_model("chexfusion_test", num_labels=len(space), query="text",
                         label_embeddings=encode_labels(space.names, spec, use_cache=False))
    art = save_artefact(root / "browser-text", model, model_name="chexfusion_test", label_space=space,
                        data={"image_size": 64}, variant="browser-text", synthetic=True,
                        text_encoder={**asdict(spec), "embedding_id": embedding_id(space.names, spec)},
                        metrics={"val": {"mAP": 0.5, "mAUC": 0.6, "mF1": 0.1}}, thresholds=[0.5] * len(space))
    generate_demo(root / "demo", n_studies=120, seed=5, progress=False, workers=1)
    manifest = build_manifest(root / "demo/cxr-lt-2024", root / "demo/mimic-cxr-jpg", root / "manifest",
                              val_fraction=0.4)
    calibrate_artefact(art, manifest, frr=0.05, device="cpu", other_data=True)
    return art


def refused_and_demo(art: Path) -> tuple[bytes, list[str]]:
    """(a PNG the gate's out-of-distribution check refuses, the codes of the demo study's two images): found
    with the library's own Predictor, so the browser sees exactly what the service decides."""
    import io

    from cxrlt.data.demo.sample import demo_study
    from cxrlt.data.images import read_image
    from cxrlt.gate import check_image
    from cxrlt.gate.synthetic import CATEGORIES, encode, samples
    from cxrlt.inference import Predictor

    p = Predictor.from_path(art)
    demo = [read_image(b, size=p.image_size)[0] for _, b, _ in demo_study()]
    demo_codes = [str(c.code) for c in p.gate_images(demo, ["frontal", "lateral"])]
    for category in ("photo_grey", "hand", "knee", "noise"):
        assert category in CATEGORIES
        for img in samples(category, 6, seed=1):
            data = encode(img, "PNG")
            im, info = read_image(io.BytesIO(data), size=p.image_size)
            if not check_image(info, im).passed:
                continue                       # refused by a rule: not the check whose wording is tested
            (ood,) = p.gate_images([im], ["frontal"])
            if ood.passed is False and ood.code == "ood":
                return data, demo_codes
    raise AssertionError("no non-chest picture is refused by the gate's out-of-distribution check")


def evaluated_pair(root: Path, name: str) -> tuple[Path, list[str]]:
    """Two hand-made evaluated models registered as `name` (a loss and a query apart: no research question
    pairs them), and the manifest they were evaluated on."""
    from cxrlt.registry import store
    from test_report import _artefact, _manifest, noisy

    man = _manifest(root)
    tags = []
    for variant, strength, kw in (("fusion-asl", 0.35, {}), ("fusion-ral-text", 0.2, {"loss": "ral", "query": "text"})):
        d = _artefact(root / "art", variant, noisy(strength), **kw)
        (d / "metrics.json").write_text(json.dumps({"val": {"mAP": strength, "mAUC": 0.6, "mF1": 0.2}}))
        tags.append(store.register(d, name=name))
    return man, tags
