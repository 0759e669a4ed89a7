"""Decoding uploads in worker processes: both cores decode, and a decoder that crashes takes down a worker,
never the service.

PIL's JPEG decoder holds the GIL, so threads decode one image at a time: a full-size two-image study took
87 ms in one thread either way, and under load the entry service decoded on one core while the other
idled. A small pool of spawned processes (this module and `cxrlt.data.images` only: no torch, ~60 MB each)
decodes a study's images in parallel and studies side by side. Only the bytes go in and the model-size
pixels (64-1024 px) come back. A hostile file that kills its worker (a segfault in a C decoder) breaks
the pool: it is rebuilt and the study is answered 400.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from cxrlt.data.image_info import ImageDecodeError, ImageInfo
from cxrlt.data.images import read_image

MAX_IMAGE_BYTES = 20 * 1024 * 1024     # per uploaded file
MAX_PIXELS = 40_000_000                # per image (width x height), far below PIL's bomb limit


class UploadError(Exception):
    """Input the client can fix: answered as `status` with `{"error": message}` (and the gate's report)."""

    def __init__(self, status: int, message: str, gate: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.gate = status, message, gate

    def __reduce__(self):  # crosses the process boundary with all its fields
        return UploadError, (self.status, self.message, self.gate)


def decode_image(blob: bytes, i: int, size: int) -> tuple[np.ndarray, ImageInfo]:
    """Upload number i -> (uint8 size x size pixels, exactly as the training cache makes them; its ImageInfo)."""
    if not blob:
        raise UploadError(400, f"image {i} is empty (0 bytes)")
    if len(blob) > MAX_IMAGE_BYTES:
        raise UploadError(413, f"image {i} is larger than {MAX_IMAGE_BYTES // 2**20} MiB")
    try:
        img, info = read_image(blob, size=size, max_pixels=MAX_PIXELS)
    except ImageDecodeError as e:
        raise UploadError({"too_large": 413, "unsupported": 415}.get(e.kind, 400), f"image {i}: {e}") from None
    except Exception as e:  # a corrupt file can fail in a decoder in other ways; never echo its content
        raise UploadError(400, f"image {i} cannot be decoded ({e.__class__.__name__}): "
                               f"send a PNG, JPEG or DICOM file") from None
    return np.asarray(img, dtype=np.uint8), info


class DecodePool:
    """`await decode(blobs, size)`: a study's images decoded side by side in worker processes; the pool is
    rebuilt when a worker dies."""

    def __init__(self, workers: int | None = None):
        self.workers = workers or max(1, os.cpu_count() or 1)
        self._lock = threading.Lock()
        self._pool = self._new()

    def _new(self) -> ProcessPoolExecutor:
        # spawn, not fork: the service process runs threads and an event loop, which fork does not copy safely
        return ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))

    async def decode(self, blobs: list[bytes], size: int) -> list[tuple[np.ndarray, ImageInfo]]:
        """Every image of a study at once, awaited from the event loop (no thread blocks on the pool);
        the first bad image in upload order is the error raised."""
        import asyncio

        loop, pool = asyncio.get_running_loop(), self._pool
        jobs = [loop.run_in_executor(pool, decode_image, b, i, size) for i, b in enumerate(blobs, 1)]
        results = await asyncio.gather(*jobs, return_exceptions=True)
        for r in results:
            if isinstance(r, BrokenProcessPool):
                with self._lock:
                    if self._pool is pool:
                        self._pool = self._new()
                raise UploadError(400, "an image crashed the decoder: the file is corrupt or hostile; "
                                       "send the original PNG, JPEG or DICOM file")
            if isinstance(r, BaseException):
                raise r
        return results

    def warm(self) -> None:
        """Start every worker now (each imports the image reader), not on the first upload."""
        list(self._pool.map(_ready, range(self.workers)))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _ready(_: int) -> bool:
    return True
