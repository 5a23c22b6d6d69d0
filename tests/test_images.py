"""Image inputs users really have: formats, modes, bit depths, sizes, and broken files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defect_assist.core.images import ImageLoadError, collect_images, load_image

pytestmark = pytest.mark.unit


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [
        ("L", "JPEG"),
        ("RGB", "JPEG"),
        ("L", "PNG"),
        ("RGB", "PNG"),
        ("RGBA", "PNG"),
        ("LA", "PNG"),
        ("P", "PNG"),
    ],
)
def test_modes_decode_to_rgb_uint8(mode: str, fmt: str) -> None:
    image = Image.new(mode, (37, 21), color=200 if mode in ("L", "P") else None)
    array = load_image(_encode(image, fmt))
    assert array.shape == (21, 37, 3)
    assert array.dtype == np.uint8


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    ramp = np.linspace(0, 65535, 64 * 32, dtype=np.uint16).reshape(32, 64)
    path = tmp_path / "depth16.png"
    Image.fromarray(ramp).save(path)
    array = load_image(path)
    assert array.shape == (32, 64, 3)
    assert array[0, 0, 0] == 0 and array[-1, -1, 0] == 255
    assert len(np.unique(array[:, :, 0])) > 200  # the full range survives, not a binary clip


def test_rgba_transparency_is_composited_on_black() -> None:
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[:, :4, 3] = 255  # left half opaque white, right half transparent
    array = load_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert array[0, 0].tolist() == [255, 255, 255]
    assert array[0, 7].tolist() == [0, 0, 0]


def test_grayscale_jpeg_from_dataset(train_normals: list[Path]) -> None:
    array = load_image(train_normals[0])
    with Image.open(train_normals[0]) as original:
        assert original.mode == "L"
        assert array.shape == (original.height, original.width, 3)
    assert np.array_equal(array[..., 0], array[..., 2])


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"", "decodable"), (b"not an image at all", "decodable"), (None, "decodable")],
)
def test_corrupt_files_name_the_file(
    tmp_path: Path, content: bytes | None, reason: str, train_normals
) -> None:
    path = tmp_path / "broken.jpg"
    path.write_bytes(content if content is not None else train_normals[0].read_bytes()[:300])
    with pytest.raises(ImageLoadError) as error:
        load_image(path)
    assert str(path) in str(error.value)
    assert reason in str(error.value)


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match=r"nope\.png"):
        load_image(tmp_path / "nope.png")


def test_collect_images_skips_non_images_and_recurses(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    Image.new("L", (4, 4)).save(tmp_path / "b.png")
    Image.new("L", (4, 4)).save(tmp_path / "sub" / "a.JPG")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".hidden.png").write_bytes(b"")
    found = collect_images([tmp_path])
    assert [p.name for p in found] == ["b.png", "a.JPG"]
