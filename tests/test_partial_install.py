"""An install with only some extras: the CLI starts and serves what those extras provide.

The environment is built as pip would install ``defect-assist[EXTRAS]``: the requirement closure of
the project's metadata is resolved with ``packaging`` and exactly those distributions (the same
files the project venv holds, linked, not copied: torch alone is gigabytes) go into a fresh venv,
with the project's source folders on its path as an editable install puts them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
SITE = Path(sysconfig.get_paths()["purelib"])


def requirement_closure(extras: set[str]) -> set[str]:
    """Canonical names of every distribution ``defect-assist[extras]`` needs (the project excluded)."""
    found: set[str] = set()
    pending = [(req, extras) for req in metadata.requires("defect-assist") or []]
    pending = [(Requirement(text), wanted) for text, wanted in pending]
    while pending:
        requirement, wanted = pending.pop()
        if requirement.marker is not None and not any(
            requirement.marker.evaluate(default_environment() | {"extra": extra}) for extra in wanted | {""}
        ):
            continue
        name = canonicalize_name(requirement.name)
        if name == "defect-assist":  # an extra naming other extras: defect-assist[server]
            pending += [(Requirement(t), set(requirement.extras)) for t in metadata.requires(name) or []]
            continue
        if name in found:
            continue
        found.add(name)
        pending += [(Requirement(t), set(requirement.extras)) for t in metadata.requires(name) or []]
    return found


def install_with_extras(extras: set[str], target: Path) -> Path:
    """A venv at ``target`` holding defect-assist with ``extras``; returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(target)], check=True)
    python = target / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    linked: set[str] = set()
    for name in requirement_closure(extras):
        distribution = metadata.distribution(name)
        for file in distribution.files or []:
            top = Path(file).parts[0]
            if top in linked or top.startswith("..") or top == "__pycache__":
                continue
            if (SITE / top).exists():
                (site / top).symlink_to(SITE / top)
                linked.add(top)
    (site / "defect_assist_source.pth").write_text(
        "\n".join(str(ROOT / folder) for folder in ("backend", "worker", "tools")) + "\n"
    )
    return python


def run(python: Path, code: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [str(python), "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT
    )


def test_requirement_closure_follows_the_extras() -> None:
    base = requirement_closure(set())
    server = requirement_closure({"server", "worker"})
    assert {"torch", "anomalib", "typer"} <= base and "fastapi" not in base
    assert {"fastapi", "rq", "redis", "label-studio-sdk"} <= server
    assert not {"qdrant-client", "fiftyone"} & server


@pytest.mark.parametrize("extras", [set(), {"server", "worker"}], ids=["base", "server+worker"])
def test_cli_starts_with_only_some_extras(extras: set[str], tmp_path: Path) -> None:
    python = install_with_extras(extras, tmp_path / "venv")
    missing = run(
        python,
        "import importlib.util as u; print([m for m in ('qdrant_client', 'fiftyone', "
        "'fastapi', 'rq') if u.find_spec(m) is None])",
    )
    assert missing.returncode == 0, missing.stderr
    expected_missing = ["qdrant_client", "fiftyone"] + ([] if extras else ["fastapi", "rq"])
    assert missing.stdout.strip() == str(expected_missing)

    help_text = run(
        python, "from defect_assist_tools.cli import main; import sys; sys.argv[1:] = ['--help']; main()"
    )
    assert help_text.returncode == 0, help_text.stderr[-3000:]
    for command in ("train", "evaluate", "serve", "worker", "index"):
        assert command in help_text.stdout

    if not extras:
        return
    routes = run(
        python,
        "from fastapi.testclient import TestClient\n"
        "from defect_assist.core.settings import Settings\n"
        "from defect_assist_tools.serve import backend_app\n"
        f"app = backend_app(Settings(model_dir={str(tmp_path / 'models')!r}))\n"
        "paths = sorted(app.openapi()['paths'])\n"
        "with TestClient(app) as client:\n"
        "    assert client.get('/health').json()['status'] == 'UP'\n"
        "print(paths)\n",
    )
    assert routes.returncode == 0, routes.stderr[-3000:]
    assert "'/retrain'" in routes.stdout and "'/jobs'" in routes.stdout and "'/predict'" in routes.stdout
    assert "/similar" not in routes.stdout  # the explore extra (qdrant-client) is not installed
