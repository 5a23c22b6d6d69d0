"""Image input as real users have it: JPEG/PNG/TIFF/BMP, grayscale, RGB, RGBA, 16-bit, any size.

Everything is decoded into an ``H x W x 3`` ``uint8`` RGB array, the single format the models see.
A file that cannot be decoded raises :class:`ImageLoadError` naming the file, so batch callers can
report it and carry on with the other images.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})

ImageSource = str | Path | bytes | np.ndarray


class ImageLoadError(ValueError):
    """An image could not be read; the message names the file."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"cannot read image {source}: {reason}")
        self.source = source
        self.reason = reason


def describe_source(source: ImageSource) -> str:
    """A short human name for an image source (path, or a placeholder for in-memory data)."""
    if isinstance(source, str | Path):
        return str(source)
    if isinstance(source, bytes):
        return f"<{len(source)} bytes>"
    return f"<array {tuple(source.shape)}>"


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Scale any integer or float range down to uint8 (16-bit PNG/TIFF, float TIFF)."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer):
        info = np.iinfo(array.dtype)
        maximum = info.max if array.max(initial=0) > 255 else 255
        return np.clip(array.astype(np.float64) * (255.0 / maximum), 0, 255).round().astype(np.uint8)
    finite = np.nan_to_num(array.astype(np.float64))
    if finite.max(initial=0.0) <= 1.0:
        finite = finite * 255.0
    return np.clip(finite, 0, 255).round().astype(np.uint8)


def array_to_rgb(array: np.ndarray) -> np.ndarray:
    """Convert a ``HxW``, ``HxWx1``, ``HxWx3`` or ``HxWx4`` array of any dtype to uint8 RGB."""
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"unsupported image array shape {array.shape}")
    array = _to_uint8(array)
    channels = array.shape[2]
    if channels in (1, 2):  # gray or gray+alpha
        array = np.repeat(array[:, :, :1], 3, axis=2)
    elif channels == 4:  # RGBA: composite on black so transparent areas stay neutral
        alpha = array[:, :, 3:4].astype(np.float32) / 255.0
        array = (array[:, :, :3].astype(np.float32) * alpha).round().astype(np.uint8)
    return np.ascontiguousarray(array)


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    image = ImageOps.exif_transpose(image) or image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return array_to_rgb(np.asarray(image))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        return array_to_rgb(np.asarray(image.convert("RGBA")))
    return np.asarray(image.convert("RGB")).copy()


class ImageTooLargeError(ImageLoadError):
    """An image has more pixels than allowed (found from its header, before decoding)."""


def _check_pixels(name: str, size: tuple[int, int], max_pixels: int | None) -> None:
    width, height = size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(
            name, f"{width}x{height} = {width * height} pixels, more than the limit of {max_pixels}"
        )


def image_size(data: bytes, max_pixels: int | None = None) -> tuple[int, int]:
    """``(width, height)`` from an encoded image's header without decoding it; raises ImageLoadError.

    With ``max_pixels``, an image above it raises :class:`ImageTooLargeError`.
    """
    name = describe_source(data)
    try:
        with Image.open(io.BytesIO(data)) as image:
            size = image.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ImageLoadError(name, f"not a decodable image ({error})") from error
    _check_pixels(name, size, max_pixels)
    return size


def load_image(source: ImageSource, max_pixels: int | None = None) -> np.ndarray:
    """Decode a path, encoded bytes or an array into an ``H x W x 3`` uint8 RGB array.

    ``max_pixels`` refuses (:class:`ImageTooLargeError`) an image whose header announces more pixels,
    before any decoding; PIL's own decompression-bomb refusal is an :class:`ImageLoadError` too.
    """
    name = describe_source(source)
    if isinstance(source, np.ndarray):
        if source.ndim >= 2:
            _check_pixels(name, (source.shape[1], source.shape[0]), max_pixels)
        try:
            return array_to_rgb(source)
        except ValueError as error:
            raise ImageLoadError(name, str(error)) from error
    try:
        stream = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")  # noqa: SIM115
    except OSError as error:
        raise ImageLoadError(name, error.strerror or str(error)) from error
    try:
        with stream, Image.open(stream) as image:
            _check_pixels(name, image.size, max_pixels)
            image.load()
            rgb = _pil_to_rgb(image)
    except ImageLoadError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ImageLoadError(name, f"not a decodable image ({error})") from error
    if rgb.shape[0] < 2 or rgb.shape[1] < 2:
        raise ImageLoadError(name, f"image is too small ({rgb.shape[1]}x{rgb.shape[0]})")
    return rgb


def iter_image_files(root: str | Path) -> Iterator[Path]:
    """Image files under ``root`` (recursively), sorted, skipping hidden files."""
    root = Path(root)
    if root.is_file():
        yield root
        return
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith("."):
            yield path


def collect_images(sources: Iterable[str | Path]) -> list[Path]:
    """Expand a mix of files and folders into a sorted, de-duplicated list of image files."""
    seen: dict[Path, None] = {}
    for source in sources:
        for path in iter_image_files(source):
            seen.setdefault(path, None)
    return list(seen)
