"""Input rules that need no model: what the file says it is (DICOM Modality, BodyPartExamined) and what its
pixels are (size, aspect ratio, colour, flatness). Each rule gives a `GateCheck`; a refusal has a short
machine `code` and a `message` saying what is wrong and what to send instead.

Decisions, with the reasons:

* Modality: a projection radiograph, i.e. CR (computed radiography), DX (digital radiography) or DR (not a
  DICOM code, but written by some vendors for DX). Everything else is refused by name. Absent (PNG / JPEG,
  or a DICOM without the attribute): the rule does not run.
* BodyPartExamined: refused only when it names a body part and none of the chest words below (CHEST,
  THORAX, LUNG, and TORAX / TORACE / POITRINE / PECHO / CXR, also as parts of "CHEST PA", "CHEST_LAT", "PORT
  CHEST", with accents dropped); a value naming a chest word together with another region (CHEST ABDOMEN,
  THORACIC SPINE, CHEST RIBS) is refused: that exam is centred on another region or taken with another
  technique (rib series: obliques, bone exposure), so it is not what the model was trained on. A value
  that names neither (vendor free text such as "PORTABLE", "XRAY") passes with a note: refusing it would
  reject genuine chest films, and the image rules and the OOD score still look at the pixels. Absent or
  empty: the rule does not run.
* Size: the shorter side at least `MIN_SIDE` = 64 px. Chest radiographs are acquired at 2000-3000 px and
  exported at 224-1024 px; the demo writes 256 x 320 (and at least 32 px only in tests, where `min_side` is
  passed). 64 px is the smallest side at which the lungs, heart and diaphragm are still resolved and the
  input size of the CPU demo models; below that the image is a thumbnail or an icon.
* Aspect ratio: long side / short side at most `MAX_ASPECT` = 2.5. Chest films are 0.7-1.4 (14 x 17 in
  portrait or landscape cassettes, 35 x 43 cm detectors); 2.5 leaves room for a cropped or padded export and
  refuses slivers, panoramas and stitched spine / long-leg images (3:1 and beyond).
* Colour: `ImageInfo.chroma` (mean HSV chroma, 0..1) above `MAX_CHROMA` = 0.10 is a photograph or a
  screenshot. A radiograph is grey (chroma 0, < 0.01 after JPEG); coloured markers or a ruler over a few per
  cent of it stay under 0.05, a tinted photo of a viewer or a sepia print near 0.05-0.09; photographs of
  scenes are 0.15-0.5 (the synthetic photographs of `synthetic.py`: at least 0.22).
* Flat: a grey image whose 1st-99th percentile span is under `MIN_SPAN` = 8 grey levels (of 255) shows
  nothing; a radiograph spans most of the range even when windowed narrowly.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

MODALITIES_OK = ("CR", "DX", "DR")
MODALITY_NAMES = {
    "CT": "computed tomography", "MR": "magnetic resonance", "US": "ultrasound", "NM": "nuclear medicine",
    "PT": "PET", "MG": "mammography", "XA": "X-ray angiography", "RF": "fluoroscopy", "OT": "other",
    "SC": "a secondary capture (screenshot or scan)", "IO": "intra-oral radiography", "PX": "panoramic dental "
    "radiography", "DG": "diaphanography", "ES": "endoscopy", "XC": "external-camera photography",
    "OP": "ophthalmic photography", "GM": "general microscopy", "SM": "slide microscopy", "BMD": "bone "
    "densitometry", "ECG": "electrocardiography", "SR": "a structured report", "PR": "a presentation state",
    "SEG": "a segmentation", "KO": "a key-object selection", "DOC": "a document", "RTIMAGE": "a radiotherapy "
    "image", "OCT": "optical coherence tomography", "CT/PT": "PET-CT"}
CHEST_WORDS = frozenset({"CHEST", "THORAX", "THORACIC", "LUNG", "LUNGS", "TORAX", "TORACE", "TORACICO",
                         "THORAKS", "POITRINE", "PECHO", "CXR", "CHESTPA", "CHESTAP", "CHESTLAT"})
OTHER_PARTS = frozenset({
    "ABDOMEN", "ABD", "PELVIS", "HIP", "HIPS", "KNEE", "KNEES", "HAND", "HANDS", "FINGER", "FINGERS", "THUMB",
    "WRIST", "FOREARM", "ELBOW", "ARM", "HUMERUS", "SHOULDER", "CLAVICLE", "SCAPULA", "FOOT", "FEET", "TOE",
    "ANKLE", "LEG", "FEMUR", "TIBIA", "FIBULA", "EXTREMITY", "EXTREMITIES", "LOWEXM", "UPPEXM", "SKULL", "HEAD",
    "BRAIN", "FACE", "SINUS", "SINUSES", "NECK", "CSPINE", "TSPINE", "LSPINE", "SSPINE", "SPINE", "SACRUM",
    "COCCYX", "BREAST", "MAMMO", "DENTAL", "JAW", "MANDIBLE", "TMJ", "ORBIT", "EAR", "NOSE", "KIDNEY",
    "BLADDER", "COLON", "STOMACH", "WHOLEBODY", "BONE", "PATELLA", "CALCANEUS", "HEEL",
    "RIB", "RIBS", "STERNUM", "CHESTABDOMEN", "ABDOMENCHEST", "CHESTABDPELVIS", "BABYGRAM"})
MIN_SIDE, MAX_ASPECT, MAX_CHROMA, MIN_SPAN = 64, 2.5, 0.10, 8


@dataclass(frozen=True)
class GateCheck:
    """One check of the gate. `ran` False: it could not run (no data for it; `message` says why).
    `passed` is None exactly when it did not run. `value` / `limit`: what was measured and the bound."""

    name: str
    ran: bool
    passed: bool | None
    code: str | None = None        # the refusal's machine code (None unless refused)
    message: str = ""
    value: Any = None
    limit: Any = None

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class GateResult:
    """The checks run on one image (or study). JSON-able through `as_dict`."""

    checks: tuple[GateCheck, ...] = field(default_factory=tuple)

    @property
    def passed(self) -> bool:
        return all(c.passed is not False for c in self.checks)

    @property
    def refusals(self) -> list[GateCheck]:
        return [c for c in self.checks if c.passed is False]

    @property
    def code(self) -> str | None:
        r = self.refusals
        return r[0].code if r else None

    @property
    def reason(self) -> str | None:
        return " ".join(c.message for c in self.refusals) or None

    def __add__(self, other: "GateResult | Iterable[GateCheck]") -> "GateResult":
        more = other.checks if isinstance(other, GateResult) else tuple(other)
        return GateResult(self.checks + tuple(more))

    def as_dict(self) -> dict:
        return {"passed": self.passed, "code": self.code, "reason": self.reason,
                "ran": [c.name for c in self.checks if c.ran],
                "not_run": [c.name for c in self.checks if not c.ran],
                "checks": [c.as_dict() for c in self.checks]}


def _refuse(name, code, message, value=None, limit=None) -> GateCheck:
    return GateCheck(name, True, False, code, message, value, limit)


def _ok(name, value=None, limit=None, message="") -> GateCheck:
    return GateCheck(name, True, True, None, message, value, limit)


def _not_run(name, why) -> GateCheck:
    return GateCheck(name, False, None, None, why)


def _clean(value) -> str:
    s = unicodedata.normalize("NFKD", str(value)).encode("ascii", "ignore").decode()
    return s.strip().upper()


def check_modality(modality) -> GateCheck:
    m = _clean(modality) if modality is not None else ""
    if not m:
        return _not_run("modality", "no DICOM Modality (not a DICOM file, or the attribute is absent)")
    if m in MODALITIES_OK:
        return _ok("modality", m, list(MODALITIES_OK))
    what = MODALITY_NAMES.get(m, "not a projection radiograph")
    return _refuse("modality", "modality", f"The DICOM Modality is {m} ({what}): this model reads projection "
                   "radiographs only. Send the chest radiograph itself (Modality CR or DX).", m, list(MODALITIES_OK))


def body_part_words(value) -> list[str]:
    """BodyPartExamined split into upper-case words, accents dropped ("Tórax pa" -> ["TORAX", "PA"])."""
    return [w for w in re.split(r"[^A-Z0-9]+", _clean(value)) if w]


def check_body_part(body_part) -> GateCheck:
    words = body_part_words(body_part) if body_part is not None else []
    if not words:
        return _not_run("body_part", "no DICOM BodyPartExamined (absent or empty)")
    value = " ".join(words)
    chest = [w for w in words if w in CHEST_WORDS]
    other = [w for w in words if w in OTHER_PARTS]
    if chest and not other:
        return _ok("body_part", value, "a chest")
    if other:
        return _refuse("body_part", "body_part", f"The DICOM BodyPartExamined is {value!r}"
                       + (" (another region with the chest)" if chest else "") + ": this model reads adult chest "
                       "radiographs only. Send a chest radiograph (BodyPartExamined CHEST).", value, "a chest")
    return _ok("body_part", value, "a chest", f"BodyPartExamined {value!r} names no known body part; not refused")


def check_metadata(info) -> list[GateCheck]:
    """Rules on what the file says it is (attributes of `ImageInfo`; missing ones skip their rule)."""
    return [check_modality(getattr(info, "modality", None)), check_body_part(getattr(info, "body_part", None))]


def check_geometry(info, min_side: int = MIN_SIDE, max_aspect: float = MAX_ASPECT,
                   max_chroma: float = MAX_CHROMA) -> list[GateCheck]:
    """Rules on the source's size, shape and colour (ImageInfo.width, .height, .chroma)."""
    w, h = int(info.width), int(info.height)
    out = []
    if min(w, h) < min_side:
        out.append(_refuse("size", "too_small", f"The image is {w} x {h} pixels: a chest radiograph needs at "
                           f"least {min_side} pixels on its shorter side. Send the radiograph at its full or a "
                           "moderately reduced resolution (a few hundred pixels or more).", [w, h], min_side))
    else:
        out.append(_ok("size", [w, h], min_side))
    aspect = max(w, h) / max(min(w, h), 1)
    if aspect > max_aspect:
        out.append(_refuse("aspect", "aspect_ratio", f"The image is {w} x {h} pixels, {aspect:.1f} times longer "
                           f"than wide: chest radiographs are about square (at most {max_aspect:g}:1 accepted). "
                           "Send the whole, uncropped chest radiograph.", round(aspect, 3), max_aspect))
    else:
        out.append(_ok("aspect", round(aspect, 3), max_aspect))
    chroma = getattr(info, "chroma", None)
    if chroma is None:
        out.append(_not_run("colour", "no colourfulness measured for this image"))
    elif float(chroma) > max_chroma:
        out.append(_refuse("colour", "colour", f"The image is in colour (mean chroma {float(chroma):.2f}, "
                           f"radiographs are grey, at most {max_chroma:g} accepted): it looks like a photograph "
                           "or a screenshot. Send the radiograph itself as DICOM, PNG or JPEG, not a photo of "
                           "a screen or a film.", round(float(chroma), 4), max_chroma))
    else:
        out.append(_ok("colour", round(float(chroma), 4), max_chroma))
    return out


def check_pixels(image, min_span: float = MIN_SPAN) -> list[GateCheck]:
    """Rules on the decoded grey pixels (a PIL "L" image or a 2-D array)."""
    a = np.asarray(image.convert("L") if hasattr(image, "convert") else image, dtype=np.float32)
    lo, hi = np.percentile(a, [1, 99])
    span = float(hi - lo)
    if span < min_span:
        return [_refuse("flat", "flat", f"The image is nearly uniform (its grey levels span {span:.0f} of 255 "
                        f"between the 1st and 99th percentile, at least {min_span:g} needed): it shows nothing. "
                        "Send the radiograph itself.", round(span, 2), min_span)]
    return [_ok("flat", round(span, 2), min_span)]


def check_image(info, image=None, *, min_side: int = MIN_SIDE, max_aspect: float = MAX_ASPECT,
                max_chroma: float = MAX_CHROMA, min_span: float = MIN_SPAN) -> GateResult:
    """Every rule that needs no model, on one decoded image: metadata, geometry, colour and, when the decoded
    grey `image` is given, flatness. The OOD score is `Predictor.gate_images` (it needs the model)."""
    checks = check_metadata(info) + check_geometry(info, min_side, max_aspect, max_chroma)
    checks += check_pixels(image, min_span) if image is not None else [_not_run("flat", "no pixels given")]
    return GateResult(tuple(checks))
