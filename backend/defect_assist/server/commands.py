"""``defect-assist serve``: run the Label Studio ML backend with uvicorn."""

from __future__ import annotations

from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def serve(
        host: Annotated[str, typer.Option(help="Interface to listen on.")] = "0.0.0.0",
        port: Annotated[
            int, typer.Option(help="Port (9090 is the Label Studio ML backend convention).")
        ] = 9090,
        log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    ) -> None:
        """Serve the Label Studio ML backend (/health /setup /predict /webhook /versions) from MODEL_DIR."""
        import uvicorn

        from defect_assist.server.app import create_app

        uvicorn.run(create_app(), host=host, port=port, log_level=log_level)
