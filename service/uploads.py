"""Reading and checking an uploaded study (no BentoML here: plain Starlette requests).

Every problem with the input raises `UploadError(status, message)`: the service answers it as a 4xx
JSON body `{"error": message}`, never as a 500. The entry service decodes and resizes images to the
model's input size (service/decoding.py, with `cxrlt.data.images.read_image`, the function the training
cache uses), so only model-size pixels cross to the model process; `build_study` then runs the input
gate's rules that need no model (format, size, aspect, colour, DICOM modality and body part): a refusal
is a 422 with the reason.
Nothing read from a DICOM header beyond `ImageInfo`'s technical fields is kept, so no identifier can
reach an answer, a log line or the prediction store.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from cxrlt.views import VIEW_CODES
from cxrlt.data.image_info import ImageInfo
from cxrlt.gate import GateResult, check_image
from cxrlt.inference import StudyInputError, view_code

from service.decoding import MAX_IMAGE_BYTES, UploadError

VIEW_NAMES = {code: name for name, code in VIEW_CODES.items()}  # 0 frontal, 1 lateral, 2 unknown
FIELDS = ("images", "views")


@dataclass
class Study:
    """A checked study: model-size uint8 pixels per image, its technical facts and gate result, one view
    per image (and where it came from), identifier-free statistics for drift monitoring."""

    images: list[np.ndarray] = field(default_factory=list)
    infos: list[ImageInfo] = field(default_factory=list)
    gates: list[GateResult] = field(default_factory=list)
    views: list[str] = field(default_factory=list)
    view_sources: list[str] = field(default_factory=list)
    stats: list[dict] = field(default_factory=list)

    def gate_report(self) -> dict:
        """What the input gate checked: the checks that ran on every image, and per image its technical
        facts (never an identifier), the view used and each check's verdict."""
        images = []
        for i, (info, gate) in enumerate(zip(self.infos, self.gates)):
            d = {k: v for k, v in info.as_dict().items() if v is not None}
            if i < len(self.views):
                d["view"], d["view_source"] = self.views[i], self.view_sources[i]
            images.append({**d, "gate": gate.as_dict()})
        ran = sorted(set.intersection(*(set(g.as_dict()["ran"]) for g in self.gates))) if self.gates else []
        return {"passed": all(g.passed for g in self.gates), "checks": ran, "images": images}


def keep_uploads_in_memory() -> None:
    """Starlette spools an uploaded file over 1 MiB to a temporary file on disk; a radiograph is 1-20 MiB
    and is read back at once, so the spooling only costs time (4-5x the parsing time of a 6 MiB study).
    Uploads are bounded (admission control x the request size limit), so memory stays bounded."""
    from starlette.formparsers import MultiPartParser

    MultiPartParser.spool_max_size = MAX_IMAGE_BYTES + 1


async def read_form(request, max_images: int, extra: tuple[str, ...] = ()
                    ) -> tuple[list[bytes], list[str] | None, dict[str, list]]:
    """-> (file contents in upload order, views or None, {field: its values} for each of `extra`, the
    route's own fields) from a multipart request."""
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        raise UploadError(415, "send multipart/form-data with 1 to "
                               f"{max_images} image files in the field 'images' (and optional 'views')")
    length = request.headers.get("content-length", "")
    if not length.isdigit():  # the server reads exactly Content-Length bytes: the upload size is bounded
        raise UploadError(411, "send the upload with a Content-Length header (no chunked transfer)")
    if int(length) > (max_images + 1) * MAX_IMAGE_BYTES:
        raise UploadError(413, f"request too large ({int(length) / 2**20:.1f} MiB): at most {max_images} "
                               f"images of {MAX_IMAGE_BYTES // 2**20} MiB each")
    try:
        form = await request.form(max_files=16, max_fields=32)
    except Exception as e:  # malformed multipart bodies, too many parts
        raise UploadError(400, f"could not read the multipart form: {getattr(e, 'detail', None) or e}") from None
    try:
        unknown = sorted(set(form.keys()) - set(FIELDS) - set(extra))
        if unknown:
            known = ", ".join(f"'{f}'" for f in extra)
            raise UploadError(400, f"unknown form field(s) {unknown}: send files in 'images' and views in 'views'"
                                   + (f" (and {known})" if known else ""))
        parts = form.getlist("images")
        if not parts:
            raise UploadError(400, "no images: send 1 to "
                                   f"{max_images} PNG, JPEG or DICOM files in the multipart field 'images'")
        if len(parts) > max_images:
            raise UploadError(400, f"{len(parts)} images: a study has at most {max_images} images")
        blobs = []
        for i, part in enumerate(parts, 1):
            if isinstance(part, str):
                raise UploadError(400, f"'images' part {i} is text, not a file: upload the image file itself")
            if part.size is not None and part.size > MAX_IMAGE_BYTES:
                raise UploadError(413, f"image {i} is {part.size / 2**20:.1f} MiB: "
                                       f"the limit is {MAX_IMAGE_BYTES // 2**20} MiB per image")
            blobs.append(await part.read(MAX_IMAGE_BYTES + 1))
        return blobs, parse_views(form.getlist("views")), {f: form.getlist(f) for f in extra}
    finally:
        await form.close()


def parse_views(values: list) -> list[str] | None:
    """Views as repeated fields (`views=frontal`, `views=lateral`), one JSON list, or one comma list."""
    if any(not isinstance(v, str) for v in values):
        raise UploadError(400, "'views' must be text (frontal, lateral or unknown), not a file")
    if not values:
        return None
    if len(values) == 1:
        v = values[0].strip()
        if v.startswith("["):
            try:
                parsed = json.loads(v)
            except json.JSONDecodeError:
                raise UploadError(400, f"'views' is not a valid JSON list: {v[:80]!r}") from None
            if not isinstance(parsed, list) or not all(isinstance(x, (str, type(None))) for x in parsed):
                raise UploadError(400, "'views' must be a list of frontal, lateral or unknown")
            return [x or "" for x in parsed]
        if "," in v:
            return [x.strip() for x in v.split(",")]
    return [v.strip() for v in values]


def study_views(given: list[str] | None, infos: list[ImageInfo]) -> tuple[list[str], list[str]]:
    """The view of each image: the client's frontal/lateral, else the DICOM header's, else unknown.
    -> (views, where each came from: "client" | "header" | "none")."""
    views, sources = [], []
    for i, info in enumerate(infos):
        v = (given[i] if given else "") or ""
        name = VIEW_NAMES[view_code(v)]
        if name != "unknown":
            views.append(name), sources.append("client")
        elif info.view in ("frontal", "lateral"):
            views.append(info.view), sources.append("header")
        else:
            views.append("unknown"), sources.append("none")
    return views, sources


def check_request(blobs: list[bytes], views: list[str] | None, max_images: int) -> None:
    """Counts and views, before any decoding."""
    if not blobs:
        raise UploadError(400, f"no images: a study needs 1 to {max_images} images")
    if len(blobs) > max_images:
        raise UploadError(400, f"{len(blobs)} images: a study has at most {max_images} images")
    if views is not None and len(views) != len(blobs):
        raise UploadError(400, f"{len(blobs)} images but {len(views)} views: give one view per image "
                               f"({', '.join(VIEW_CODES)}) or none")
    try:
        [view_code(v) for v in views or []]
    except StudyInputError as e:
        raise UploadError(400, str(e)) from None


def build_study(decoded: list[tuple[np.ndarray, ImageInfo]], views: list[str] | None) -> Study:
    """Decoded images (in upload order) -> a Study: the input gate's rules on each (a refusal raises
    UploadError 422 with the reason), the views, identifier-free stats."""
    study = Study()
    for i, (pixels, info) in enumerate(decoded, 1):
        gate = check_image(info, pixels)
        study.images.append(pixels)
        study.infos.append(info)
        study.gates.append(gate)
        if not gate.passed:
            raise UploadError(422, f"image {i} was refused by the input gate: {gate.reason}", study.gate_report())
        study.stats.append(image_stats(pixels, info))
    study.views, study.view_sources = study_views(views, study.infos)
    return study


def image_stats(pixels: np.ndarray, info: ImageInfo) -> dict[str, float]:
    """Identifier-free statistics for drift monitoring: the source's size, the model input's intensity."""
    a = pixels.astype(np.float32) / 255.0
    return {"width": float(info.width), "height": float(info.height),
            "mean_intensity": float(a.mean()), "std_intensity": float(a.std())}
