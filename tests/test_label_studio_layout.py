"""The recommended labeling config in a real Label Studio 1.23, in headless Chromium at 1440×900.

Issue 14: the verdict and the mask show without scrolling, and the brush and polygon labels have
distinct names. A project with the recommended config gets two magnetic-tile images: the one of the
test set with the tallest aspect (the height bounds it) and the one with the widest (the width
bounds it). On the Data Manager's labeling panel (the narrower of Label Studio's two labeling
layouts) the verdict choices, both label pickers and the whole image must lie inside the viewport
and above the bottom bar, the image at no less than 90% of its pixel size. An annotator then picks
*anomalous*, paints a stroke with *defect mask* and submits; the annotation reads back as an
anomalous image with a mask. The page is saved to ``artifacts/labeling-1440x900.png``, the measured
boxes to ``artifacts/labeling-1440x900.json``.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
from browser import headless_browser
from label_studio_server import PASSWORD, USER, LabelStudioServer
from PIL import Image

from defect_assist.label_studio import LABELING_CONFIG
from defect_assist.label_studio.annotations import labeled_images
from defect_assist_tools.local_label_studio import DATASETS

pytestmark = [pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT = 1440, 900
SCREENSHOT = ROOT / "artifacts" / "labeling-1440x900.png"
BOXES = SCREENSHOT.with_suffix(".json")  # the measured bounding boxes, per image
MIN_SCALE = 0.9  # the image is shown at no less than 90% of its pixel size


def _aspect(path: Path) -> float:
    with Image.open(path) as image:
        return image.width / image.height


def _extreme_images(test: Path) -> dict[str, Path]:
    """The tallest (width/height smallest) and the widest image of magnetic_tile/test."""
    paths = sorted(test.glob("*/*.jpg"))
    if not paths:
        pytest.fail(f"magnetic_tile test images missing under {test} (set DATASETS_DIR)")
    return {"tall": min(paths, key=_aspect), "wide": max(paths, key=_aspect)}


def _log_in(page: Any, url: str) -> None:
    page.goto(f"{url}/user/login/")
    page.fill("input[name=email]", USER)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(lambda current: "/user/login" not in current, timeout=60_000)


def _settled_box(locator: Any, timeout: float = 30.0) -> dict[str, float]:
    """The locator's bounding box once two reads 0.5 s apart agree (the image stage resizes on load)."""
    deadline = time.monotonic() + timeout
    previous = None
    while time.monotonic() < deadline:
        box = locator.bounding_box()
        if box and box["width"] > 0 and box == previous:
            return box
        previous = box
        time.sleep(0.5)
    raise AssertionError(f"bounding box did not settle: {previous}")


def _assert_inside(name: str, box: dict[str, float], bottom: float) -> None:
    """``box`` lies fully inside the viewport and ends above ``bottom`` (the bottom bar's top)."""
    assert box["x"] >= 0 and box["y"] >= 0, f"{name} starts outside the viewport: {box}"
    assert box["x"] + box["width"] <= WIDTH, f"{name} runs past the right edge: {box}"
    assert box["y"] + box["height"] <= bottom, f"{name} runs below the fold ({bottom}): {box}"


def _check_layout(page: Any, image: Path) -> dict[str, dict[str, float]]:
    """The boxes of the verdict, the label pickers, the image and its canvas, each checked to be in view."""
    page.wait_for_selector(".lsf-image img", timeout=90_000)
    picture = _settled_box(page.locator(".lsf-image").first)  # the image as shown
    bar = page.locator(".lsf-bottombar").first.bounding_box()
    bottom = min(HEIGHT, bar["y"]) if bar else HEIGHT
    boxes = {
        "verdict": page.locator(".lsf-choices").first.bounding_box(),
        "normal": page.locator(".lsf-choice", has_text="normal").first.bounding_box(),
        "anomalous": page.locator(".lsf-choice", has_text="anomalous").first.bounding_box(),
        "defect mask": page.locator(".lsf-label", has_text="defect mask").first.bounding_box(),
        "defect outline": page.locator(".lsf-label", has_text="defect outline").first.bounding_box(),
        "image": picture,
        "stage": page.locator(".konvajs-content").first.bounding_box(),  # the canvas drawn on
    }
    for name, box in boxes.items():
        assert box is not None, f"{name} is not rendered"
        _assert_inside(name, box, bottom)
    with Image.open(image) as pixels:
        scale = min(picture["width"] / pixels.width, picture["height"] / pixels.height)
    assert scale >= MIN_SCALE, f"{image.name} ({pixels.size}) shown at {scale:.2f}× in {picture}"
    scrolls = page.evaluate("[document.documentElement.scrollHeight, window.innerHeight]")
    assert scrolls[0] <= scrolls[1], f"the page scrolls: {scrolls}"
    return boxes


def test_verdict_and_image_fit_1440x900_without_scrolling(label_studio: LabelStudioServer) -> None:
    test = DATASETS / "magnetic_tile" / "test"
    images = _extreme_images(test)
    project = label_studio.create_project(
        f"defect-assist layout {time.time():.0f}", LABELING_CONFIG.read_text()
    )
    regex = "^(" + "|".join(re.escape(path.name) for path in images.values()) + ")$"
    label_studio.import_local_files(project, test, regex)
    tasks = {
        kind: next(t for t in label_studio.tasks(project) if str(t["data"]["image"]).endswith(path.name))
        for kind, path in images.items()
    }
    SCREENSHOT.parent.mkdir(exist_ok=True)
    with headless_browser() as browser:
        page = browser.new_page(viewport={"width": WIDTH, "height": HEIGHT})
        _log_in(page, label_studio.url)
        measured = {}
        for kind in ("tall", "wide"):  # the wide one (a fray defect) last: annotated and saved
            page.goto(f"{label_studio.url}/projects/{project}/data?task={tasks[kind]['id']}")
            boxes = _check_layout(page, images[kind])
            measured[images[kind].name] = {
                name: {k: round(v, 1) for k, v in b.items()} for name, b in boxes.items()
            }
        BOXES.write_text(json.dumps(measured, indent=1))
        page.locator(".lsf-choice", has_text="anomalous").first.click()
        page.locator(".lsf-label", has_text="defect mask").first.click()
        picture = boxes["image"]
        x, y = picture["x"] + 0.4 * picture["width"], picture["y"] + 0.4 * picture["height"]
        page.mouse.move(x, y)
        page.mouse.down()
        for step in range(1, 11):
            page.mouse.move(x + 8 * step, y + 4 * step)
        page.mouse.up()
        # the new region, listed by its label in the Regions panel
        page.locator("[class*=outliner]", has_text="defect mask").first.wait_for(timeout=10_000)
        page.screenshot(path=str(SCREENSHOT))
        page.get_by_role("button", name="Submit").click()
        deadline = time.monotonic() + 30
        while not (labeled := labeled_images(label_studio.client.export_tasks(project))):
            assert time.monotonic() < deadline, "the submitted annotation never reached the export"
            time.sleep(1)
    assert SCREENSHOT.stat().st_size > 20_000
    [annotated] = labeled
    assert annotated.task_id == tasks["wide"]["id"] and annotated.verdict == "anomalous"
    assert annotated.mask is not None and annotated.mask.any() and annotated.regions == 1
