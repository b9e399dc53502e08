"""Pages rendered to PNG with pymupdf at `pages.render.dpi`, scaled down to at most `render.max_pixels`, and cached in
the work directory by (sha256 of the PDF, page, dpi, pixel cap): a rerun renders nothing it rendered before."""

from __future__ import annotations

import math
from pathlib import Path

import pymupdf

from doctune.cache import Cache

CACHE_KIND = "pages"


def zoom_for(rect: pymupdf.Rect, dpi: int, max_pixels: int) -> float:
    """The scale from PDF points to pixels: the dpi's, or less so that width x height stays within max_pixels."""
    zoom = dpi / 72
    pixels = rect.width * zoom * rect.height * zoom
    if pixels > max_pixels:
        zoom *= math.sqrt(max_pixels / pixels)
    return zoom


def render_png(page: pymupdf.Page, dpi: int, max_pixels: int) -> bytes:
    """The page as an RGB PNG (no alpha), width x height <= max_pixels."""
    zoom = zoom_for(page.rect, dpi, max_pixels)
    while True:
        pixmap = page.get_pixmap(matrix=pymupdf.Matrix(zoom, zoom), alpha=False, colorspace=pymupdf.csRGB)
        if pixmap.width * pixmap.height <= max_pixels or zoom < 1e-3:
            return pixmap.tobytes("png")
        zoom *= 0.995  # rounding up to whole pixels went over the cap


def cached_png(cache: Cache, pdf_sha256: str, page: pymupdf.Page, dpi: int, max_pixels: int) -> tuple[Path, bool]:
    """The rendered page's PNG file in the cache, and whether it was rendered now (absent from the cache)."""
    rendered = []

    def write(scratch: Path) -> None:
        scratch.write_bytes(render_png(page, dpi, max_pixels))
        rendered.append(True)

    name = f"{pdf_sha256}-p{page.number + 1}-{dpi}dpi-{max_pixels}px.png"
    return cache.file(CACHE_KIND, name, write), bool(rendered)
