"""Worker-only settings (environment variables), kept apart until merged into ``defect_assist.settings``."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class WorkerSettings(BaseSettings):
    """Retraining knobs; each field maps to the upper-case environment variable of its name."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

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


@lru_cache(maxsize=1)
def get_worker_settings() -> WorkerSettings:
    return WorkerSettings()
