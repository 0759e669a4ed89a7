"""DICOM Part 10 -> 8-bit grayscale as a viewer shows it (cxrlt.data.dicom through cxrlt.data.images.read_image).

The pictures are built in memory by tests/dicom_factory.py; every identifying attribute carries a distinctive
value (PHI_VALUES) that must never appear in a message, a warning or a log record.
"""

import io
import logging
import warnings

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from cxrlt.data.dicom import view_from_position
from cxrlt.views import FRONTAL_POSITIONS, LATERAL_POSITIONS
from cxrlt.data.image_info import ImageDecodeError
from cxrlt.data.images import read_image
from dicom_factory import ENCODABLE, PHI_VALUES, chest_pixels, make_dicom, to_stored


def px(data, size=None) -> np.ndarray:
    return np.asarray(read_image(data, size)[0], dtype=np.float64)


def corr(a, b) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def ramp(lo=0, hi=4095, h=8, w=256, dtype=np.uint16) -> np.ndarray:
    return np.tile(np.linspace(lo, hi, w).round().astype(dtype), (h, 1))


def assert_no_phi(*texts):
    for t in texts:
        for v in PHI_VALUES:
            assert v not in str(t), f"identifying value {v!r} leaked into: {str(t)[:300]!r}"


@pytest.fixture
def capture_everything(caplog):
    """Every warning and every log record at DEBUG, with pydicom's own debug logging switched on."""
    caplog.set_level(logging.DEBUG)
    pydicom.config.debug(True, default_handler=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught, caplog
    pydicom.config.debug(False, default_handler=False)


# ------------------------------------------------------------------ display pipeline
def test_monochrome2_and_monochrome1_show_bone_bright():
    a = np.zeros((8, 16), np.uint16)
    a[:, 8:] = 4095
    m2, m1 = px(make_dicom(a, photometric="MONOCHROME2")), px(make_dicom(a, photometric="MONOCHROME1"))
    assert m2[:, :8].max() == 0 and m2[:, 8:].min() == 255
    assert m1[:, :8].min() == 255 and m1[:, 8:].max() == 0          # high stored value is dark in MONOCHROME1


def test_window_maps_its_ends_to_black_and_white():
    a = ramp()
    c, w = 2048, 1000
    out = px(make_dicom(a, window=(c, w)))[0]
    v = a[0].astype(float)
    assert out[v <= c - w / 2].max() <= 1 and out[v >= c + w / 2].min() >= 254
    inside = (v > c - w / 2 + 5) & (v < c + w / 2 - 5)
    assert np.allclose(out[inside], (v[inside] - (c - w / 2)) / w * 255, atol=1.5)


def test_rescale_is_applied_before_the_window():
    a = ramp(0, 2000)
    out = px(make_dicom(a, rescale=(2.0, -1000.0), window=(1000, 2000)))[0]   # window in modality units
    v = a[0] * 2.0 - 1000.0                                                   # stored 500 -> 0, 1500 -> 2000
    assert out[v <= 0].max() <= 1 and out[v >= 2000].min() >= 254
    inside = (v > 10) & (v < 1990)
    assert np.allclose(out[inside], v[inside] / 2000 * 255, atol=1.5)


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_voi_lut_functions_match_pydicom(function):
    a = ramp(0, 4095)
    data = make_dicom(a, window=(1500, 1200), voi_function=function, rescale=(1.0, -24.0))
    ds = pydicom.dcmread(io.BytesIO(data))
    ref = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
    lo, hi = -24.0, 4095 - 24.0                                               # pydicom's output range
    ref = (ref - lo) / (hi - lo) * 255
    assert np.abs(px(data) - ref).max() <= 1.0


def test_first_of_several_windows_is_used():
    a = ramp()
    one = px(make_dicom(a, window=(1000, 500)))
    assert np.array_equal(px(make_dicom(a, window=[(1000, 500), (3000, 100)])), one)


def test_voi_lut_sequence_and_modality_lut_sequence_are_applied():
    a = ramp(0, 4095)
    step = np.where(np.arange(4096) < 2048, 100, 900)                        # a VOI LUT: two grey levels
    out = px(make_dicom(a, voi_lut=step))[0]
    assert set(np.unique(out)) == {0.0, 255.0} and out[a[0] < 2048].max() == 0
    half = np.arange(4096) // 2                                              # modality LUT halves the values
    out = px(make_dicom(a, modality_lut=half, window=(512, 1024)))[0]
    v = a[0] // 2
    assert out[v <= 0].max() <= 1 and out[v >= 1024].min() >= 254


def test_no_window_uses_the_full_range_of_the_stored_values():
    a = ramp(1000, 3000)
    out = px(make_dicom(a, window=None))
    assert out.min() == 0 and out.max() == 255


@pytest.mark.parametrize("bits", [8, 10, 12, 16])
def test_bit_depths_give_the_same_picture(bits):
    ref = px(make_dicom(chest_pixels(), bits_stored=12))
    out = px(make_dicom(chest_pixels(), bits_stored=bits))
    assert np.abs(out - ref).max() <= 2 and corr(out, ref) > 0.999


def test_signed_16_bit():
    pic = chest_pixels()
    stored = to_stored(pic, 16, signed=True)
    assert stored.min() < 0 < stored.max()
    out = px(make_dicom(stored, bits_stored=16, signed=True, rescale=(1.0, 0.0)))
    assert corr(out, px(make_dicom(pic))) > 0.999
    signed12 = px(make_dicom(to_stored(pic, 12, signed=True), bits_stored=12, signed=True))
    assert corr(signed12, out) > 0.999


def test_unused_high_bits_and_unextended_signs_are_handled():
    a = ramp(0, 4095)
    clean = px(make_dicom(a, bits_stored=12))
    assert np.array_equal(px(make_dicom(a | 0x8000, bits_stored=12)), clean)       # e.g. overlay bits
    s = a.astype(np.int16) - 2048
    extended = px(make_dicom(s, bits_stored=12, signed=True))
    raw = s.astype(np.uint16) & 0x0FFF                                              # 12-bit two's complement
    assert np.array_equal(px(make_dicom(raw, bits_stored=12, signed=True)), extended)
    assert np.array_equal(extended, clean)


def test_without_a_window_a_dicom_looks_like_its_16_bit_png():
    """No window: the full range, the same rule as 16-bit PNGs, so both exports of a picture agree."""
    from PIL import Image

    stored = to_stored(chest_pixels(), 16)
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, format="PNG")
    assert np.abs(px(make_dicom(stored, bits_stored=16)) - px(buf.getvalue())).max() <= 1


@pytest.mark.parametrize("syntax", [s for s in ENCODABLE if s != "explicit"])
def test_compressed_syntaxes_decode_to_the_uncompressed_pixels(syntax):
    for kw in ({}, {"bits_stored": 16}, {"bits_stored": 8}, {"photometric": "MONOCHROME1"}):
        ref = px(make_dicom(**kw))
        img, info = read_image(make_dicom(syntax=syntax, **kw))
        assert np.array_equal(np.asarray(img, dtype=np.float64), ref), (syntax, kw)
    assert info.transfer_syntax == pydicom.dcmread(io.BytesIO(make_dicom(syntax=syntax))).file_meta \
        .TransferSyntaxUID.name


def test_the_same_chest_under_every_variation_gives_nearly_the_same_picture():
    """What the input gate relies on: bit depth, polarity, a reasonable window or compression change little."""
    pic = chest_pixels(256, 256, seed=3)
    ref = px(make_dicom(pic))
    stored = to_stored(pic, 12)
    lo, hi = float(stored.min()), float(stored.max())
    variants = {f"bits{b}": make_dicom(pic, bits_stored=b) for b in (8, 10, 14, 16)}
    variants["signed16"] = make_dicom(pic, bits_stored=16, signed=True)
    variants["monochrome1"] = make_dicom(pic, photometric="MONOCHROME1")
    variants["window"] = make_dicom(pic, window=((lo + hi) / 2, 0.9 * (hi - lo)))
    variants["sigmoid"] = make_dicom(pic, window=((lo + hi) / 2, hi - lo), voi_function="SIGMOID")
    variants["rescaled"] = make_dicom(pic, rescale=(0.5, -1024.0))
    variants.update({s: make_dicom(pic, syntax=s) for s in ENCODABLE})
    for name, data in variants.items():
        assert corr(px(data), ref) > 0.98, name
        assert corr(px(data, 64), px(make_dicom(pic), 64)) > 0.98, name


# ------------------------------------------------------------------ what the header says
def test_info_has_the_technical_fields_only():
    data = make_dicom(size=(96, 128), modality="cr", body_part="chest", view="LL",
                      syntax="rle" if "rle" in ENCODABLE else "explicit")
    img, info = read_image(io.BytesIO(data))
    assert img.size == (128, 96) and img.mode == "L"
    assert (info.format, info.width, info.height, info.chroma) == ("DICOM", 128, 96, 0.0)
    assert (info.modality, info.body_part, info.view, info.photometric, info.bits_stored) == \
        ("CR", "CHEST", "lateral", "MONOCHROME2", 12)
    assert_no_phi(info, info.as_dict())
    info = read_image(make_dicom(modality=None, body_part=None, view=None))[1]
    assert (info.modality, info.body_part, info.view) == (None, None, None)


@pytest.mark.parametrize("code, view", [("PA", "frontal"), ("AP", "frontal"), ("AP AXIAL", "frontal"),
                                        ("pa ", "frontal"), ("LL", "lateral"), ("RL", "lateral"),
                                        ("LATERAL", "lateral"), ("LAT", "lateral"), ("XTABLE LATERAL", "lateral"),
                                        ("", None), (None, None), ("OBLIQUE", None)])
def test_view_from_view_position(code, view):
    assert view_from_position(code) == view
    assert read_image(make_dicom(view=code or None))[1].view == view


def test_view_codes_agree_with_the_manifest():
    """The service must route a view as training did: the manifest's view_type on the same codes."""
    from cxrlt.data.manifest import view_type

    for code in FRONTAL_POSITIONS:
        assert view_type(code) == "frontal", code
    for code in LATERAL_POSITIONS:
        assert view_type(code) == "lateral", code


# ------------------------------------------------------------------ refusals, without identifiers
def _truncated():
    data = make_dicom()
    return data[: len(data) - 5000]


def _garbled_header():
    data = bytearray(make_dicom())
    data[140:400] = b"\xff" * 260
    return bytes(data)


def _unknown_syntax():
    """A well-formed file whose (encapsulated) pixel data claims MPEG2, which no plugin decodes."""
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(io.BytesIO(make_dicom()))
    ds.PixelData = encapsulate([ds.PixelData])
    ds.file_meta.TransferSyntaxUID = pydicom.uid.MPEG2MPML
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _truncated_compressed():
    syntax = next((s for s in ("jpeg2000", "rle", "jpegls") if s in ENCODABLE), "explicit")
    data = make_dicom(syntax=syntax)
    return data[: len(data) - 3000]


REFUSED = {
    "truncated compressed": (_truncated_compressed, r"truncated or corrupt"),
    "multi-frame": (lambda: make_dicom(frames=3), r"3 frames.*one frame"),
    "colour": (lambda: make_dicom(samples=3), r"colour.*RGB"),
    "palette": (lambda: make_dicom(photometric="PALETTE COLOR"), r"PALETTE COLOR.*MONOCHROME1 or MONOCHROME2"),
    "no pixels": (lambda: make_dicom(with_pixels=False), r"no image \(no Pixel Data\)"),
    "truncated": (_truncated, r"truncated or corrupt"),
    "garbled header": (_garbled_header, r"truncated or corrupt|could not be read"),
    "bits stored": (lambda: make_dicom(extra={"BitsStored": 20}), r"BitsStored 20"),
    "bad window": (lambda: make_dicom(window=(100, 0)), r"window width"),
    "bad voi function": (lambda: make_dicom(window=(100, 50), voi_function="CUBIC"), r"VOILUTFunction"),
    "no rows": (lambda: make_dicom(extra={"Rows": None}), r"Rows"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refusals_are_clear_and_never_quote_identifiers(case, capture_everything, capfd):
    build, expect = REFUSED[case]
    data = build()
    caught, caplog = capture_everything
    with pytest.raises(ImageDecodeError, match=expect) as e:
        read_image(data)
    assert "What to do:" in str(e.value)
    assert e.value.__cause__ is None and (e.value.__context__ is None or e.value.__suppress_context__)
    out, err = capfd.readouterr()
    assert_no_phi(str(e.value), out, err, *[str(w.message) for w in caught],
                  *[r.getMessage() for r in caplog.records])


def test_unknown_transfer_syntax_is_named_with_the_supported_ones():
    with pytest.raises(ImageDecodeError, match=r"MPEG2.*not supported.*JPEG 2000") as e:
        read_image(_unknown_syntax())
    assert_no_phi(str(e.value))


def test_a_missing_decoder_plugin_names_the_package(monkeypatch):
    if "jpeg2000" not in ENCODABLE:
        pytest.skip("no JPEG 2000 encoder here")
    from pydicom.pixels.decoders import JPEG2000LosslessDecoder

    data = make_dicom(syntax="jpeg2000")
    monkeypatch.setattr(type(JPEG2000LosslessDecoder), "is_available", property(lambda self: False))
    monkeypatch.setattr(type(JPEG2000LosslessDecoder), "missing_dependencies",
                        property(lambda self: ["pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-openjpeg>=2.0"]))
    with pytest.raises(ImageDecodeError, match=r"JPEG 2000.*pip install.*pylibjpeg-openjpeg"):
        read_image(data)


def test_a_good_file_read_with_debug_logging_leaks_nothing(capture_everything, capfd):
    caught, caplog = capture_everything
    img, info = read_image(make_dicom(window=(1000, 2000)))
    assert img.size == (128, 128)
    out, err = capfd.readouterr()
    assert_no_phi(out, err, info.as_dict(), *[str(w.message) for w in caught],
                  *[r.getMessage() for r in caplog.records])
    # pydicom's records are withheld, not dropped: a reader still sees that something was logged
    assert any(r.name.startswith("pydicom") for r in caplog.records)


def test_the_prefix_without_preamble_is_not_dicom():
    data = make_dicom(phi=False)
    with pytest.raises(ImageDecodeError, match="Part 10"):
        read_image(data[128:])                                  # raw dataset without preamble: say what to send
