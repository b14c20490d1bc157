"""Rendered images and thumbnails over HTTP: request parameters -> rendering options.

Parses what PS3.18 8.3.5 / 10.4.1.1.3 (and WADO-URI 9) let a client ask for:
``window=center,width[,linear|linear-exact|sigmoid]``, ``viewport=vw,vh`` or
``vw,vh,sx,sy,sw,sh``, ``quality`` (JPEG 1-100) and the media type (JPEG by
default, PNG, GIF). The rendering itself, and the thumbnail cache, are
``gateway.archive.rendering`` (a task renders thumbnails too); its names are
re-exported here for the routes.
"""

from __future__ import annotations

import math

from dicomweb.errors import HTTPError
from dicomweb.multipart import parse_accept
from gateway.archive.rendering import (
    DEFAULT_QUALITY,
    GIF,
    JPEG,
    MAX_VIEWPORT,
    PNG,
    RENDERED_TYPES,
    THUMBNAIL_SIZE,
    RenderOptions,
    Viewport,
    Window,
    cached_thumbnail,
    render,
    representative,
    thumbnail_options,
)

__all__ = [
    "DEFAULT_QUALITY",
    "GIF",
    "JPEG",
    "MAX_VIEWPORT",
    "PNG",
    "RENDERED_TYPES",
    "THUMBNAIL_SIZE",
    "RenderOptions",
    "Viewport",
    "Window",
    "cached_thumbnail",
    "choose_media_type",
    "parse_quality",
    "parse_viewport",
    "parse_window",
    "render",
    "representative",
    "thumbnail_options",
]

_WINDOW_FUNCTIONS = {"linear": "LINEAR", "linear-exact": "LINEAR_EXACT", "sigmoid": "SIGMOID"}


# -- request parameters ----------------------------------------------------------------
def choose_media_type(accept: str | None) -> str:
    """The rendered media type for an Accept header (JPEG by default), or 406."""
    ranges = parse_accept(accept)
    if not ranges:
        return JPEG
    for r in ranges:
        mtype = r.part_type if r.is_multipart else r.type
        if mtype in RENDERED_TYPES:
            return mtype
        if mtype in ("*/*", "image/*", None):
            return JPEG
    raise HTTPError(
        406,
        "rendered images are available as image/jpeg, image/png or image/gif",
        reason="not-acceptable",
    )


def _numbers(text: str, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError as exc:
        raise HTTPError(400, f"{what} must be comma-separated numbers") from exc
    if not all(math.isfinite(v) for v in values):
        raise HTTPError(400, f"{what} must be finite numbers")
    return values


def parse_window(text: str | None) -> Window | None:
    if text is None or text == "":
        return None
    parts = text.split(",")
    if len(parts) not in (2, 3):
        raise HTTPError(400, "window must be center,width[,function]")
    center, width = _numbers(",".join(parts[:2]), "window")
    function = "LINEAR"
    if len(parts) == 3:
        name = parts[2].strip().lower().replace("_", "-")
        if name not in _WINDOW_FUNCTIONS:
            raise HTTPError(400, "window function must be linear, linear-exact or sigmoid")
        function = _WINDOW_FUNCTIONS[name]
    if width <= 0 or (function == "LINEAR" and width < 1):
        raise HTTPError(400, "window width must be positive (at least 1 for linear)")
    return Window(center, width, function)


def parse_viewport(text: str | None) -> Viewport | None:
    if text is None or text == "":
        return None
    values = _numbers(text, "viewport")
    if len(values) not in (2, 6):
        raise HTTPError(400, "viewport must be vw,vh or vw,vh,sx,sy,sw,sh")
    vw, vh = values[0], values[1]
    if vw != int(vw) or vh != int(vh) or not (1 <= vw <= MAX_VIEWPORT and 1 <= vh <= MAX_VIEWPORT):
        raise HTTPError(400, f"viewport width and height must be whole numbers 1-{MAX_VIEWPORT}")
    region = None
    if len(values) == 6:
        sx, sy, sw, sh = values[2:]
        if sx < 0 or sy < 0 or sw <= 0 or sh <= 0:
            raise HTTPError(400, "viewport source region must be inside the image, sized > 0")
        region = (sx, sy, sw, sh)
    return Viewport(int(vw), int(vh), region)


def parse_quality(text: str | None) -> int:
    if text is None or text == "":
        return DEFAULT_QUALITY
    try:
        quality = int(text)
    except ValueError as exc:
        raise HTTPError(400, "quality must be a whole number 1-100") from exc
    if not 1 <= quality <= 100:
        raise HTTPError(400, "quality must be a whole number 1-100")
    return quality
