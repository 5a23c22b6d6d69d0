"""Label Studio in the embedded stack: installed on the first run, the demo project, our backend connected.

The demo project holds sample test images (half normal, half defective) as local files and a Data
Manager tab sorted by anomaly score; once the backend is connected, the backend itself has Label Studio
predict every task with the current version (:mod:`defect_assist.serving.label_studio_sync`) and
:func:`connect_backend` waits for that.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from defect_assist_tools.stack import Stack

DEMO_TITLE = "defect-assist demo"


def spread(items: list[Path], count: int) -> list[Path]:
    if count <= 0 or not items:
        return []
    step = max(1, len(items) // count)
    return items[::step][:count]


def start_demo_label_studio(stack: Stack) -> None:
    from defect_assist_tools.local_label_studio import (
        CONFIG,
        start_label_studio,
        template_data_dir,
    )

    options = stack.options
    executable = _install_label_studio(stack)
    home = options.state_dir / "label-studio"
    data_dir = home / "data"
    if not (data_dir / "label_studio.sqlite3").exists():
        stack.say("preparing Label Studio's database (first run only: a minute or two)")
        shutil.rmtree(data_dir, ignore_errors=True)
        shutil.copytree(template_data_dir(executable), data_dir)
    stack.say("starting Label Studio")
    document_root = options.data.resolve().parent
    log = stack.log_dir / "label-studio.log"
    server = start_label_studio(executable, home, data_dir, options.label_studio_port, log, document_root)
    stack.label_studio = server
    client = server.client
    projects = client.get("/api/projects", page_size=1000)
    projects = projects.get("results", projects) if isinstance(projects, dict) else projects
    existing = next((p for p in projects if p.get("title") == DEMO_TITLE), None)
    if existing is None:
        project = server.create_project(DEMO_TITLE, CONFIG.read_text())
        samples = stack.samples
        half = options.tasks // 2
        picked = spread(samples.normals, half) + spread(samples.defects, options.tasks - half)
        regex = "^(" + "|".join(p.name.replace(".", r"\.") for p in picked) + ")$"
        server.import_local_files(project, options.data.resolve() / "test", regex)
        score_sorted_tab(server.client, project)
        stack.say(f"created Label Studio project {project} with {len(server.tasks(project))} tasks")
    else:
        project = int(existing["id"])
    stack.project = str(project)


# Data Manager columns an annotator reviewing scores does not need (the image and the score stay in view)
HIDDEN_COLUMNS = [
    f"tasks:{name}"
    for name in (
        "inner_id",
        "annotators",
        "annotations_results",
        "annotations_ids",
        "predictions_results",
        "predictions_model_versions",
        "file_upload",
        "storage_filename",
        "created_at",
        "updated_at",
        "updated_by",
        "avg_lead_time",
        "draft_exists",
        "total_predictions",
        "cancelled_annotations",
        "meta",
    )
]


def score_sorted_tab(client: Any, project: int) -> int:
    """A Data Manager tab sorted by anomaly score, highest first, image and score in view; its id."""
    data = {
        "title": "By anomaly score",
        "ordering": ["-tasks:predictions_score"],
        "hiddenColumns": {"explore": HIDDEN_COLUMNS, "labeling": HIDDEN_COLUMNS},
    }
    return int(client.post("/api/dm/views", {"project": project, "data": data})["id"])


def connect_backend(stack: Stack, backend_url: str, version: str, timeout: float = 300) -> None:
    """Connect the backend (once); the backend then has Label Studio predict every task with ``version``."""
    server = stack.label_studio
    project = int(stack.project)
    connected = server.client.ml_backends(project)
    if not any(str(ml.get("url", "")).rstrip("/") == backend_url for ml in connected):
        server.connect_backend(project, backend_url, title="defect-assist")
    tasks = set(server.client.task_ids(project))
    deadline = time.monotonic() + timeout
    predicted: set[int] = set()
    while time.monotonic() < deadline:
        stack.check_children()
        predictions = server.client.predictions(project)
        predicted = {int(p["task"]) for p in predictions if p.get("model_version") == version} & tasks
        if predicted == tasks:
            break
        time.sleep(1)
    stack.lines.append(
        f"Label Studio project {project}: {len(predicted)}/{len(tasks)} task(s) "
        f"carry predictions of {version}"
    )


def _install_label_studio(stack: Stack) -> Path:
    """``.ls-venv``'s label-studio; the first run installs it, saying so, with the venv's size as progress."""
    import threading

    from defect_assist_tools.local_label_studio import LS_VENV, LS_VERSION, ensure_label_studio

    if (LS_VENV / "bin" / "label-studio").exists():
        return ensure_label_studio()
    stack.say(f"installing Label Studio {LS_VERSION} into {LS_VENV} (first run only: ~1 GB, a few minutes)")
    found: list[Path] = []
    worker = threading.Thread(target=lambda: found.append(ensure_label_studio()), daemon=True)
    started = time.monotonic()
    worker.start()
    while worker.is_alive():
        worker.join(15)
        if worker.is_alive():
            size = sum(f.stat().st_size for f in LS_VENV.rglob("*") if f.is_file()) / 1e6
            stack.say(f"  installing Label Studio: {time.monotonic() - started:.0f} s, {size:.0f} MB so far")
    if not found:
        raise RuntimeError(f"installing Label Studio failed (pip output above; venv {LS_VENV})")
    stack.say(f"Label Studio installed in {time.monotonic() - started:.0f} s")
    return found[0]
