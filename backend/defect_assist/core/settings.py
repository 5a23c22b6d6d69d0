"""One settings object for the backend, the worker, the CLI and the FiftyOne plugin.

Values come from environment variables (names as in the README table) and an optional ``.env`` file
in the working directory, the way Label Studio ML backends are configured.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parents[3]


class Settings(BaseSettings):
    """Runtime configuration; every field maps to the upper-case environment variable of its name."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    # Model store and model choice
    model_dir: Path = Field(PROJECT_ROOT / "var" / "models", description="Root of the versioned model store.")
    model_kind: str = Field("patchcore", description="Model trained by default: patchcore or efficientad.")
    device: str = Field("auto", description="Torch device: auto (CUDA when present), cpu, cuda, cuda:1 …")
    inference_engine: str = Field(
        "torch", description="Serve with torch, or an export of the model: onnxruntime or openvino."
    )
    cache_dir: Path = Field(
        PROJECT_ROOT / "var" / "cache", description="Downloaded images, distilled teachers, embeddings."
    )

    # Label Studio
    label_studio_url: str = Field("http://127.0.0.1:8080", description="Base URL of Label Studio.")
    label_studio_api_key: str = Field("", description="Label Studio user token (Account & Settings).")
    basic_auth_user: str = Field("", description="Require HTTP basic auth on the backend when set.")
    basic_auth_pass: str = Field("", description="Password for BASIC_AUTH_USER.")
    local_files_document_root: str = Field("", description="LS LOCAL_FILES_DOCUMENT_ROOT, read directly.")
    label_studio_sync: bool = Field(
        True, description="Re-predict a project's tasks in LS when a new version becomes current."
    )
    label_studio_sync_interval: float = Field(
        2.0, description="Seconds between checks of the current versions."
    )
    label_studio_predict_batch: int = Field(16, description="Tasks per re-predict call (LS allows 100 s).")

    # Serving limits and image sources (docs/reliability.md)
    max_image_pixels: int = Field(
        40_000_000, description="Decoded pixels per image (checked before decoding)."
    )
    max_image_bytes: int = Field(50 * 2**20, description="Bytes per fetched or read image.")
    max_request_bytes: int = Field(16 * 2**20, description="Bytes per request body (checked before parsing).")
    max_tasks_per_request: int = Field(1000, description="Tasks per /predict request (more: 413).")
    image_fetch_timeout: float = Field(15.0, description="Total seconds per image fetch (a deadline).")
    image_fetch_threads: int = Field(8, description="Concurrent image fetches per /predict request.")
    predict_timeout: float = Field(
        80.0, description="Seconds per /predict request; later tasks answer empty."
    )
    predict_chunk: int = Field(4, description="Images per forward pass under the prediction lock.")
    image_allowed_hosts: str = Field(
        "", description="Comma-separated hosts, host:port, IPs or CIDRs fetched even when private."
    )
    allow_private_image_hosts: bool = Field(
        False, description="Fetch images from private and loopback addresses (not link-local)."
    )
    image_local_roots: str = Field(
        "", description="Extra folders (os.pathsep-separated) task images may be read from."
    )

    # Queue
    redis_url: str = Field("", description="External Redis; empty = start the project's own redis-server.")
    redis_data_dir: Path = Field(
        PROJECT_ROOT / "var" / "redis", description="Data dir of the embedded Redis."
    )

    # Retraining (worker)
    auto_retrain_after: int = Field(20, description="Auto-retrain after N new normal annotations (0 = off).")
    auto_retrain_debounce: float = Field(10.0, description="Seconds to wait after the N-th annotation.")
    auto_retrain_cooldown: float = Field(120.0, description="Minimum seconds between two auto-retrains.")
    retrain_mode: str = Field("auto", description="auto (incremental when possible), full or incremental.")
    incremental_max_fraction: float = Field(
        0.5, description="Auto mode: full retrain when new/old exceeds this."
    )
    model_options: dict[str, Any] = Field(
        default_factory=dict, description='JSON model options, e.g. {"image_size": 128}.'
    )
    retrain_job_timeout: int = Field(4 * 3600, description="Seconds before a retrain job is killed.")
    retrain_retry_intervals: str = Field(
        "10,30,90",
        description="Seconds before each retry of a retrain that found Label Studio unreachable "
        "(comma-separated; one retry per value, then the job fails).",
    )

    # Similarity search
    qdrant_url: str = Field("", description="Qdrant server URL; empty = embedded storage under QDRANT_PATH.")
    qdrant_path: Path = Field(PROJECT_ROOT / "var" / "qdrant", description="Embedded Qdrant storage.")

    # Data
    datasets_dir: Path = Field(
        PROJECT_ROOT.parent / "shared" / "datasets", description="Where the sample datasets live."
    )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (read once; tests construct ``Settings(...)`` directly)."""
    return Settings()


def resolve_device(device: str = "auto") -> str:
    """Map ``auto`` to ``cuda`` when a GPU is visible, else ``cpu``; pass explicit choices through."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
