"""The ``defect-assist`` command line: every layer's commands under one name.

Each layer keeps its commands next to its code (``defect_assist.core.commands``,
``defect_assist.training.commands`` …) and this module, at the top of the import graph, assembles
them. Commands import heavy or optional third-party packages only when they run, so ``--help``
is quick and a partial install (``pip install defect-assist[server]``) still starts.
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Annotated

import typer

from defect_assist.core import commands as core_commands
from defect_assist.core.models.efficientad import commands as efficientad_commands
from defect_assist.explore import commands as explore_commands
from defect_assist.similarity import commands as similarity_commands
from defect_assist.training import commands as training_commands
from defect_assist_tools.serve import serve
from defect_assist_tools.stack_command import stack
from defect_assist_worker import commands as worker_commands

app = typer.Typer(
    name="defect-assist",
    help="Unsupervised defect pre-annotation for Label Studio (PatchCore, EfficientAd).",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def main_callback(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not verbose:  # one line per HTTP call, faiss's loader and deprecations of libraries: noise
        for name in ("httpx", "httpcore", "faiss.loader"):
            logging.getLogger(name).setLevel(logging.WARNING)
        for module in ("timm", "anomalib", "lightning", "torchvision"):
            warnings.filterwarnings("ignore", category=FutureWarning, module=rf"{module}(\.|$)")
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=rf"{module}(\.|$)")


training_commands.register(app)
core_commands.register(app)
app.command()(serve)
worker_commands.register(app)
app.command()(stack)
similarity_commands.register(app)
explore_commands.register(app)
efficientad_commands.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
