"""DICOM Part 10 test files built in memory, with distinctive identifying values to grep for.

`make_dicom(...)` returns the bytes of one file; every identifying attribute is set to a value from `PHI`
(unless `phi=False`), so a test can check that none of `PHI_VALUES` leaks into a message, a warning, a log
record or a response. `chest_pixels()` draws a chest-like picture (0..1, bone bright) with the demo data's
drawing code; give it to `make_dicom` as floats and it is scaled to the stored range of the bit depth
(inverted for MONOCHROME1, so every variant SHOWS the same chest).

Compressed syntaxes: "jpeg2000" and "rle" use pydicom's `Dataset.compress` (pylibjpeg-openjpeg / pydicom's own
RLE encoder); "jpegls" and "jpeg-lossless" are transcoded with python-gdcm. `ENCODABLE` lists what works here.
"""

from __future__ import annotations

import io
import os
import tempfile
from typing import Sequence

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (JPEG2000Lossless, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLosslessSV1,
                         JPEGLSLossless, RLELossless, SecondaryCaptureImageStorage, UID)

# A distinctive root so a leaked UID is found by grepping for it.
PHI_UID_ROOT = "1.2.826.0.1.3680043.99.7781234"
PHI: dict[str, str] = {
    "PatientName": "ZZDOE^JANE",
    "PatientID": "PID-7781234",
    "OtherPatientIDs": "OPID-5550199",
    "PatientBirthDate": "19450607",
    "PatientAddress": "42 Zzyzx Road, Nowhereville",
    "PatientComments": "ZZ patient comment: allergic to zylophine",
    "AccessionNumber": "ACC-99172",
    "StudyID": "STUDY-31337",
    "StudyDate": "19710203",
    "SeriesDate": "19710203",
    "AcquisitionDate": "19710203",
    "ContentDate": "19710203",
    "StudyTime": "101112.131415",
    "InstitutionName": "ZZ-St-Elsewhere-Hospital",
    "InstitutionAddress": "1 Elsewhere Plaza, Zzyzx City",
    "ReferringPhysicianName": "ZZREFER^ROBERTA",
    "OperatorsName": "ZZOPERATOR^OSCAR",
    "PerformingPhysicianName": "ZZPERFORM^PETRA",
    "StudyDescription": "ZZ-CHEST-STUDY-DESC-4471",
    "SeriesDescription": "ZZ-SERIES-DESC-8812",
    "ImageComments": "ZZ image comment 6620",
    "DeviceSerialNumber": "SN-ZZ-443322",
    "StationName": "ZZSTATION-77",
    "StudyInstanceUID": PHI_UID_ROOT + ".1.1",
    "SeriesInstanceUID": PHI_UID_ROOT + ".2.1",
    "SOPInstanceUID": PHI_UID_ROOT + ".3.1",
}
# Every identifying string, for grepping outputs (the UID root catches all three UIDs and any partial quote).
PHI_VALUES: list[str] = sorted({*PHI.values(), PHI_UID_ROOT, "ZZDOE", "7781234", "99172", "Elsewhere"})

SYNTAXES = {"explicit": ExplicitVRLittleEndian, "implicit": ImplicitVRLittleEndian, "jpeg2000": JPEG2000Lossless,
            "rle": RLELossless, "jpegls": JPEGLSLossless, "jpeg-lossless": JPEGLosslessSV1}
_GDCM_SYNTAX = {"jpegls": "JPEGLSLossless", "jpeg-lossless": "JPEGLosslessProcess14_1"}


def _gdcm_can_encode() -> bool:
    try:
        import gdcm  # noqa: F401
    except ImportError:
        return False
    return True


def _encodable() -> tuple[str, ...]:
    out = ["explicit", "implicit"]
    from pydicom.pixels.encoders import JPEG2000LosslessEncoder, RLELosslessEncoder
    if JPEG2000LosslessEncoder.is_available:
        out.append("jpeg2000")
    if RLELosslessEncoder.is_available:
        out.append("rle")
    if _gdcm_can_encode():
        out += ["jpegls", "jpeg-lossless"]
    return tuple(out)


ENCODABLE: tuple[str, ...] = _encodable()


def chest_pixels(h: int = 256, w: int = 256, seed: int = 0) -> np.ndarray:
    """A chest-like frontal radiograph as float32 [h, w] in 0..1, dense structures (bone) bright."""
    from cxrlt.data.demo.draw import render_image

    return render_image("frontal", [], seed, size=(h, w)).astype(np.float32) / 255.0


def stored_range(bits_stored: int, signed: bool) -> tuple[int, int]:
    """The smallest and largest stored value of that bit depth."""
    return (-(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1) if signed else (0, (1 << bits_stored) - 1)


def to_stored(picture: np.ndarray, bits_stored: int = 12, signed: bool = False,
              photometric: str = "MONOCHROME2") -> np.ndarray:
    """A 0..1 picture (bright = dense) as stored integers over the full range of the bit depth; MONOCHROME1
    stores it inverted (high = dark), so the picture a viewer shows is the same."""
    p = np.clip(np.asarray(picture, dtype=np.float64), 0.0, 1.0)
    if photometric == "MONOCHROME1":
        p = 1.0 - p
    lo, hi = stored_range(bits_stored, signed)
    dtype = np.int16 if signed else (np.uint8 if bits_stored <= 8 else np.uint16)
    return np.round(lo + p * (hi - lo)).astype(dtype)


def _pixels(pixels, h, w, frames, samples, bits_stored, signed, photometric) -> np.ndarray:
    if pixels is None:
        pixels = chest_pixels(h, w)
    pixels = np.asarray(pixels)
    if pixels.dtype.kind == "f":
        if samples == 1:
            pixels = to_stored(pixels, bits_stored, signed, photometric)
        else:
            pixels = np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8)
    if samples > 1 and pixels.shape[-1] != samples:
        pixels = np.repeat(pixels[..., None], samples, axis=-1)
        pixels[..., 0] = pixels[..., 0] // 2           # really colourful: channels differ
    if frames > 1 and pixels.ndim == (2 if samples == 1 else 3):
        pixels = np.stack([pixels] * frames)
    if bits_stored <= 8 and not signed:
        return pixels.astype(np.uint8)
    return pixels.astype(np.int16 if signed else np.uint16)


def _file_meta(ds: Dataset, syntax: UID) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = syntax
    ds.file_meta = meta


def make_dicom(pixels: np.ndarray | None = None, *, modality: str | None = "DX", body_part: str | None = "CHEST",
               view: str | None = "PA", photometric: str = "MONOCHROME2", bits_stored: int = 12, signed: bool = False,
               rescale: tuple[float, float] | None = (1.0, 0.0),
               window: tuple[float, float] | Sequence[tuple[float, float]] | None = None,
               voi_function: str | None = None, voi_lut: np.ndarray | None = None,
               modality_lut: np.ndarray | None = None, syntax: str = "explicit", frames: int = 1, samples: int = 1,
               with_pixels: bool = True, phi: bool = True, size: tuple[int, int] = (128, 128),
               extra: dict | None = None) -> bytes:
    """The bytes of one DICOM Part 10 file.

    pixels: integer array = the stored values as they are ([frames,] h, w[, samples]); float array = a 0..1
      picture scaled by `to_stored` to the full range of `bits_stored`; None = `chest_pixels(*size)` that way.
    rescale: (RescaleSlope, RescaleIntercept), or None for no rescale attributes; modality_lut: a Modality LUT
      Sequence (LUT data array, first mapped value 0) instead. window: (WindowCenter, WindowWidth) or a list of
      them (several windows); voi_function: VOILUTFunction; voi_lut: a VOI LUT Sequence's data (first mapped 0).
    samples=3 with the default photometric writes RGB. extra: more attributes by keyword (None deletes one).
    """
    if syntax not in SYNTAXES:
        raise ValueError(f"syntax must be one of {sorted(SYNTAXES)}, got {syntax!r}")
    if samples > 1 and photometric.startswith("MONOCHROME"):
        photometric = "RGB"
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage if modality is None else UID("1.2.840.10008.5.1.4.1.1.1.1")
    if phi:
        for k, v in PHI.items():
            setattr(ds, k, v)
        ds.PatientSex, ds.PatientAge = "F", "053Y"
    else:
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = "1.2.3.1", "1.2.3.2", "1.2.3.3"
    for key, value in (("Modality", modality), ("BodyPartExamined", body_part), ("ViewPosition", view)):
        if value is not None:
            setattr(ds, key, value)
    ds.Manufacturer = "cxrlt test factory"
    h, w = size
    if with_pixels:
        arr = _pixels(pixels, h, w, frames, samples, bits_stored, signed, photometric)
        if frames > 1:
            ds.NumberOfFrames = frames
        ds.Rows, ds.Columns = arr.shape[-2:] if samples == 1 else arr.shape[-3:-1]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = samples, photometric
        if samples > 1:
            ds.PlanarConfiguration = 0
        ds.BitsAllocated = 8 if arr.dtype.itemsize == 1 else 16
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits_stored, bits_stored - 1, int(signed)
        ds.PixelData = arr.tobytes()
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
        ds.RescaleType = "US"
    if modality_lut is not None:
        _lut_sequence(ds, "ModalityLUTSequence", modality_lut, bits_stored)
        for k in ("RescaleSlope", "RescaleIntercept", "RescaleType"):
            if k in ds:
                delattr(ds, k)
    if window is not None:
        windows = [window] if np.ndim(window) == 1 else list(window)
        ds.WindowCenter = [float(c) for c, _ in windows] if len(windows) > 1 else float(windows[0][0])
        ds.WindowWidth = [float(w) for _, w in windows] if len(windows) > 1 else float(windows[0][1])
    if voi_function is not None:
        ds.VOILUTFunction = voi_function
    if voi_lut is not None:
        _lut_sequence(ds, "VOILUTSequence", voi_lut, 16)
    for k, v in (extra or {}).items():
        if v is None:
            if k in ds:
                delattr(ds, k)
        else:
            setattr(ds, k, v)
    return _encode(ds, syntax, with_pixels)


def _lut_sequence(ds: Dataset, keyword: str, data: np.ndarray, bits: int) -> None:
    item = Dataset()
    data = np.asarray(data, dtype=np.uint16)
    item.LUTDescriptor = [len(data), 0, 16 if bits > 8 else 8]
    item.LUTData = [int(v) for v in data]
    item["LUTData"].VR = "US"
    if keyword == "ModalityLUTSequence":
        item.ModalityLUTType = "US"
    setattr(ds, keyword, DicomSequence([item]))


def _encode(ds: Dataset, syntax: str, with_pixels: bool) -> bytes:
    uid = SYNTAXES[syntax]
    _file_meta(ds, ExplicitVRLittleEndian if syntax != "implicit" else ImplicitVRLittleEndian)
    if syntax in ("jpeg2000", "rle") and with_pixels:
        ds.compress(uid, encoding_plugin="pylibjpeg" if syntax == "jpeg2000" else "pydicom")
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    if syntax in _GDCM_SYNTAX and with_pixels:
        data = _gdcm_transcode(data, _GDCM_SYNTAX[syntax])
    return data


def _gdcm_transcode(data: bytes, gdcm_syntax: str) -> bytes:
    """Re-encode a Part 10 file's pixel data with python-gdcm (JPEG-LS / JPEG lossless have no pydicom encoder
    here)."""
    import gdcm

    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "in.dcm"), os.path.join(d, "out.dcm")
        with open(src, "wb") as f:
            f.write(data)
        reader = gdcm.ImageReader()
        reader.SetFileName(src)
        if not reader.Read():
            raise RuntimeError("gdcm could not read the uncompressed test file")
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, gdcm_syntax)))
        change.SetInput(reader.GetImage())
        if not change.Change():
            raise RuntimeError(f"gdcm could not encode {gdcm_syntax}")
        writer = gdcm.ImageWriter()
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        writer.SetFileName(dst)
        if not writer.Write():
            raise RuntimeError("gdcm could not write the transcoded test file")
        with open(dst, "rb") as f:
            return f.read()
