"""Rendering stored frames as images, and thumbnails kept as derived artifacts.

A frame is decoded alone (``frames.FrameReader.decoded``), then turned into 8-bit
display values the way PS3.3 C.11 describes:

- grayscale (MONOCHROME1/2): the Modality LUT (Rescale Slope/Intercept or Modality
  LUT Sequence), then the VOI transformation: the window asked for, else the data
  set's first Window Center/Width (with its VOI LUT Function), else its VOI LUT
  Sequence, else the frame's own minimum to maximum; MONOCHROME1 is inverted so
  that white is high;
- PALETTE COLOR through its lookup tables; RGB (and YBR, converted by the decoder)
  as it is, scaled to 8 bits when stored deeper.

A viewport scales the image to fit a box keeping its aspect ratio, after cropping
an optional source region. Output is JPEG, PNG or GIF through Pillow.

Thumbnails are small renderings of one representative frame, kept in the blob
store as derived artifacts
(``thumbnails/<study>/<series>/<sop>.<hash16>.f<frame>.<options hash>.<ext>``): the
key names the content and the rendering, so a copy never needs invalidating. The
HTTP door renders them on request (``dicomweb.rendered`` parses the request); the
``studybridge.prepare_series`` task renders the default ones after ingest.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    from gateway.archive.blobstore import BlobStore
    from gateway.archive.frames import FrameReader
    from gateway.archive.retrieve import StoredInstance

JPEG = "image/jpeg"
PNG = "image/png"
GIF = "image/gif"
RENDERED_TYPES = (JPEG, PNG, GIF)
_PIL_FORMATS = {JPEG: "JPEG", PNG: "PNG", GIF: "GIF"}
_EXTENSIONS = {JPEG: "jpg", PNG: "png", GIF: "gif"}
DEFAULT_QUALITY = 90
MAX_VIEWPORT = 8192
THUMBNAIL_SIZE = 128
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Window:
    center: float
    width: float
    function: str = "LINEAR"  # LINEAR, LINEAR_EXACT or SIGMOID (PS3.3 C.11.2.1.2)


@dataclass(frozen=True)
class Viewport:
    width: int
    height: int
    # Source region (x, y, width, height) in pixels of the frame, when cropping.
    region: tuple[float, float, float, float] | None = None


@dataclass(frozen=True)
class RenderOptions:
    media_type: str = JPEG
    window: Window | None = None
    viewport: Viewport | None = None
    quality: int = DEFAULT_QUALITY
    # WADO-URI region: fractions (x1, y1, x2, y2) of the frame.
    fraction_region: tuple[float, float, float, float] | None = None

    def variant(self) -> str:
        """A stable text naming this rendering (for ETags and cache keys)."""
        return repr(
            (self.media_type, self.window, self.viewport, self.quality, self.fraction_region)
        )


# -- rendering -------------------------------------------------------------------------
def render(reader: FrameReader, number: int, options: RenderOptions) -> bytes:
    """Frame ``number`` of the instance rendered as ``options`` say (encoded bytes)."""
    image = frame_image(reader, number, options.window)
    image = _fit(image, options)
    return encode(image, options.media_type, options.quality)


def frame_image(reader: FrameReader, number: int, window: Window | None = None) -> Image.Image:
    """An 8-bit Pillow image (L or RGB) of one frame, Modality and VOI LUTs applied."""
    import numpy as np
    from PIL import Image

    arr, meta = reader.decoded(number)
    header = reader.header
    photometric = str(meta.get("photometric_interpretation") or "").upper()
    samples = int(meta.get("samples_per_pixel") or 1)
    if arr.ndim == 3 and samples == 1:
        arr = arr[..., 0]
    if photometric == "PALETTE COLOR":
        from pydicom.pixels.processing import apply_color_lut

        rgb = apply_color_lut(arr, header)
        bits = 16 if rgb.dtype.itemsize > 1 else 8
        return Image.fromarray(_to_uint8(rgb, 0, 2**bits - 1), "RGB")
    if samples > 1 or arr.ndim == 3:
        bits = int(meta.get("bits_stored") or header.get("BitsStored") or 8)
        rgb = arr if arr.dtype == np.uint8 else _to_uint8(arr, 0, 2**bits - 1)
        if rgb.ndim == 3 and rgb.shape[-1] >= 3:
            return Image.fromarray(np.ascontiguousarray(rgb[..., :3]), "RGB")
        return Image.fromarray(np.ascontiguousarray(rgb), "L")
    gray = _grayscale(arr, header, window)
    if photometric == "MONOCHROME1":
        gray = 255 - gray
    return Image.fromarray(gray, "L")


def _grayscale(arr: np.ndarray, header: Any, window: Window | None) -> np.ndarray:
    import numpy as np
    from pydicom.pixels.processing import apply_modality_lut, apply_voi

    try:
        values = apply_modality_lut(arr, header)
    except Exception:  # a broken Modality LUT: show stored values
        values = arr
    values = np.asarray(values, dtype=np.float64)
    if window is None:
        window = _dataset_window(header)
    if window is not None:
        return _apply_window(values, window)
    if header.get("VOILUTSequence"):
        try:
            mapped = apply_voi(arr, header)
            item = header.VOILUTSequence[0]
            depth = int(item.LUTDescriptor[2])
            return _to_uint8(np.asarray(mapped), 0, 2**depth - 1)
        except Exception as exc:  # a malformed VOI LUT: fall back to the frame's range
            log.debug("VOI LUT not applied: %s", exc)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros(values.shape, dtype=np.uint8)
    return _to_uint8(values, float(finite.min()), float(finite.max()))


def _dataset_window(header: Any) -> Window | None:
    def first(keyword: str) -> float | None:
        value = header.get(keyword)
        if value is None or value == "":
            return None
        try:
            if not isinstance(value, str | bytes) and hasattr(value, "__getitem__"):
                value = value[0]
            number = float(value)
        except (TypeError, ValueError, IndexError):
            return None
        return number if math.isfinite(number) else None

    center, width = first("WindowCenter"), first("WindowWidth")
    if center is None or width is None or width <= 0:
        return None
    function = str(header.get("VOILUTFunction", "") or "LINEAR").strip().upper()
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        function = "LINEAR"
    if function == "LINEAR" and width < 1:
        function = "LINEAR_EXACT"
    return Window(center, width, function)


def _apply_window(values: np.ndarray, window: Window) -> np.ndarray:
    """PS3.3 C.11.2.1.2: window to 0-255."""
    import numpy as np

    c, w = window.center, window.width
    if window.function == "SIGMOID":
        out = 1.0 / (1.0 + np.exp(-4.0 * (values - c) / w))
    elif window.function == "LINEAR_EXACT":
        out = np.clip((values - c) / w + 0.5, 0.0, 1.0)
    else:
        out = (
            np.clip((values - (c - 0.5)) / (w - 1) + 0.5, 0.0, 1.0)
            if w > 1
            else ((values > c - 0.5).astype(np.float64))
        )
    return np.round(out * 255.0).astype(np.uint8)


def _to_uint8(values: Any, low: float, high: float) -> np.ndarray:
    import numpy as np

    values = np.asarray(values, dtype=np.float64)
    if high <= low:
        return np.where(values > low, 255, 0).astype(np.uint8)
    scaled = (values - low) * (255.0 / (high - low))
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def _fit(image: Image.Image, options: RenderOptions) -> Image.Image:
    from PIL import Image

    if options.fraction_region is not None:
        x1, y1, x2, y2 = options.fraction_region
        w, h = image.size
        box = (round(x1 * w), round(y1 * h), max(round(x2 * w), 1), max(round(y2 * h), 1))
        image = image.crop(box)
    viewport = options.viewport
    if viewport is None:
        return image
    if viewport.region is not None:
        sx, sy, sw, sh = viewport.region
        w, h = image.size
        if sx >= w or sy >= h:
            raise ValueError("viewport source region lies outside the image")
        box = (round(sx), round(sy), round(min(sx + sw, w)), round(min(sy + sh, h)))
        image = image.crop(box)
    w, h = image.size
    scale = min(viewport.width / w, viewport.height / h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size != image.size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    return image


def encode(image: Image.Image, media_type: str, quality: int = DEFAULT_QUALITY) -> bytes:
    out = io.BytesIO()
    fmt = _PIL_FORMATS[media_type]
    if fmt == "JPEG":
        image.save(out, format="JPEG", quality=quality)
    elif fmt == "PNG":
        image.save(out, format="PNG", compress_level=6)
    else:
        image.save(out, format="GIF")
    return out.getvalue()


# -- thumbnails ------------------------------------------------------------------------
def thumbnail_options(media_type: str = JPEG, size: int = THUMBNAIL_SIZE) -> RenderOptions:
    """The rendering of a thumbnail: the whole frame fitted to a ``size`` box."""
    return RenderOptions(media_type=media_type, viewport=Viewport(size, size))


def representative(instances: Sequence[StoredInstance]) -> StoredInstance | None:
    """The instance a study or series thumbnail shows: the middle image of the first
    series that has images (None when nothing has pixel data)."""
    images = [i for i in instances if i.rows and i.columns]
    if not images:
        return None
    first_series = images[0].series_uid
    series = [i for i in images if i.series_uid == first_series]
    return series[(len(series) - 1) // 2]


def thumbnail_key(inst: StoredInstance, number: int, options: RenderOptions) -> str:
    variant = hashlib.sha256(options.variant().encode()).hexdigest()[:12]
    return (
        f"thumbnails/{inst.study_uid}/{inst.series_uid}/{inst.sop_uid}."
        f"{inst.sha256[:16]}.f{number}.{variant}.{_EXTENSIONS[options.media_type]}"
    )


def cached_thumbnail(
    store: BlobStore,
    scratch_dir: Path,
    reader: FrameReader,
    number: int,
    options: RenderOptions,
) -> bytes:
    """A thumbnail from the blob store, or rendered now and kept there."""
    key = thumbnail_key(reader.inst, number, options)
    if store.exists(key):
        with contextlib.suppress(OSError, Exception), store.open(key) as fh:
            return fh.read()
    data = render(reader, number, options)
    _keep(store, scratch_dir, key, data)
    return data


def _keep(store: BlobStore, scratch_dir: Path, key: str, data: bytes) -> None:
    try:
        scratch_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=scratch_dir, suffix=".thumb")
    except OSError:
        return
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        store.put_file(key, Path(name), move=True)
    except Exception:  # a derived artifact that cannot be kept is made again next time
        return
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
