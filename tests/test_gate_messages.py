"""The gate's refusal in words: one sentence builder (cxrlt.gate.messages) behind the service's 422, `cxrlt
predict` and the web app. A model trained on the synthetic demo says that real radiographs are outside what
it has seen and that a model trained on real data is the way to score them."""

from __future__ import annotations

import shutil

import pytest

from cxrlt.gate.messages import SYNTHETIC_SCOPE, ood_refusal


def test_the_synthetic_refusal_says_why_and_what_to_do():
    s = ood_refusal(31.24, 12.0, 0.01, synthetic=True)
    assert "31.2" in s and "12.0" in s and "1%" in s
    assert "SYNTHETIC" in s and "real chest radiograph is outside what it has seen" in s
    assert "train a model on real data" in s
    assert "Send a frontal or lateral chest radiograph" not in s   # resending the same image cannot help
    real = ood_refusal(31.24, 12.0, 0.01, synthetic=False)
    assert "Send a frontal or lateral chest radiograph of an adult" in real and SYNTHETIC_SCOPE not in real


@pytest.fixture(scope="module")
def gated(tiny_artefact, tmp_path_factory):
    """A copy of the tiny synthetic model with a gate fitted on a small demo at a 50% false-rejection rate, so
    that some genuine-looking images are refused by the out-of-distribution check."""
    from cxrlt.data.demo.generate import generate_demo
    from cxrlt.data.manifest import build_manifest
    from cxrlt.gate import calibrate_artefact

    root = tmp_path_factory.mktemp("gated")
    art = shutil.copytree(tiny_artefact, root / "tiny-gated")
    generate_demo(root / "demo", n_studies=100, seed=3, progress=False, workers=1)
    manifest = build_manifest(root / "demo/cxr-lt-2024", root / "demo/mimic-cxr-jpg", root / "manifest",
                              val_fraction=0.4)
    calibrate_artefact(art, manifest, frr=0.5, device="cpu", other_data=True)
    return art, manifest


@pytest.mark.slow
def test_predict_and_the_cli_give_the_synthetic_wording(gated, capsys):
    from cxrlt.cli.main import main
    from cxrlt.data.images import read_image
    from cxrlt.inference import Predictor

    art, manifest = gated
    frame = manifest.split("test") if len(manifest.split("test")) else manifest.split("val")
    paths = [manifest.image_root / p for p in frame["path"]][:24]
    p = Predictor.from_path(art)
    assert p.synthetic
    checks = p.gate_images([read_image(f, size=p.image_size)[0] for f in paths])
    refused = [(f, c) for f, c in zip(paths, checks) if c.passed is False and c.code == "ood"]
    assert refused, "a 50% gate refused none of 24 images"
    assert all(c.message.endswith(SYNTHETIC_SCOPE) for _, c in refused)
    main(["predict", "--artefact", str(art), str(refused[0][0])])
    err = capsys.readouterr().err
    assert "the service would refuse" in err and SYNTHETIC_SCOPE in err
