"""Worker commands: ``defect-assist worker``, ``retrain``, ``jobs`` and ``redis``."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Column, Table
from rich.text import Text

if TYPE_CHECKING:
    import redis

console = Console(stderr=True)
out = Console()


def _connection() -> redis.Redis:
    """The queue's Redis, or a clear exit when neither REDIS_URL nor the embedded server answers."""
    from defect_assist_worker.queues import get_connection
    from defect_assist_worker.redis_server import RedisServerError

    try:
        return get_connection()
    except RedisServerError as error:
        console.print(f"[red]{error}[/red]: start `defect-assist worker` (it starts Redis) or set REDIS_URL")
        raise typer.Exit(1) from None


def _cell(value: object) -> str:
    return "" if value is None else str(value)


def _lines(*values: str) -> Text:
    return Text("\n".join(value for value in values if value))


def job_tables(found: list[dict[str, Any]]) -> tuple[Table, Table]:
    """The ``jobs`` listing in two layouts: one column per fact, and a narrow one (job id over version,
    status over stage, %, ETA and mode) for terminals too narrow for the first with whole ids."""
    wide = Table(
        Column("job", no_wrap=True),
        "project",
        Column("status", no_wrap=True),
        "stage",
        Column("%", justify="right"),
        Column("eta s", justify="right"),
        "mode",
        Column("version", no_wrap=True),
        "current",
        Column("reason / error", overflow="fold"),
    )
    narrow = Table(
        Column("job / version", no_wrap=True),
        "project",
        "status",
        Column("reason / error", overflow="fold"),
    )
    for job in found:
        made, now = job.get("made_current"), job["current"]
        later = "no (later version)" if now is False else ""
        current = "yes" if now else "candidate" if made is False else later
        reason = job["check_reason"] if made is False else job["reason"]
        reason = _cell(job["error"] or reason)
        percent = "" if job["percent"] is None else f"{job['percent']:.0f}"
        eta = "" if job["eta_s"] is None else f"{job['eta_s']:.0f}"
        project, stage, mode, version = (_cell(job[key]) for key in ("project", "stage", "mode", "version"))
        cells = (job["id"], project, job["status"], stage, percent, eta, mode, version, current, reason)
        wide.add_row(*map(Text, cells))
        narrow.add_row(
            _lines(job["id"], version + (" (candidate)" if version and current == "candidate" else "")),
            Text(project),
            _lines(job["status"], f"{stage} {percent}%" if percent else stage, eta and f"eta {eta}s", mode),
            Text(reason),
        )
    return wide, narrow


def print_jobs(found: list[dict[str, Any]], console: Console = out) -> None:
    """Print the ``jobs`` table: ids, versions and reasons whole at any width (see :func:`print_table`)."""
    from defect_assist.core.progress import print_table

    print_table(console, *job_tables(found))


# Stages a retrain job sets without counts; in the others it reports stage_done of stage_total.
_MARKER_STAGES = frozenset({"queued", "starting", "done", "refused", "waiting-retry", "failed"})


def _wait_for_retrain(project: str, answer: dict[str, Any], connection: redis.Redis, timeout: float) -> None:
    """Follow the job (and the follow-up serving the request): a status line on each change, a bar per
    stage (at a terminal; elsewhere a line when a stage starts and ends), then its result on stdout."""
    from rq.job import Job

    from defect_assist.core.progress import RichProgress

    job_id = answer["job_id"]
    deadline = time.monotonic() + timeout
    shown: tuple[str, ...] = ()
    marker = ""  # the last stage set without counts (starting, done, failed …)
    counted: tuple[str, int] | None = None  # the stage drawn as a bar, and its total
    with RichProgress() as bars:
        while time.monotonic() < deadline:
            job = Job.fetch(job_id, connection=connection)
            status = job.get_status()
            meta = job.meta
            stage = str(meta.get("stage") or "")
            if counted and counted[0] != stage and stage not in ("failed", "refused", "waiting-retry"):
                bars(counted[0], counted[1], counted[1])  # the job moved on: that stage is over
                counted = None
            marker = stage if stage in _MARKER_STAGES else marker
            state = (job_id, str(getattr(status, "value", status)), marker)
            if state != shown:
                detail = f" ({marker})" if marker and marker != state[1] else ""
                bars.print(Text(f"job {job_id}: {state[1]}{detail}"))
                shown = state
            if stage and stage not in _MARKER_STAGES and "stage_total" in meta:
                counted = (stage, int(meta["stage_total"]))
                bars(stage, int(meta.get("stage_done") or 0), counted[1])
            if job.is_finished:
                if answer["status"].startswith("follow-up"):  # served by the job enqueued after this one
                    from defect_assist_worker.triggers import project_state

                    next_id = project_state(project, connection)["job_id"]
                    if next_id and next_id != job_id:
                        job_id, answer = next_id, {"status": "queued"}
                        continue
                typer.echo(json.dumps(job.return_value(), default=str))
                return
            if job.is_failed:
                result = job.latest_result()
                reason = job.meta.get("error") or (result and result.exc_string)
                bars.print(Text.assemble((f"job {job_id} failed", "red"), f": {reason}"))
                raise typer.Exit(1)
            time.sleep(0.5)
    console.print(f"[red]timed out waiting for {job_id}[/red]")
    raise typer.Exit(2)


def register(app: typer.Typer) -> None:
    """Add the worker commands to the ``defect-assist`` CLI."""

    @app.command("worker")
    def worker_command(
        burst: Annotated[bool, typer.Option(help="Exit when the queues are empty.")] = False,
        device: Annotated[
            str | None, typer.Option(help="auto (CUDA when present), cpu, cuda … (default DEVICE).")
        ] = None,
        name: Annotated[str | None, typer.Option(help="Worker name (default: random).")] = None,
    ) -> None:
        """Run an rq worker on the retrain queue (spawned work horses; starts the embedded Redis)."""
        from defect_assist_worker.worker import run_worker

        run_worker(burst=burst, device=device, name=name)

    @app.command("retrain")
    def retrain_command(
        project: Annotated[str, typer.Option("--project", help="Label Studio project id.")],
        wait: Annotated[bool, typer.Option("--wait", help="Wait for the job and print its result.")] = False,
        mode: Annotated[str | None, typer.Option(help="auto | full | incremental.")] = None,
        reason: Annotated[str, typer.Option(help="Recorded with the job.")] = "cli",
        timeout: Annotated[float, typer.Option(help="Seconds to wait with --wait.")] = 4 * 3600,
    ) -> None:
        """Request a retrain of a project (one job per project; a running one gets one follow-up)."""
        from defect_assist_worker.triggers import request_retrain

        connection = _connection()
        answer = request_retrain(project, reason, mode=mode, connection=connection)
        typer.echo(json.dumps(answer))
        if wait:
            _wait_for_retrain(project, answer, connection, timeout)

    @app.command("jobs")
    def jobs_command(
        project: Annotated[str | None, typer.Option("--project", help="Only this project.")] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
        limit: Annotated[int, typer.Option(help="At most this many jobs.")] = 20,
    ) -> None:
        """Retrain jobs: status, stage, %, ETA, version (current or candidate) and reason."""
        from defect_assist_worker.status import list_jobs

        found = list_jobs(_connection(), project, limit)
        if as_json:
            out.print_json(json.dumps(found, default=str))
            return
        print_jobs(found)

    @app.command("redis")
    def redis_command(
        stop: Annotated[bool, typer.Option("--stop", help="Stop the embedded server instead.")] = False,
        port: Annotated[
            int | None, typer.Option(help="Listen on this TCP port (default: unix socket).")
        ] = None,
    ) -> None:
        """Run the embedded redis-server (REDIS_DATA_DIR, AOF persistence) in the foreground."""
        import os

        from defect_assist.core.settings import get_settings
        from defect_assist_worker.redis_server import RedisServer

        settings = get_settings()
        if settings.redis_url:
            console.print(f"REDIS_URL is set ({settings.redis_url}): nothing to run")
            raise typer.Exit(1)
        server = RedisServer(settings.redis_data_dir, port=port)
        if stop:
            server.stop()
            return
        running = server.running_url()
        if running:
            console.print(f"already running at {running}")
            raise typer.Exit(1)
        command = server.command()
        (server.data_dir / "redis.url").write_text(server.url + "\n")
        console.print(f"redis-server on {server.url}, data in {server.data_dir}")
        os.execv(command[0], command)
