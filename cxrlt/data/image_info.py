"""What both image readers (`cxrlt.data.images` for PNG / JPEG, `cxrlt.data.dicom` for DICOM) return and
raise: `ImageInfo`, the technical facts about a decoded image, and `ImageDecodeError`, the refusal that says
what is wrong and what to do."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

SEND = "send the radiograph as a PNG, a JPEG or a DICOM Part 10 file"


class ImageDecodeError(ValueError):
    """The input is not an image this project can read; the message says what is wrong and what to do."""

    def __init__(self, problem: str, todo: str = SEND, kind: str = "unreadable"):
        # kind: "unreadable" | "unsupported" (a format or encoding this reader refuses) | "too_large";
        # the service maps it to 400 / 415 / 413
        self.problem, self.todo, self.kind = problem, todo, kind
        super().__init__(f"{problem}. What to do: {todo}.")


@dataclass(frozen=True)
class ImageInfo:
    """Technical facts about a decoded image; by design it has no field that could hold an identifier."""

    format: str                         # "DICOM" | "PNG" | "JPEG"
    width: int                          # of the source pixels
    height: int
    chroma: float                       # mean colourfulness 0..1 before grey conversion (0 for grey / DICOM)
    modality: str | None = None         # DICOM Modality, upper-case ("CR", "DX", "CT", ...)
    body_part: str | None = None        # DICOM BodyPartExamined, upper-case ("CHEST", ...)
    view: str | None = None             # "frontal" | "lateral" | None, from DICOM ViewPosition
    photometric: str | None = None      # DICOM PhotometricInterpretation
    bits_stored: int | None = None      # DICOM BitsStored; 8 or 16 for PNG / JPEG
    transfer_syntax: str | None = None  # DICOM transfer syntax name

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def too_many_pixels(width: int, height: int, limit: int) -> ImageDecodeError:
    return ImageDecodeError(f"the image is too large: {width} x {height} = {width * height} pixels, over the "
                            f"limit of {limit} pixels", "send a smaller image (a downscaled export of the "
                            "radiograph is enough: the model reads it at a few hundred pixels)", kind="too_large")
