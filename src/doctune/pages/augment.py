"""Hard negatives: a training page made harder to read, with the page's own labels (PIL and numpy only).

- rotate: tilted 1-4 degrees either way on white, or (one time in six) upside down;
- scan_noise: grey, gaussian noise, a slight blur, as a scanner would;
- downscale: shrunk to about 60 % and enlarged back, so the text blurs;
- stamp: a semi-transparent red box with a word such as RECEIVED, in the corner with the least ink.
"""

from __future__ import annotations

import hashlib
import io
import random

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

STAMP_WORDS = ("RECEIVED", "COPY", "APPROVED", "PAID", "SCANNED")


def rng_for(seed: int, key: str) -> random.Random:
    """A generator of its own for one copy: the same seed and page give the same image."""
    return random.Random(int.from_bytes(hashlib.sha256(f"{seed}\0{key}".encode()).digest()[:8], "big"))


def rotate(image: Image.Image, rng: random.Random) -> Image.Image:
    if rng.random() < 1 / 6:
        return image.transpose(Image.Transpose.ROTATE_180)
    angle = rng.uniform(1, 4) * rng.choice((-1, 1))
    return image.rotate(angle, resample=Image.Resampling.BICUBIC, expand=False, fillcolor=(255, 255, 255))


def scan_noise(image: Image.Image, rng: random.Random) -> Image.Image:
    grey = np.asarray(image.convert("L"), dtype=np.float32)
    noise = np.random.default_rng(rng.getrandbits(64)).normal(0, rng.uniform(6, 14), grey.shape)
    noisy = Image.fromarray(np.clip(grey + noise, 0, 255).astype(np.uint8), mode="L")
    return noisy.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 0.9))).convert("RGB")


def downscale(image: Image.Image, rng: random.Random) -> Image.Image:
    factor = rng.uniform(0.5, 0.7)
    small = image.resize((max(1, round(image.width * factor)), max(1, round(image.height * factor))), Image.Resampling.BILINEAR)
    return small.resize(image.size, Image.Resampling.BILINEAR)


def _ink(image: Image.Image, box: tuple[int, int, int, int]) -> float:
    region = np.asarray(image.crop(box).convert("L"), dtype=np.float32)
    return float((region < 160).mean()) if region.size else 0.0


def stamp(image: Image.Image, rng: random.Random) -> Image.Image:
    width, height = image.size
    word = rng.choice(STAMP_WORDS)
    font = ImageFont.load_default(size=max(10, round(width * 0.045)))
    left, top, right, bottom = font.getbbox(word)
    pad = max(4, round(width * 0.012))
    box_w, box_h = right - left + 2 * pad, bottom - top + 2 * pad
    margin = round(width * 0.04)
    corners = [
        (width - margin - box_w, margin),  # top right
        (width - margin - box_w, height - margin - box_h),  # bottom right
        (margin, height - margin - box_h),  # bottom left
        (margin, margin),  # top left
    ]
    x, y = min(corners, key=lambda c: _ink(image, (c[0], c[1], c[0] + box_w, c[1] + box_h)))
    overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    red = (200, 20, 20)
    draw.rectangle((x, y, x + box_w, y + box_h), fill=(*red, 40), outline=(*red, 170), width=max(2, pad // 2))
    draw.text((x + pad - left, y + pad - top), word, font=font, fill=(*red, 170))
    return Image.alpha_composite(image.convert("RGBA"), overlay).convert("RGB")


AUGMENTERS = {"rotate": rotate, "scan_noise": scan_noise, "downscale": downscale, "stamp": stamp}


def augment_png(png: bytes, kind: str, rng: random.Random) -> bytes:
    """The augmented page as PNG bytes, the same size as the page."""
    with Image.open(io.BytesIO(png)) as opened:
        image = opened.convert("RGB")
    out = io.BytesIO()
    AUGMENTERS[kind](image, rng).save(out, format="PNG")
    return out.getvalue()


def choose(train_ids: list[str], fraction: float, kinds: list[str], seed: int) -> list[tuple[str, str]]:
    """(record id, augmentation) for round(fraction x training pages) pages, drawn with the seed."""
    if not kinds or fraction <= 0 or not train_ids:
        return []
    rng = random.Random(seed)
    chosen = rng.sample(sorted(train_ids), round(fraction * len(train_ids)))
    return [(record_id, rng.choice(list(kinds))) for record_id in sorted(chosen)]
