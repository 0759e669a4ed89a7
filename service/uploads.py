"""Reading and checking an uploaded study (no BentoML here: plain Starlette requests and PIL).

Every problem with the input raises `UploadError(status, message)`: the service answers it as a 4xx
JSON body `{"error": message}`, never as a 500.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from cxrlt.data.dataset import VIEW_CODES
from cxrlt.data.transforms import ImageDecodeError, image_stats, load_grayscale
from cxrlt.inference import StudyInputError, view_code

MAX_IMAGE_BYTES = 20 * 1024 * 1024     # per uploaded file
MAX_PIXELS = 40_000_000                # per image (width x height), far below PIL's bomb limit
FORMATS = ("PNG", "JPEG")
VIEW_NAMES = {code: name for name, code in VIEW_CODES.items()}  # 0 frontal, 1 lateral, 2 unknown
FIELDS = ("images", "views")


class UploadError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Study:
    """A checked study: 8-bit grayscale pixels per image, one normalised view per image, image stats."""

    images: list[np.ndarray] = field(default_factory=list)
    views: list[str] = field(default_factory=list)
    stats: list[dict] = field(default_factory=list)


async def read_form(request, max_images: int) -> tuple[list[bytes], list[str] | None]:
    """-> (file contents in upload order, views or None) from a multipart request."""
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
        form = await request.form(max_files=16, max_fields=16)
    except Exception as e:  # malformed multipart bodies, too many parts
        raise UploadError(400, f"could not read the multipart form: {getattr(e, 'detail', None) or e}") from None
    try:
        unknown = sorted(set(form.keys()) - set(FIELDS))
        if unknown:
            raise UploadError(400, f"unknown form field(s) {unknown}: send files in 'images' and views in 'views'")
        parts = form.getlist("images")
        if not parts:
            raise UploadError(400, "no images: send 1 to "
                                   f"{max_images} PNG or JPEG files in the multipart field 'images'")
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
        return blobs, parse_views(form.getlist("views"))
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


def decode_image(blob: bytes, i: int) -> Image.Image:
    if not blob:
        raise UploadError(400, f"image {i} is empty (0 bytes)")
    if len(blob) > MAX_IMAGE_BYTES:
        raise UploadError(413, f"image {i} is larger than {MAX_IMAGE_BYTES // 2**20} MiB")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            head = Image.open(io.BytesIO(blob))  # reads the header only
        fmt, (w, h) = head.format, head.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UploadError(413, f"image {i} has too many pixels: "
                               f"the limit is {MAX_PIXELS / 1e6:.0f} megapixels") from None
    except Exception:
        raise UploadError(400, f"image {i} is not a readable image: send PNG or JPEG files") from None
    if fmt not in FORMATS:
        raise UploadError(415, f"image {i} is {fmt}: send PNG or JPEG files")
    if w * h > MAX_PIXELS:
        raise UploadError(413, f"image {i} is {w}x{h} pixels ({w * h / 1e6:.1f} MP): "
                               f"the limit is {MAX_PIXELS / 1e6:.0f} megapixels")
    try:
        return load_grayscale(blob)
    except ImageDecodeError as e:
        raise UploadError(400, f"image {i} cannot be decoded: {e}") from None
    except Exception as e:  # a corrupt file can fail in a decoder in other ways
        raise UploadError(400, f"image {i} cannot be decoded ({e.__class__.__name__})") from None


def decode_study(blobs: list[bytes], views: list[str] | None, max_images: int) -> Study:
    """Check counts and views, decode every image to 8-bit grayscale, take identifier-free stats."""
    if not blobs:
        raise UploadError(400, f"no images: a study needs 1 to {max_images} images")
    if len(blobs) > max_images:
        raise UploadError(400, f"{len(blobs)} images: a study has at most {max_images} images")
    views = list(views) if views is not None else [""] * len(blobs)
    if len(views) != len(blobs):
        raise UploadError(400, f"{len(blobs)} images but {len(views)} views: give one view per image "
                               f"({', '.join(VIEW_CODES)}) or none")
    try:
        names = [VIEW_NAMES[view_code(v)] for v in views]
    except StudyInputError as e:
        raise UploadError(400, str(e)) from None
    study = Study(views=names)
    for i, blob in enumerate(blobs, 1):
        img = decode_image(blob, i)
        study.images.append(np.asarray(img, dtype=np.uint8))
        study.stats.append(image_stats(img))
    return study
