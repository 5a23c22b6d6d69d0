"""The recommended labeling config in a real Label Studio 1.23, in headless Chromium at 1440×900.

Issue 14: the verdict and the mask show without scrolling, and the brush and polygon labels have
distinct names. A project with the recommended config gets four magnetic-tile images: the one of the
test set with the tallest aspect (the height bounds it), the one with the widest (the width bounds
it), and the most landscape of the moderately landscape (1 < width/height < 2) *break* and *crack*
images. On the Data Manager's labeling panel (``?task=``: task list left, side panels right; the
narrower of Label Studio's two labeling layouts) the verdict choices, both label pickers and the
whole image must lie inside the viewport and above the bottom bar, the image at no less than 90% of
its pixel size, and the drawn ``<img>`` must not reach past the elements that clip it
(``.lsf-image`` and the image container, ``overflow: hidden``): Label Studio fits an upscaled image
to the container's width at load, the tool bar then appears beside it and narrows the container,
and the fit zoom is kept, so without a ``maxWidth`` that leaves room for the bar landscape tiles
were drawn ~7% too large and cropped. An annotator then picks *anomalous*, paints a stroke with
*defect mask* and submits; the annotation reads back as an anomalous image with a mask. Each image's
page is saved to ``artifacts/labeling-<kind>.png``, the annotated one to
``artifacts/labeling-1440x900.png``, the measured boxes to ``artifacts/labeling-1440x900.json``.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
from browser import headless_browser, log_in_to_label_studio
from label_studio_server import LabelStudioServer
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


def _layout_images(test: Path) -> dict[str, Path]:
    """The tallest (width/height smallest) and the widest image of magnetic_tile/test, and per class
    *break* and *crack* the most landscape one of aspect below 2 (the width bounds it, upscaled)."""
    paths = sorted(test.glob("*/*.jpg"))
    if not paths:
        pytest.fail(f"magnetic_tile test images missing under {test} (set DATASETS_DIR)")
    aspects = {path: _aspect(path) for path in paths}
    images = {"tall": min(paths, key=aspects.get), "wide": max(paths, key=aspects.get)}
    for kind in ("break", "crack"):
        landscape = [path for path in paths if path.parent.name == kind and 1 < aspects[path] < 2]
        assert landscape, f"no moderately landscape {kind} image under {test}"
        images[f"landscape-{kind}"] = max(landscape, key=aspects.get)
    return images


def _settled_box(locator: Any, timeout: float = 30.0, reads: int = 4) -> dict[str, float]:
    """The locator's bounding box once ``reads`` reads 0.5 s apart agree (the image resizes on load,
    and again when the tool bar appears beside it)."""
    deadline = time.monotonic() + timeout
    history: list[Any] = []
    while time.monotonic() < deadline:
        box = locator.bounding_box()
        history = [*history[1 - reads :], box]
        if box and box["width"] > 0 and len(history) == reads and all(b == box for b in history):
            return box
        time.sleep(0.5)
    raise AssertionError(f"bounding box did not settle: {history}")


# The visible part of the drawn <img>'s surroundings: the intersection of the boxes of all its
# ancestors that clip (overflow not visible), the nearest being .lsf-image and the image container.
CLIP_BOX = """img => {
    let [left, top, right, bottom] = [-Infinity, -Infinity, Infinity, Infinity];
    for (let e = img.parentElement; e; e = e.parentElement) {
        const style = getComputedStyle(e);
        if ([style.overflow, style.overflowX, style.overflowY].every(v => v === "visible")) continue;
        const b = e.getBoundingClientRect();
        [left, top] = [Math.max(left, b.left), Math.max(top, b.top)];
        [right, bottom] = [Math.min(right, b.right), Math.min(bottom, b.bottom)];
    }
    return right > left ? {x: left, y: top, width: right - left, height: bottom - top} : null;
}"""


def _assert_inside(name: str, box: dict[str, float], bottom: float) -> None:
    """``box`` lies fully inside the viewport and ends above ``bottom`` (the bottom bar's top)."""
    assert box["x"] >= 0 and box["y"] >= 0, f"{name} starts outside the viewport: {box}"
    assert box["x"] + box["width"] <= WIDTH, f"{name} runs past the right edge: {box}"
    assert box["y"] + box["height"] <= bottom, f"{name} runs below the fold ({bottom}): {box}"


def _check_layout(page: Any, image: Path) -> dict[str, dict[str, float]]:
    """The boxes of the verdict, the label pickers, the image and its canvas, each checked to be in view."""
    page.wait_for_selector(".lsf-image img", timeout=90_000)
    drawn = page.locator(".lsf-image img").first
    picture = _settled_box(drawn)  # the image as drawn (its <img>, zoomed and panned by LS)
    clip = drawn.evaluate(CLIP_BOX)  # where it can be seen
    bar = page.locator(".lsf-bottombar").first.bounding_box()
    bottom = min(HEIGHT, bar["y"]) if bar else HEIGHT
    boxes = {
        "verdict": page.locator(".lsf-choices").first.bounding_box(),
        "normal": page.locator(".lsf-choice", has_text="normal").first.bounding_box(),
        "anomalous": page.locator(".lsf-choice", has_text="anomalous").first.bounding_box(),
        "defect mask": page.locator(".lsf-label", has_text="defect mask").first.bounding_box(),
        "defect outline": page.locator(".lsf-label", has_text="defect outline").first.bounding_box(),
        "image": picture,
        "clip": clip,  # the clipping ancestors' intersection
        "stage": page.locator(".konvajs-content").first.bounding_box(),  # the canvas drawn on
    }
    for name, box in boxes.items():
        assert box is not None, f"{name} is not rendered"
        _assert_inside(name, box, bottom)
    # the whole image is drawn inside its clipping container: none of it is cut off
    assert (
        picture["x"] >= clip["x"] - 0.5
        and picture["y"] >= clip["y"] - 0.5
        and picture["x"] + picture["width"] <= clip["x"] + clip["width"] + 0.5
        and picture["y"] + picture["height"] <= clip["y"] + clip["height"] + 0.5
    ), f"{image.parent.name}/{image.name} drawn at {picture}, cropped by its container {clip}"
    # nor covered by a tool's controls (the brush-size slider left of the tool bar)
    for control in page.locator(".lsf-tool__controls").all():
        box = control.bounding_box() if control.is_visible() else None
        assert not box or not (
            box["x"] < picture["x"] + picture["width"] - 0.5
            and picture["x"] < box["x"] + box["width"] - 0.5
            and box["y"] < picture["y"] + picture["height"] - 0.5
            and picture["y"] < box["y"] + box["height"] - 0.5
        ), f"a tool's controls {box} cover the image {picture}"
    with Image.open(image) as pixels:
        scale = min(picture["width"] / pixels.width, picture["height"] / pixels.height)
    assert scale >= MIN_SCALE, f"{image.name} ({pixels.size}) shown at {scale:.2f}× in {picture}"
    scrolls = page.evaluate("[document.documentElement.scrollHeight, window.innerHeight]")
    assert scrolls[0] <= scrolls[1], f"the page scrolls: {scrolls}"
    return boxes


def test_verdict_and_image_fit_1440x900_without_scrolling(label_studio: LabelStudioServer) -> None:
    test = DATASETS / "magnetic_tile" / "test"
    images = _layout_images(test)
    project = label_studio.create_project(
        f"defect-assist layout {time.time():.0f}", LABELING_CONFIG.read_text()
    )
    regex = "^(" + "|".join(re.escape(path.name) for path in images.values()) + ")$"
    label_studio.import_local_files(project, test, regex)
    tasks = {
        kind: next(
            t
            for t in label_studio.tasks(project)
            if str(t["data"]["image"]).endswith(f"{path.parent.name}/{path.name}")
        )
        for kind, path in images.items()
    }
    SCREENSHOT.parent.mkdir(exist_ok=True)
    with headless_browser() as browser:
        page = browser.new_page(viewport={"width": WIDTH, "height": HEIGHT})
        log_in_to_label_studio(page, label_studio.url)
        measured = {}
        # the wide one (a fray defect) last: annotated and saved
        for kind in ("tall", "landscape-break", "landscape-crack", "wide"):
            page.goto(f"{label_studio.url}/projects/{project}/data?task={tasks[kind]['id']}")
            boxes = _check_layout(page, images[kind])
            page.screenshot(path=str(SCREENSHOT.with_name(f"labeling-{kind}.png")))
            measured[f"{images[kind].parent.name}/{images[kind].name}"] = {
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
