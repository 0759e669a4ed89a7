"""The one image reader: PNG, JPEG and DICOM Part 10 -> 8-bit grayscale, for training, the cache and the service.

`read_image(src, size=None, max_pixels=None)` returns a mode "L" PIL image and an `ImageInfo` of technical
facts about the source (format, size, colourfulness, and for DICOM the modality, body part, view, photometric
interpretation, bits stored and transfer syntax). It never carries an identifier.

PNG / JPEG keep the rules every caller used before: colour, CMYK and palette images go through PIL's
`convert("L")`, 16-bit grey is stretched from its smallest to its largest value, the EXIF orientation is NOT
applied (the pixels are read as stored). With `size`, the image is resized to size x size exactly as the
training cache always did (JPEG: the decoder first downscales by 1/2..1/8 with `draft`, then bilinear), so
`prepare` and the service produce the same pixels for the same file. DICOM goes through `cxrlt.data.dicom`.

Sources are opened read-only and never modified. Every unreadable input raises `ImageDecodeError` saying
what is wrong and what to do.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from cxrlt.data.dicom import read_dicom
from cxrlt.data.image_info import SEND as _SEND
from cxrlt.data.image_info import ImageDecodeError, ImageInfo, too_many_pixels

FORMATS = ("PNG", "JPEG", "DICOM")
_PIL_FORMATS = ("PNG", "JPEG")          # PIL opens nothing else for us (fewer decoders reachable from uploads)
Source = str | Path | bytes | bytearray | memoryview | BinaryIO


def is_dicom(head: bytes) -> bool:
    """True for the start of a DICOM Part 10 file: 'DICM' after the 128-byte preamble."""
    return len(head) >= 132 and bytes(head[128:132]) == b"DICM"


def read_image(src: Source, size: int | None = None,
               max_pixels: int | None = None) -> tuple[Image.Image, ImageInfo]:
    """Decode `src` (a path, bytes or a binary file object) as 8-bit grayscale and describe it.

    size: resize the result to size x size (bilinear; JPEG downscaled in the decoder first), as the cache does.
    max_pixels: refuse images of more pixels, from the header, before any pixel is decoded. PIL's
    decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`) always applies too.
    """
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"size must be a positive integer number of pixels, got {size!r}")
    if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int)
                                   or max_pixels < 1):
        raise ValueError(f"max_pixels must be a positive integer, got {max_pixels!r}")
    data, path = _source(src)
    head = data[:132] if data is not None else _head(path)
    if is_dicom(head):
        pixels, info = read_dicom(data if data is not None else path, max_pixels)
        img = Image.fromarray(pixels, mode="L")
        if size is not None and img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BILINEAR)
        return img, info
    opener = (lambda: io.BytesIO(data)) if data is not None else (lambda: path)
    return _read_pil(opener, head, size, max_pixels)


def load_grayscale(src: Source) -> Image.Image:
    """Open an image (path, bytes or file object) as 8-bit grayscale without touching the source."""
    return read_image(src)[0]


def to_grayscale(img: Image.Image) -> Image.Image:
    """A PIL image as mode "L": 16-bit / 32-bit grey stretched from its minimum to its maximum, else convert."""
    if img.mode == "L":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit radiographs: rescale the used range to 8 bits instead of clipping at 255
        a = np.asarray(img, dtype=np.float32)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
        return Image.fromarray(a.astype(np.uint8), mode="L")
    return img.convert("L")


# ------------------------------------------------------------------ sources
def _source(src: Source) -> tuple[bytes | None, str | None]:
    """(bytes, None) for in-memory data and file objects, (None, path) for a path."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
    elif isinstance(src, (str, Path, os.PathLike)):
        path = os.fspath(src)
        if not os.path.isfile(path):
            raise ImageDecodeError(f"no such file: '{path}'", "check the path")
        return None, path
    elif hasattr(src, "read"):
        data = src.read()
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError("read_image needs a path, bytes or a binary file object; this file object gives "
                            f"{type(data).__name__} (open the file with 'rb')")
        data = bytes(data)
    else:
        raise TypeError(f"read_image needs a path, bytes or a binary file object, got {type(src).__name__}")
    if not data:
        raise ImageDecodeError("the image is empty (0 bytes)")
    return data, None


def _head(path: str) -> bytes:
    try:
        with open(path, "rb") as f:          # read-only
            head = f.read(132)
    except OSError as e:
        raise ImageDecodeError(f"'{path}' could not be opened ({e.strerror or type(e).__name__})",
                               "check the file and its permissions") from None
    if not head:
        raise ImageDecodeError("the image is empty (0 bytes)")
    return head


# ------------------------------------------------------------------ PNG / JPEG
def _open_pil(fp, head: bytes, max_pixels: int | None) -> Image.Image:
    try:
        im = Image.open(fp)                  # the header only; refused formats never reach a decoder
    except Image.DecompressionBombError:
        raise _bomb() from None
    except UnidentifiedImageError:
        raise _unidentified(head) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError(f"the image header could not be read: the file is truncated or corrupt "
                               f"({type(e).__name__})", "send the original, complete file") from None
    if im.format not in _PIL_FORMATS and im.format != "MPO":   # MPO: a camera JPEG with extra frames
        fmt = im.format
        im.close()
        raise ImageDecodeError(f"{fmt} images are not supported: only PNG, JPEG or DICOM",
                               f"convert the image to PNG, or {_SEND}", kind="unsupported")
    w, h = im.size
    for limit in (max_pixels, Image.MAX_IMAGE_PIXELS):       # PIL only warns between 1x and 2x its limit
        if limit is not None and w * h > limit:
            im.close()
            raise too_many_pixels(w, h, limit)
    return im


def _bomb() -> ImageDecodeError:
    return ImageDecodeError(f"the image is too large: over twice the limit of {Image.MAX_IMAGE_PIXELS} pixels "
                            "(a decompression bomb)", "send a smaller image", kind="too_large")


def _unidentified(head: bytes) -> ImageDecodeError:
    for fmt, magic in (("PNG", b"\x89PNG\r\n\x1a\n"), ("JPEG", b"\xff\xd8\xff")):
        if head.startswith(magic):
            return ImageDecodeError(f"the {fmt} header could not be read: the file is truncated or corrupt",
                                    "send the original, complete file")
    if head[:4] == b"DICM" or head[128:132] == b"DICM" or head[:2] in (b"\x02\x00", b"\x08\x00"):
        return ImageDecodeError("this looks like a DICOM data set without the Part 10 header (no 128-byte "
                                "preamble followed by 'DICM')", "export the image as a DICOM Part 10 file "
                                "(the usual .dcm file from a PACS or viewer), or as PNG / JPEG")
    return ImageDecodeError("not a PNG, JPEG or DICOM Part 10 image (the first bytes match none of them)",
                            kind="unsupported")


def _read_pil(opener, head: bytes, size: int | None, max_pixels: int | None) -> tuple[Image.Image, ImageInfo]:
    """`opener()` gives a fresh binary stream of the source (a JPEG may need a second decode, see below)."""
    im = _open_pil(opener(), head, max_pixels)
    fmt = "JPEG" if im.format in ("JPEG", "MPO") else im.format
    width, height = im.size
    try:
        with im:
            if size is not None and fmt == "JPEG":
                return _jpeg_downscaled(im, opener, head, size, max_pixels)
            im.load()
            grey, chroma, bits = to_grayscale(im), _chroma(im), _BITS.get(im.mode, 8)
    except (OSError, SyntaxError, ValueError) as e:
        raise _corrupt(fmt, e) from None
    if size is not None and grey.size != (size, size):
        grey = grey.resize((size, size), Image.Resampling.BILINEAR)
    return grey, ImageInfo(fmt, width, height, chroma, bits_stored=bits)


def _jpeg_downscaled(im, opener, head, size, max_pixels) -> tuple[Image.Image, ImageInfo]:
    """A JPEG decoded at 1/2..1/8 scale by `draft`, grey exactly as the cache always made it (draft "L").

    A YCbCr-coded colour JPEG is decoded once as "YCbCr": its Y is the very grey draft("L") gives, and Cb/Cr
    give `chroma`. An RGB-coded one (Adobe transform 0) cannot be decoded as YCbCr: grey and colour are
    then two decodes."""
    width, height = im.size
    info = dict(format="JPEG", width=width, height=height, bits_stored=8)
    if im.mode == "RGB" and im.info.get("adobe_transform") != 0:
        im.draft("YCbCr", (size, size))
        try:
            im.load()
        except OSError:                      # RGB-coded without an Adobe marker: the two-decode path
            pass
        else:
            grey, chroma = im.getchannel("Y"), _chroma(im.convert("RGB"))
            return _square(grey, size), ImageInfo(chroma=chroma, **info)
    if im.mode != "RGB":                     # grey or CMYK: draft("L") only downscales them
        im.draft("L", (size, size))
        im.load()
        return _square(im.convert("L"), size), ImageInfo(chroma=_chroma(im), **info)
    with _open_pil(opener(), head, max_pixels) as colour:
        colour.draft(None, (size, size))
        colour.load()
        chroma = _chroma(colour)
    with _open_pil(opener(), head, max_pixels) as g:
        g.draft("L", (size, size))
        return _square(g.convert("L"), size), ImageInfo(chroma=chroma, **info)


def _square(grey: Image.Image, size: int) -> Image.Image:
    return grey if grey.size == (size, size) else grey.resize((size, size), Image.Resampling.BILINEAR)


def _corrupt(fmt: str, e: Exception) -> ImageDecodeError:
    return ImageDecodeError(f"the {fmt} image could not be decoded: the file is truncated or corrupt "
                            f"({type(e).__name__})", "send the original, complete file")


_BITS = {"I;16": 16, "I;16B": 16, "I;16L": 16, "I": 32, "F": 32}
_GREY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F")


def _chroma(im: Image.Image) -> float:
    """Mean of (max - min) of R, G, B over the pixels, 0..1 (HSV chroma); 0 for grey modes."""
    if im.mode in _GREY_MODES:
        return 0.0
    rgb = im.convert("RGB")
    if max(rgb.size) > 256:                  # a statistic: a small copy is enough
        rgb = rgb.resize((max(1, rgb.width * 256 // max(rgb.size)), max(1, rgb.height * 256 // max(rgb.size))),
                         Image.Resampling.BILINEAR)
    a = np.asarray(rgb, dtype=np.int16)
    return round(float((a.max(-1) - a.min(-1)).mean()) / 255.0, 4)
