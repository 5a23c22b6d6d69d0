"""Worker commands: ``defect-assist worker``, ``retrain``, ``jobs`` and ``redis``."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

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
        from rq.job import Job

        from defect_assist_worker.triggers import request_retrain

        connection = _connection()
        answer = request_retrain(project, reason, mode=mode, connection=connection)
        out.print(json.dumps(answer))
        if not wait:
            return
        job_id = answer["job_id"]
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            job = Job.fetch(job_id, connection=connection)
            status = job.get_status()
            meta = job.meta
            line = f"{status} {meta.get('stage', '')} {meta.get('percent', 0)}% eta {meta.get('eta_s')}s"
            if line != last:
                console.print(line)
                last = line
            if job.is_finished:
                followup = answer["status"].startswith("follow-up")
                if followup:  # the request is served by the job enqueued after this one
                    from defect_assist_worker.triggers import project_state

                    next_id = project_state(project, connection)["job_id"]
                    if next_id and next_id != job_id:
                        job_id, answer = next_id, {"status": "queued"}
                        continue
                out.print(json.dumps(job.return_value(), default=str))
                return
            if job.is_failed:
                result = job.latest_result()
                reason = job.meta.get("error") or (result and result.exc_string)
                console.print(f"[red]job {job_id} failed[/red]: {reason}")
                raise typer.Exit(1)
            time.sleep(0.5)
        console.print(f"[red]timed out waiting for {job_id}[/red]")
        raise typer.Exit(2)

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
        table = Table(
            "job", "project", "status", "stage", "%", "eta s", "mode", "version", "current", "reason / error"
        )
        for job in found:
            current = {True: "yes", False: "candidate"}.get(job["current"], "")
            reason = job["check_reason"] if job["current"] is False else job["reason"]
            table.add_row(
                job["id"][:12],
                str(job["project"]),
                job["status"],
                str(job["stage"] or ""),
                "" if job["percent"] is None else f"{job['percent']:.0f}",
                "" if job["eta_s"] is None else f"{job['eta_s']:.0f}",
                str(job["mode"] or ""),
                str(job["version"] or ""),
                current,
                str(job["error"] or reason or ""),
            )
        out.print(table)

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
