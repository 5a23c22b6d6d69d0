"""docker-compose.yml and the Dockerfile, checked for structure (no Docker engine on CI machines)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.main import get_command

from defect_assist.core.settings import Settings
from defect_assist_tools.cli import app

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
OURS = ("backend", "worker", "fiftyone")
# variables read by programs other than ours (Label Studio, FiftyOne, Python)
FOREIGN_ENV = re.compile(
    r"^(LABEL_STUDIO_(USERNAME|PASSWORD|USER_TOKEN|ENABLE_LEGACY_API_TOKEN)|FIFTYONE_\w+|PYTHON\w+)$"
)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_has_every_part_of_the_deployment(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"label-studio", "backend", "worker", "redis", "qdrant", "fiftyone"}
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        image = service.get("image", "")
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image tag ({image!r})"
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if not source.startswith(("$", ".", "/")):
                assert source in compose["volumes"], f"{name}: undeclared volume {source}"


def test_host_ports_are_unique(compose: dict[str, Any]) -> None:
    ports = [p.split(":")[0] for s in compose["services"].values() for p in s.get("ports", [])]
    assert len(ports) == len(set(ports)), ports
    assert {"8080", "9090", "5151", "6333"} <= set(ports)


def test_our_services_run_real_cli_commands_with_known_settings(compose: dict[str, Any]) -> None:
    commands = set(get_command(app).commands)
    known = {name.upper() for name in Settings.model_fields}
    for name in OURS:
        service = compose["services"][name]
        assert service["build"]["dockerfile"] == "docker/Dockerfile"
        program, *args = service["command"]
        if program == "defect-assist":
            assert args[0] in commands, f"{name}: no CLI command {args[0]!r}"
        else:
            assert program == "fiftyone" and args[:2] == ["app", "launch"]
        for variable in service["environment"]:
            assert variable in known or FOREIGN_ENV.match(variable), f"{name}: {variable} is read by nobody"
    backend, worker = compose["services"]["backend"], compose["services"]["worker"]
    # the worker publishes model versions where the backend reads them
    assert backend["environment"]["MODEL_DIR"] == worker["environment"]["MODEL_DIR"]
    assert set(backend["volumes"]) & set(worker["volumes"])
    assert backend["environment"]["REDIS_URL"] == worker["environment"]["REDIS_URL"]
    assert backend["environment"]["LABEL_STUDIO_URL"].endswith("label-studio:8080}")
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]


def test_label_studio_can_call_the_backend_and_serve_local_files(compose: dict[str, Any]) -> None:
    environment = compose["services"]["label-studio"]["environment"]
    assert environment["ML_BLOCK_LOCAL_IP"] == "false"
    assert environment["LOCAL_FILES_SERVING_ENABLED"] == "true"
    assert (
        environment["LOCAL_FILES_DOCUMENT_ROOT"]
        == compose["services"]["backend"]["environment"]["LOCAL_FILES_DOCUMENT_ROOT"]
    )
    redis = compose["services"]["redis"]
    assert "--appendonly" in redis["command"]  # queued jobs survive a restart


def test_dockerfile_installs_the_project_with_the_service_extras() -> None:
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11", dockerfile, re.M)
    for source in re.findall(r"^COPY (\S+(?: \S+)*) \S+$", dockerfile, re.M):
        for path in source.split():
            assert (ROOT / path).exists(), f"COPY source {path} missing"
    copied = {path for source in re.findall(r"^COPY (.+) \S+$", dockerfile, re.M) for path in source.split()}
    package_folders = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert set(package_folders["find"]["where"]) <= copied, "every package folder must be in the image"
    extras = re.search(r"^ARG EXTRAS=(\S+)$", dockerfile, re.M).group(1).split(",")
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(extras) <= set(declared)
    assert 'pip install ".[${EXTRAS}]"' in dockerfile
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".ls-venv", "var"} <= set(ignored)


def test_env_example_documents_the_settings() -> None:
    documented = set(re.findall(r"^([A-Z_]+)=", (ROOT / ".env.example").read_text(), re.M))
    needed = {"LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "MODEL_DIR", "BASIC_AUTH_USER", "BASIC_AUTH_PASS"}
    assert needed <= documented
    known = {name.upper() for name in Settings.model_fields}
    assert documented - known <= {"LABEL_STUDIO_USERNAME", "LABEL_STUDIO_PASSWORD", "IMAGES_DIR"}
