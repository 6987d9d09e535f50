"""Image loading and resizing for Qwen3-VL, the qwen-vl-utils way, with a controlled size guard.

`load_image` does what `qwen_vl_utils.fetch_image` does for a local file (RGB conversion with a
white background behind transparency, `smart_resize` into the pixel limits, a PIL `resize`), but:

- sizes come from the file header first, so `resized_size` can count visual tokens without
  decoding pixels (what `count_tokens` needs);
- PIL's decompression-bomb guard is raised only while one file is opened, under a lock, up to
  `HARD_CAP_PIXELS`; larger images are rejected (BadInput) instead of being decoded. The global
  `Image.MAX_IMAGE_PIXELS` is never switched off;
- huge images are decoded at reduced size where the format allows it (`Image.draft` for JPEG) and
  shrunk with `reducing_gap`, which keeps the result's size but saves time and memory;
- a missing file or a Git LFS pointer is MissingInput; an unreadable file is BadInput.
"""
from __future__ import annotations

import functools
import math
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

from hitq.engine.base import ImageLimits
from hitq.errors import BadInput, MissingInput

HARD_CAP_PIXELS = 400_000_000  # w*h above which an image is refused (a 20000x20000 scan)
HUGE_PIXELS = 50_000_000  # w*h above which decoding uses draft/reducing_gap shortcuts
DEFAULT_FACTOR = 32  # patch_size 16 * spatial_merge_size 2: resized sides are multiples of this
MAX_RATIO = 200  # qwen-vl-utils refuses longer/shorter side ratios above this

_open_lock = threading.Lock()


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """qwen-vl-utils' `smart_resize`: (height, width) as multiples of `factor` within the limits."""
    try:
        return _qwen_smart_resize()(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    except (ValueError, AssertionError) as e:
        raise BadInput(f"image of {width}x{height} px cannot be resized: {e}") from None


@functools.cache
def _qwen_smart_resize():
    try:
        from qwen_vl_utils import smart_resize as qwen_smart_resize
    except ImportError:  # same arithmetic, for machines without qwen-vl-utils
        return _smart_resize
    return qwen_smart_resize


def _smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(f"absolute aspect ratio must be smaller than {MAX_RATIO}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@contextmanager
def _bomb_guard(cap_pixels: int):
    """Let PIL open images up to `cap_pixels` (and no further) for the duration of the block."""
    with _open_lock, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max(cap_pixels, saved or 0)
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _open(path: str | Path, cap_pixels: int) -> Image.Image:
    """Open lazily (header only) and check the size against the hard cap."""
    p = Path(path)
    if not p.is_file():
        raise MissingInput(f"image file not found: {p}")
    with open(p, "rb") as f:
        if f.read(40).startswith(b"version https://git-lfs"):
            raise MissingInput(f"image file is a Git LFS pointer, not the image (run `git lfs pull`): {p}")
    try:
        with _bomb_guard(cap_pixels):
            img = Image.open(p)
    except Image.DecompressionBombError:
        raise BadInput(f"image too large (over {cap_pixels:,} px): {p}") from None
    except (OSError, ValueError) as e:
        raise BadInput(f"cannot read image {p}: {e}") from None
    w, h = img.size
    if w * h > cap_pixels:
        img.close()
        raise BadInput(f"image too large: {w}x{h} = {w * h:,} px, over the {cap_pixels:,} px cap: {p}")
    return img


def image_size(path: str | Path, cap_pixels: int = HARD_CAP_PIXELS) -> tuple[int, int]:
    """(width, height) from the file header, without decoding pixels."""
    img = _open(path, cap_pixels)
    try:
        return img.size
    finally:
        img.close()


def resized_size(width: int, height: int, limits: ImageLimits, factor: int = DEFAULT_FACTOR) -> tuple[int, int]:
    """(width, height) after `smart_resize` into `limits`."""
    h, w = smart_resize(height, width, factor, limits.min_pixels, limits.max_pixels)
    return w, h


def _to_rgb(img: Image.Image) -> Image.Image:
    """qwen-vl-utils' `to_rgb`: transparency becomes a white background."""
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img.split()[3])
        return background
    return img.convert("RGB")


def load_image(
    path: str | Path,
    limits: ImageLimits,
    factor: int = DEFAULT_FACTOR,
    cap_pixels: int = HARD_CAP_PIXELS,
) -> tuple[Image.Image, int, int]:
    """Load `path` as RGB resized into `limits`: (image, pixels_before, pixels_after)."""
    img = _open(path, cap_pixels)
    try:
        w0, h0 = img.size
        w, h = resized_size(w0, h0, limits, factor)
        huge = w0 * h0 > HUGE_PIXELS
        if huge:
            img.draft("RGB", (w, h))  # JPEG: decode at 1/2, 1/4 or 1/8 scale, still >= (w, h)
        try:
            rgb = _to_rgb(img)
        except (OSError, ValueError, SyntaxError) as e:
            raise BadInput(f"cannot decode image {path}: {e}") from None
        if rgb.size != (w, h):
            rgb = rgb.resize((w, h), reducing_gap=3.0 if huge else None)
    finally:
        img.close()
    return rgb, w0 * h0, w * h
