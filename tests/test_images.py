"""cxrlt.data.images: the one reader for PNG / JPEG / DICOM, as every caller used it before DICOM came in."""

import io
import os
import stat

import numpy as np
import pytest
from PIL import Image

from cxrlt.data import images, transforms
from cxrlt.data.image_info import ImageDecodeError, ImageInfo
from cxrlt.data.images import is_dicom, load_grayscale, read_image
from dicom_factory import make_dicom


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def grey(w=64, h=48, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    a = 100 + 60 * np.sin(x / 5) * np.cos(y / 7) + rng.normal(0, 10, (h, w))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), mode="L")


def colourful(w=64, h=48) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 // w, y * 255 // h, 255 - x * 255 // w], -1).astype(np.uint8)
    return Image.fromarray(rgb, mode="RGB")


def old_prepare_pixels(data: bytes, size: int) -> np.ndarray:
    """What prepare._resize_chunk did before this module existed (PIL draft, then bilinear)."""
    with Image.open(io.BytesIO(data)) as im:
        im.draft("L", (size, size))
        return np.asarray(im.convert("L").resize((size, size), Image.Resampling.BILINEAR))


def test_transforms_decodes_with_the_one_reader():
    """transforms.py has no image reader of its own: it decodes through images.py."""
    assert transforms.load_grayscale is images.load_grayscale
    assert transforms.to_grayscale is images.to_grayscale
    assert issubclass(ImageDecodeError, ValueError)


def test_image_info_holds_only_technical_fields():
    import dataclasses
    names = {f.name for f in dataclasses.fields(ImageInfo)}
    assert names == {"format", "width", "height", "chroma", "modality", "body_part", "view", "photometric",
                     "bits_stored", "transfer_syntax"}
    info = ImageInfo("PNG", 3, 2, 0.0)
    assert info.as_dict() == {"format": "PNG", "width": 3, "height": 2, "chroma": 0.0, "modality": None,
                              "body_part": None, "view": None, "photometric": None, "bits_stored": None,
                              "transfer_syntax": None}
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.width = 4


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_grey_png_and_jpeg_decode_as_before(fmt, tmp_path):
    data = encode(grey(), fmt)
    ref = np.asarray(Image.open(io.BytesIO(data)).convert("L"))
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(data)
    for src in (data, path, str(path), io.BytesIO(data)):
        img, info = read_image(src)
        assert img.mode == "L" and np.array_equal(np.asarray(img), ref)
        assert (info.format, info.width, info.height, info.chroma) == (fmt, 64, 48, 0.0)
        assert info.modality is None and info.view is None and info.bits_stored == 8
    assert np.array_equal(np.asarray(load_grayscale(data)), ref)


def test_colour_palette_and_cmyk_become_grey_and_report_their_colour():
    c = colourful()
    for img, fmt in ((c, "PNG"), (c, "JPEG"), (c.convert("P"), "PNG"), (c.convert("CMYK"), "JPEG"),
                     (c.convert("RGBA"), "PNG")):
        data = encode(img, fmt)
        out, info = read_image(data)
        assert out.mode == "L" and out.size == (64, 48)
        assert np.array_equal(np.asarray(out), np.asarray(Image.open(io.BytesIO(data)).convert("L")))
        assert 0.3 < info.chroma <= 1.0, (img.mode, fmt, info.chroma)
    # grey stored as RGB is not colourful
    assert read_image(encode(grey().convert("RGB"), "PNG"))[1].chroma < 0.01
    assert read_image(encode(grey().convert("RGB"), "JPEG"))[1].chroma < 0.03


def test_16_bit_png_uses_the_whole_range():
    a = (np.arange(64 * 48).reshape(48, 64) * 3 + 1000).astype(np.uint16)
    img, info = read_image(encode(Image.fromarray(a), "PNG"))
    out = np.asarray(img)
    assert out.min() == 0 and out.max() == 255 and info.bits_stored == 16
    assert np.all(np.diff(out.astype(int), axis=1) >= 0)           # order kept


def test_exif_orientation_is_not_applied_as_before():
    im = grey(64, 48)
    exif = Image.Exif()
    exif[0x0112] = 6                                                # "rotate 90 CW" tag
    data = encode(im, "JPEG", exif=exif.tobytes())
    out, info = read_image(data)
    assert out.size == (64, 48) and (info.width, info.height) == (64, 48)
    assert np.array_equal(np.asarray(out), np.asarray(Image.open(io.BytesIO(data)).convert("L")))


@pytest.mark.parametrize("size", [16, 32, 20])
@pytest.mark.parametrize("make", [grey, colourful])
def test_resize_is_exactly_what_prepare_did(size, make):
    for fmt in ("JPEG", "PNG"):
        data = encode(make(320, 256), fmt)
        img, info = read_image(data, size)
        assert img.size == (size, size) and (info.width, info.height) == (320, 256)
        assert np.array_equal(np.asarray(img), old_prepare_pixels(data, size)), fmt
    assert read_image(encode(colourful(320, 256), "JPEG"), 16)[1].chroma > 0.3   # colour seen despite draft


@pytest.mark.parametrize("img", [colourful(320, 256), colourful(320, 256).convert("CMYK"), grey(320, 256)])
def test_resize_of_rgb_coded_and_cmyk_jpegs_is_what_prepare_did(img):
    kw = {"keep_rgb": True} if img.mode == "RGB" else {}            # an RGB-coded JPEG (Adobe transform 0)
    data = encode(img, "JPEG", **kw)
    out, info = read_image(data, 24)
    assert np.array_equal(np.asarray(out), old_prepare_pixels(data, 24))
    assert (info.chroma > 0.3) == (img.mode != "L")


def test_the_source_is_never_modified(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(encode(grey(), "PNG"))
    os.chmod(path, 0o444)
    before = (path.read_bytes(), path.stat().st_mtime_ns, stat.S_IMODE(path.stat().st_mode))
    read_image(path, 16)
    load_grayscale(path)
    assert before == (path.read_bytes(), path.stat().st_mtime_ns, stat.S_IMODE(path.stat().st_mode))
    os.chmod(path, 0o644)


@pytest.mark.parametrize("data, expect", [
    (b"", "empty"),
    (b"not an image at all", "not a PNG, JPEG or DICOM"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "PNG header.*truncated or corrupt"),
])
def test_unreadable_bytes_are_refused_clearly(data, expect):
    with pytest.raises(ImageDecodeError, match=expect) as e:
        read_image(data)
    assert "What to do:" in str(e.value)


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_other_formats_are_refused_by_name(fmt):
    with pytest.raises(ImageDecodeError, match=f"{fmt}.*PNG, JPEG or DICOM"):
        read_image(encode(grey(), fmt))


def test_truncated_jpeg_is_refused():
    data = encode(grey(320, 256), "JPEG")
    with pytest.raises(ImageDecodeError, match="truncated or corrupt"):
        read_image(data[: len(data) // 2])


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(ImageDecodeError, match="no such file"):
        read_image(tmp_path / "nope.png")


def test_max_pixels_is_checked_from_the_header():
    data = encode(grey(64, 48), "PNG")
    with pytest.raises(ImageDecodeError, match=r"64 x 48 = 3072 pixels.*limit of 1000"):
        read_image(data, max_pixels=1000)
    assert read_image(data, max_pixels=3072)[0].size == (64, 48)
    # header-first: a file whose pixel data is garbage is refused for its size, not for the garbage
    dcm = bytearray(make_dicom(size=(64, 48), phi=False))
    dcm[-100:] = b"\xff" * 100
    with pytest.raises(ImageDecodeError, match="48 x 64|64 x 48"):
        read_image(bytes(dcm), max_pixels=1000)


def test_decompression_bombs_are_refused(monkeypatch):
    data = encode(grey(64, 48), "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for limit_side in (data,):                                       # 3072 > 2 x 1000: PIL's error; else warning
        with pytest.raises(ImageDecodeError, match="too large"):
            read_image(limit_side)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)             # 3072 between 1x and 2x: PIL only warns
    with pytest.raises(ImageDecodeError, match="too large"):
        read_image(data)


def test_bad_arguments_are_refused():
    data = encode(grey(), "PNG")
    for size in (0, -3, 2.5, "32"):
        with pytest.raises(ValueError, match="size"):
            read_image(data, size)
    with pytest.raises(ValueError, match="max_pixels"):
        read_image(data, max_pixels=0)
    with pytest.raises(TypeError, match="path, bytes or a binary file"):
        read_image(12345)


def test_is_dicom():
    assert is_dicom(make_dicom(phi=False))
    assert not is_dicom(encode(grey(), "PNG"))
    assert not is_dicom(b"DICM")
    assert not is_dicom(b"")
