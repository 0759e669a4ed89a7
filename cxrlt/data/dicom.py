"""DICOM Part 10 -> 8-bit grayscale as a viewer shows it, and the technical facts of its header.

The display pipeline of PS3.4 N.2.1: the stored values go through the Modality LUT (RescaleSlope /
RescaleIntercept or a Modality LUT Sequence), then the VOI LUT (a VOI LUT Sequence, else the FIRST
WindowCenter / WindowWidth with its VOILUTFunction LINEAR, LINEAR_EXACT or SIGMOID, else the full range of
the values, smallest to largest, as 16-bit PNGs are read), then MONOCHROME1 is inverted so that bone is
bright, and the result is mapped to 0..255.

Only single-frame grey images are read (MONOCHROME1/2, one sample per pixel, BitsStored 1..16). Pixel data
decoders: pydicom (uncompressed, deflated, RLE), pylibjpeg-openjpeg (JPEG 2000, HTJ2K), pylibjpeg-rle (RLE),
python-gdcm (JPEG lossless, extended, JPEG-LS, also JPEG 2000 / baseline), Pillow (JPEG baseline, JPEG 2000).

Privacy: nothing identifying leaves this module. `ImageInfo` has technical fields only, and only values that
look like DICOM codes are kept in them; every message is written here (pydicom's own exceptions are replaced,
never chained); pydicom's warnings are silenced during the read and the records of pydicom's loggers are
withheld (their text can quote element values), as are python-gdcm's console messages.
"""

from __future__ import annotations

import io
import logging
import re
import threading
import warnings
from functools import lru_cache

import numpy as np

from cxrlt.data.image_info import ImageDecodeError, ImageInfo, too_many_pixels
from cxrlt.views import FRONTAL_POSITIONS, LATERAL_POSITIONS

_CODE = re.compile(r"[A-Z0-9_ ]{1,16}")
_UID = re.compile(r"[0-9.]{1,64}")
_FIX = "send the original file, or export it again from the PACS or viewer as a DICOM Part 10 file"
_GREY = "send a grey radiograph (PhotometricInterpretation MONOCHROME1 or MONOCHROME2, one sample per pixel)"
# Which package decodes which compressed syntax (those in this project's dependencies).
_PACKAGES = {"JPEG 2000": "pylibjpeg pylibjpeg-openjpeg", "HTJ2K": "pylibjpeg pylibjpeg-openjpeg",
             "High-Throughput JPEG 2000": "pylibjpeg pylibjpeg-openjpeg", "RLE": "pylibjpeg pylibjpeg-rle",
             "JPEG-LS": "python-gdcm", "JPEG Lossless": "python-gdcm", "JPEG Extended": "python-gdcm",
             "JPEG Baseline": "pillow (or python-gdcm)", "Deflated": "(part of Python: zlib)"}


def view_from_position(view_position) -> str | None:
    """'frontal' / 'lateral' for a known DICOM ViewPosition code, else None (unknown)."""
    code = _code(view_position)
    if code in FRONTAL_POSITIONS:
        return "frontal"
    if code in LATERAL_POSITIONS:
        return "lateral"
    return None


def read_dicom(src: bytes | str, max_pixels: int | None = None) -> tuple[np.ndarray, ImageInfo]:
    """A Part 10 file (bytes or path) as uint8 [rows, columns] for display, and its ImageInfo."""
    from PIL import Image

    _quiet_pydicom()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = _dataset(src)
        info, syntax = _check_header(ds, src)
        limit = max_pixels if max_pixels is not None else Image.MAX_IMAGE_PIXELS
        if limit and info.width * info.height > limit:
            raise too_many_pixels(info.width, info.height, limit)
        _check_decoder(syntax)
        try:
            stored = ds.pixel_array
        except Exception:                                      # noqa: BLE001 (pydicom's text may quote values)
            raise ImageDecodeError(f"the DICOM pixel data ({info.transfer_syntax}) could not be decoded: the "
                                   "file is truncated or corrupt", _FIX) from None
        if stored.shape != (info.height, info.width):
            raise ImageDecodeError(f"the DICOM pixel data has the shape {stored.shape}, not the "
                                   f"{info.height} x {info.width} of its header: the file is corrupt", _FIX)
        shown = _display(stored, ds)
    if info.photometric == "MONOCHROME1":
        shown = 1.0 - shown
    return np.rint(np.clip(shown, 0.0, 1.0) * 255.0).astype(np.uint8), info


# ------------------------------------------------------------------ reading and checking
def _dataset(src):
    from pydicom import dcmread

    try:
        return dcmread(io.BytesIO(src) if isinstance(src, bytes) else src, force=False)
    except Exception:                                          # noqa: BLE001 (never show pydicom's text)
        raise ImageDecodeError("the DICOM header could not be read: the file is truncated or corrupt",
                               _FIX) from None


def _code(value) -> str | None:
    """A DICOM code string (upper-case letters, digits, space, underscore, up to 16) or None: nothing else,
    so free text (a name, a description) can never reach ImageInfo or a message."""
    if value is None:
        return None
    if not isinstance(value, str):
        value = str(value[0]) if hasattr(value, "__len__") and len(value) else str(value)
    v = value.strip().upper()
    return v if _CODE.fullmatch(v) else None


def _int(ds, keyword: str, default=None, required: bool = True) -> int | None:
    try:
        value = ds.get(keyword, None)
        if value is None or value == "":
            if required and default is None:
                raise ImageDecodeError(f"the DICOM has no {keyword} in its header: the file is corrupt", _FIX)
            return default
        return int(value)
    except ImageDecodeError:
        raise
    except Exception:                                          # noqa: BLE001
        raise ImageDecodeError(f"the DICOM {keyword} is not a number: the file is corrupt", _FIX) from None


def _mentions_pixel_data(src) -> bool:
    """Whether the raw file holds the Pixel Data tag (7FE0,0010), little or big endian."""
    try:
        if isinstance(src, bytes):
            data = src
        else:
            with open(src, "rb") as f:
                data = f.read()
    except OSError:
        return False
    return b"\xe0\x7f\x10\x00" in data or b"\x7f\xe0\x00\x10" in data


def _check_header(ds, src) -> tuple[ImageInfo, str]:
    try:
        syntax = str(ds.file_meta.TransferSyntaxUID)
        has_pixels = "PixelData" in ds
        has_float = "FloatPixelData" in ds or "DoubleFloatPixelData" in ds
        photometric_raw = ds.get("PhotometricInterpretation", None)
        modality, body, view = ds.get("Modality"), ds.get("BodyPartExamined"), ds.get("ViewPosition")
    except Exception:                                          # noqa: BLE001
        raise ImageDecodeError("the DICOM header could not be read: the file is truncated or corrupt",
                               _FIX) from None
    if not has_pixels:
        if has_float:
            raise ImageDecodeError("the DICOM has float pixel data, not an image of integers", _GREY)
        if _mentions_pixel_data(src):   # the tag is there but pydicom dropped an element cut off by the end
            raise ImageDecodeError("the DICOM Pixel Data could not be read: the file is truncated or corrupt",
                                   _FIX)
        raise ImageDecodeError("the DICOM has no image (no Pixel Data)", "send the DICOM file of the radiograph "
                               "itself (not a report, a structured report or a presentation state)")
    frames = _int(ds, "NumberOfFrames", 1)
    if frames != 1:
        raise ImageDecodeError(f"the DICOM has {frames} frames: only single-frame images (one frame) are read",
                               "send each radiograph as its own single-frame file")
    samples = _int(ds, "SamplesPerPixel", 1)
    photometric = _code(photometric_raw)
    if samples != 1:
        raise ImageDecodeError(f"the DICOM is a colour image (SamplesPerPixel {samples}, "
                               f"{photometric or 'an unrecognised photometric interpretation'})", _GREY)
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        shown = photometric or ("missing" if photometric_raw is None else "an unrecognised value")
        raise ImageDecodeError(f"the DICOM photometric interpretation is {shown}: only grey radiographs "
                               "(MONOCHROME1 or MONOCHROME2) are read", _GREY)
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    if rows < 1 or cols < 1:
        raise ImageDecodeError(f"the DICOM image is {rows} x {cols} pixels: the header is corrupt", _FIX)
    allocated, bits = _int(ds, "BitsAllocated"), _int(ds, "BitsStored")
    if allocated not in (8, 16) or not 1 <= bits <= allocated:
        raise ImageDecodeError(f"the DICOM has BitsAllocated {allocated} and BitsStored {bits}: only 1 to 16 "
                               "stored bits in 8 or 16 allocated are read", "export the image with 16 bits "
                               "or fewer per pixel (as radiographs usually are)")
    _int(ds, "PixelRepresentation")
    info = ImageInfo("DICOM", cols, rows, 0.0, modality=_code(modality), body_part=_code(body),
                     view=view_from_position(view), photometric=photometric, bits_stored=bits,
                     transfer_syntax=_syntax_name(syntax))
    return info, syntax


def _syntax_name(uid: str) -> str:
    from pydicom.uid import UID

    name = UID(uid).name
    return name if name != uid else (uid if _UID.fullmatch(uid) else "an unrecognised transfer syntax")


@lru_cache(maxsize=1)
def supported_syntaxes() -> tuple[str, ...]:
    """Names of the transfer syntaxes whose pixel data can be decoded here."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import AllTransferSyntaxes

    out = []
    for uid in AllTransferSyntaxes:
        try:
            if get_decoder(uid).is_available:
                out.append(uid.name)
        except NotImplementedError:
            continue
    return tuple(out)


def _check_decoder(syntax: str) -> None:
    from pydicom.pixels import get_decoder

    name = _syntax_name(syntax)
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise ImageDecodeError(f"the DICOM transfer syntax {name} is not supported (supported: "
                               f"{', '.join(supported_syntaxes())})", "export the image with one of the "
                               "supported transfer syntaxes (Explicit VR Little Endian is always read)") from None
    if not decoder.is_available:
        package = next((p for k, p in _PACKAGES.items() if name.startswith(k)), None)
        todo = (f"pip install {package}" if package else "install a pydicom pixel-data plugin for it") + \
            f" (pydicom says: {'; '.join(decoder.missing_dependencies)})"
        raise ImageDecodeError(f"the DICOM transfer syntax {name} needs a decoder that is not installed", todo)


# ------------------------------------------------------------------ display pipeline
def _display(stored: np.ndarray, ds) -> np.ndarray:
    """The stored values as a viewer shows them, 0..1 (MONOCHROME1 not yet inverted)."""
    from pydicom.pixels import apply_modality_lut, apply_voi

    try:
        values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    except Exception:                                          # noqa: BLE001
        raise ImageDecodeError("the DICOM Modality LUT or RescaleSlope / RescaleIntercept is invalid", _FIX) \
            from None
    if not np.isfinite(values).all():
        raise ImageDecodeError("the DICOM rescale gives values that are not finite numbers", _FIX)
    if ds.get("VOILUTSequence"):
        try:
            item = ds.VOILUTSequence[0]
            n, first = int(item.LUTDescriptor[0]) or 65536, int(item.LUTDescriptor[1])
            table = np.asarray(apply_voi(np.arange(first, first + n), ds), dtype=np.float64)
            out = np.asarray(apply_voi(np.rint(values).astype(np.int64), ds), dtype=np.float64)
        except Exception:                                      # noqa: BLE001
            raise ImageDecodeError("the DICOM VOI LUT Sequence is invalid", _FIX) from None
        lo, hi = float(table.min()), float(table.max())  # the LUT's own range (its nominal depth is often wrong)
        return (out - lo) / (hi - lo) if hi > lo else np.zeros_like(out)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        return _window(values, ds)
    lo, hi = float(values.min()), float(values.max())
    return (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)


def _first_number(ds, keyword: str) -> float:
    try:
        value = ds[keyword].value
        value = value[0] if ds[keyword].VM > 1 else value
        number = float(value)
    except Exception:                                          # noqa: BLE001
        raise ImageDecodeError(f"the DICOM {keyword} is not a number", _FIX) from None
    if not np.isfinite(number):
        raise ImageDecodeError(f"the DICOM {keyword} is not a finite number", _FIX)
    return number


def _window(x: np.ndarray, ds) -> np.ndarray:
    """PS3.3 C.11.2.1.2 / C.11.2.1.3: the first window, output 0..1."""
    c, w = _first_number(ds, "WindowCenter"), _first_number(ds, "WindowWidth")
    raw = ds.get("VOILUTFunction", None)
    function = _code(raw) or ("LINEAR" if raw in (None, "") else "an unrecognised value")
    if function == "SIGMOID":
        _need_width(w > 0, w, "greater than 0", function)
        return 1.0 / (1.0 + np.exp(np.clip(-4.0 * (x - c) / w, -700, 700)))
    if function == "LINEAR_EXACT":
        _need_width(w > 0, w, "greater than 0", function)
        return np.clip((x - c) / w + 0.5, 0.0, 1.0)
    if function != "LINEAR":
        raise ImageDecodeError(f"the DICOM VOILUTFunction is {function}: only LINEAR, LINEAR_EXACT or SIGMOID "
                               "are defined", _FIX)
    _need_width(w >= 1, w, "at least 1", function)
    if w == 1:
        return (x > c - 0.5).astype(np.float64)
    return np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0.0, 1.0)


def _need_width(ok: bool, w: float, rule: str, function: str) -> None:
    if not ok:
        raise ImageDecodeError(f"the DICOM window width {w:g} is invalid: it must be {rule} for {function}",
                               "fix WindowWidth in the header, or remove the window so the full range is shown")


# ------------------------------------------------------------------ keeping pydicom quiet
class _Withhold(logging.Filter):
    """Replace the text of pydicom's log records: they can quote element values (names, ids, dates)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = "pydicom %s message withheld (it may quote DICOM element values)", \
            (record.levelname.lower(),)
        record.exc_info = record.exc_text = record.stack_info = None
        return True


_FILTER = _Withhold()
_LOCK = threading.Lock()


def _quiet_pydicom() -> None:
    """Attach the withholding filter to every pydicom logger (once each) and silence python-gdcm."""
    import pydicom.pixels  # noqa: F401 (creates the pixels loggers)

    with _LOCK:
        names = [n for n in list(logging.root.manager.loggerDict) if n == "pydicom" or n.startswith("pydicom.")]
        for name in names:
            logger = logging.getLogger(name)
            if _FILTER not in logger.filters:
                logger.addFilter(_FILTER)
        _quiet_gdcm()


@lru_cache(maxsize=1)
def _quiet_gdcm() -> None:
    try:
        import gdcm
    except ImportError:
        return
    gdcm.Trace.DebugOff()
    gdcm.Trace.WarningOff()
    gdcm.Trace.ErrorOff()
