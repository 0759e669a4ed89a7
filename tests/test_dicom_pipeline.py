"""DICOM through the callers: the training cache and the service see the same pixels; `cxrlt predict` reads .dcm."""

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrlt.cli.main import main
from cxrlt.data.demo.generate import generate_demo
from cxrlt.data.images import load_grayscale, read_image
from cxrlt.data.manifest import build_manifest
from cxrlt.data.manifest_io import load_manifest
from cxrlt.data.prepare import READER, cache_pixels, prepare_cache
from dicom_factory import ENCODABLE, make_dicom


@pytest.mark.parametrize("syntax", ["explicit", "jpeg2000", "rle"])
@pytest.mark.parametrize("size", [16, 48])
def test_prepare_caches_exactly_the_pixels_the_service_reads(syntax, size, tmp_path):
    if syntax not in ENCODABLE:
        pytest.skip(f"no {syntax} encoder here")
    data = make_dicom(size=(160, 128), photometric="MONOCHROME1", window=(1200, 1800), syntax=syntax)
    path = tmp_path / "x.dcm"
    path.write_bytes(data)
    cached = np.asarray(cache_pixels(str(path), size))             # what prepare saves (before JPEG encoding)
    served = np.asarray(read_image(data, size)[0])                 # what the service decodes from the upload
    assert cached.shape == (size, size) and np.array_equal(cached, served)


@pytest.fixture(scope="module")
def dicom_demo(tmp_path_factory):
    """The synthetic demo with every image turned into a DICOM file (varied depth, polarity and syntax)."""
    root = tmp_path_factory.mktemp("dcmdemo")
    generate_demo(root / "demo", n_studies=20, seed=5, workers=1, progress=False)
    images, labels = root / "demo" / "mimic-cxr-jpg", root / "demo" / "cxr-lt-2024"
    syntaxes = [s for s in ("explicit", "jpeg2000", "rle") if s in ENCODABLE]
    for i, jpg in enumerate(sorted(images.rglob("*.jpg"))):
        pic = np.asarray(Image.open(jpg).convert("L"), dtype=np.float32) / 255.0
        kw = {"bits_stored": (12, 16, 10)[i % 3], "photometric": ("MONOCHROME2", "MONOCHROME1")[i % 2],
              "syntax": syntaxes[i % len(syntaxes)], "view": None}
        jpg.with_suffix(".dcm").write_bytes(make_dicom(pic, **kw))
        jpg.unlink()
    for csv in labels.glob("*.csv"):
        df = pd.read_csv(csv, dtype=str, keep_default_na=False)
        if "fpath" in df:
            df["fpath"] = df["fpath"].str.replace(r"\.jpg$", ".dcm", regex=True)
            df.to_csv(csv, index=False)
    build_manifest(labels, images, root / "manifest")                  # the image check finds the .dcm files
    return root


def test_manifest_and_cache_from_dicom_sources(dicom_demo, tmp_path):
    m = load_manifest(dicom_demo / "manifest")
    assert m.frame["path"].str.endswith(".dcm").all()
    out = prepare_cache(dicom_demo / "manifest", tmp_path / "cache", size=32, workers=1, progress=False)
    cached = load_manifest(out)
    for rel in m.frame["path"]:
        src = m.image_path(rel)
        got = np.asarray(load_grayscale(cached.image_path(rel)), dtype=float)   # JPEG under the source's name
        want = np.asarray(read_image(src, 32)[0], dtype=float)
        assert got.shape == (32, 32) and np.abs(got - want).mean() < 3, rel
    times = {p: p.stat().st_mtime_ns for p in out.rglob("*.dcm")}
    prepare_cache(dicom_demo / "manifest", out, size=32, workers=1, progress=False)   # all cached: skipped
    assert times == {p: p.stat().st_mtime_ns for p in out.rglob("*.dcm")}
    # a cache written by an older reader (no "reader" recorded) has its non-JPEG images redone
    meta = json.loads((out / "manifest.json").read_text())
    assert meta["cache"]["reader"] == READER
    del meta["cache"]["reader"]
    (out / "manifest.json").write_text(json.dumps(meta))
    prepare_cache(dicom_demo / "manifest", out, size=32, workers=1, progress=False)
    assert all(p.stat().st_mtime_ns != t for p, t in times.items())
    assert json.loads((out / "manifest.json").read_text())["cache"]["reader"] == READER


def test_a_missing_dicom_is_named_by_the_manifest_check(dicom_demo, tmp_path):
    from cxrlt.data.manifest_io import ManifestError

    images = dicom_demo / "demo" / "mimic-cxr-jpg"
    victim = next(images.rglob("*.dcm"))
    saved = victim.read_bytes()
    victim.unlink()
    try:
        with pytest.raises(ManifestError, match=r"1 image\(s\) not found.*\.dcm"):
            build_manifest(dicom_demo / "demo" / "cxr-lt-2024", images, tmp_path / "m")
    finally:
        victim.write_bytes(saved)


def test_predict_reads_dicom_and_takes_the_view_from_the_header(tiny_artefact, tmp_path, capsys):
    lateral = tmp_path / "lat.dcm"
    lateral.write_bytes(make_dicom(view="LL", size=(64, 64)))
    frontal = tmp_path / "pa.dcm"
    frontal.write_bytes(make_dicom(view="PA", size=(64, 64), photometric="MONOCHROME1"))
    no_view = tmp_path / "none.dcm"
    no_view.write_bytes(make_dicom(view=None, size=(64, 64)))

    def predict(*args):
        assert main(["predict", *map(str, args), "--artefact", str(tiny_artefact)]) == 0
        return json.loads(capsys.readouterr().out)

    from_header = predict(frontal, lateral, no_view)
    given = predict(frontal, lateral, no_view, "--views", "frontal", "lateral", "unknown")
    assert from_header == given
    assert predict(frontal, lateral, no_view, "--views", "lateral", "frontal", "unknown") != from_header
    png = tmp_path / "x.png"
    read_image(no_view.read_bytes())[0].save(png)
    a, b = predict(png), predict(no_view)
    assert a["probabilities"] == b["probabilities"]                 # a PNG has no view: unknown, like no header view
    assert set(b["gate"][0]["ran"]) - set(a["gate"][0]["ran"]) == {"modality", "body_part"}  # DICOM-only checks
    assert a["gate"][0]["passed"] and b["gate"][0]["passed"]


def test_predict_refuses_a_bad_dicom_with_the_reason(tiny_artefact, tmp_path, capsys):
    bad = tmp_path / "multi.dcm"
    bad.write_bytes(make_dicom(frames=2, size=(32, 32)))
    assert main(["predict", str(bad), "--artefact", str(tiny_artefact)]) == 2
    err = capsys.readouterr().err
    assert "multi.dcm" in err and "2 frames" in err and "Traceback" not in err
