"""FiftyOne plugin: Defect Assist operators (discoverable via ``FIFTYONE_PLUGINS_DIR=<repo>/plugins``).

* ``find_similar`` — nearest neighbours of the selected sample in the project's similarity index
  (the one Qdrant collection ``defect-assist index`` / ``similar``, the backend's ``/similar`` and
  the dataset's ``similarity`` brain run share; an indexed sample is not re-embedded); shows those
  in this dataset as the App's view, in similarity order.
* ``compute_predictions`` (delegated) — re-runs the project's current model on the view:
  heatmaps, masks, verdicts and the 2-D plot; embeddings through the project's index (images it
  holds for the current version are reused, new or stale ones embedded once and written to it).
* ``send_to_label_studio`` — creates Label Studio tasks for the selected samples with our
  predictions attached (verdict choice + brush mask), through the Label Studio adapter.
* ``trigger_retrain`` (delegated) — enqueues a retrain on the worker's queue (``defect_assist_worker``,
  when rq is installed); otherwise it trains in the delegated operation. Both run the one training path.

The project id comes from the ``project`` parameter or the dataset's ``info["defect_assist"]``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import fiftyone.operators as foo
import fiftyone.operators.types as types


def _info(ctx: Any) -> dict[str, Any]:
    return dict((ctx.dataset.info or {}).get("defect_assist", {}))


def _project(ctx: Any) -> str:
    return str(ctx.params.get("project") or _info(ctx).get("project") or "default")


def _target_ids(ctx: Any) -> list[str]:
    ids = list(ctx.selected or [])
    if not ids and ctx.params.get("sample_ids"):
        ids = list(ctx.params["sample_ids"])
    if not ids and ctx.current_sample:
        ids = [ctx.current_sample]
    return ids


def _project_input(inputs: types.Object, ctx: Any) -> None:
    inputs.str("project", label="Project", default=_project(ctx), required=False)


class FindSimilar(foo.Operator):
    @property
    def config(self) -> foo.OperatorConfig:
        return foo.OperatorConfig(
            name="find_similar", label="Defect Assist: find similar images (Qdrant)", dynamic=True
        )

    def resolve_input(self, ctx: Any) -> types.Property:
        inputs = types.Object()
        if not _target_ids(ctx):
            inputs.view("warning", types.Warning(label="Select a sample first"))
        inputs.int("k", label="Neighbours", default=10)
        _project_input(inputs, ctx)
        return types.Property(inputs, view=types.View(label="Find similar"))

    def execute(self, ctx: Any) -> dict[str, Any]:
        from defect_assist.similarity.indexing import query_similar
        from defect_assist.similarity.service import open_context

        ids = _target_ids(ctx)
        if not ids:
            raise ValueError("select a sample first")
        sample = ctx.dataset[ids[0]]
        k = int(ctx.params.get("k", 10))
        project = _project(ctx)
        context = open_context(project, device="cpu")
        try:
            if not context.index.count():
                raise ValueError(
                    f"the similarity index of project {project!r} is empty: run `defect-assist fiftyone` "
                    "or `defect-assist index`, or the compute_predictions operator"
                )
            query, neighbours = query_similar(context.index, context.embedder, sample.filepath, k=k)
        finally:
            context.close()
        hits = [n.summary() for n in neighbours]
        hashes = [n.payload.get("content_hash") for n in neighbours]
        if ctx.dataset.has_field("content_hash"):  # the same image under any path
            view = ctx.dataset.select_by("content_hash", [h for h in hashes if h], ordered=True)
        else:
            view = ctx.dataset.select_by("filepath", [h["path"] for h in hits if h["path"]], ordered=True)
        ctx.ops.set_view(view)
        return {
            "query": query,
            "neighbours": hits,
            "source": "qdrant:" + context.index.collection,
            "in_dataset": len(view),
        }

    def resolve_output(self, ctx: Any) -> types.Property:
        outputs = types.Object()
        outputs.str("source", label="Index")
        outputs.int("in_dataset", label="Neighbours in this dataset")
        return types.Property(outputs)


class ComputePredictions(foo.Operator):
    @property
    def config(self) -> foo.OperatorConfig:
        return foo.OperatorConfig(
            name="compute_predictions",
            label="Defect Assist: compute / refresh predictions",
            dynamic=True,
            allow_delegated_execution=True,
            default_choice_to_delegated=True,
        )

    def resolve_input(self, ctx: Any) -> types.Property:
        inputs = types.Object()
        _project_input(inputs, ctx)
        return types.Property(inputs, view=types.View(label="Compute predictions"))

    def resolve_delegation(self, ctx: Any) -> bool:
        return bool(ctx.params.get("delegate", True))

    def execute(self, ctx: Any) -> dict[str, Any]:
        from defect_assist.core.settings import get_settings
        from defect_assist.explore.fiftyone_dataset import add_predictions, compute_brain_runs
        from defect_assist.similarity.service import open_context

        settings = get_settings()
        info = _info(ctx)
        dataset = ctx.dataset
        view = ctx.target_view() if hasattr(ctx, "target_view") else ctx.view
        context = open_context(_project(ctx), device=settings.device)
        try:
            media = Path(info.get("media_dir") or settings.cache_dir / "fiftyone" / dataset.name)
            report = add_predictions(
                view,
                context.embedder,
                media,
                context.index,
                progress=lambda s, d, t: ctx.set_progress(d / max(t, 1)),
            ).summary()
            runs = compute_brain_runs(dataset, context.index)
        finally:
            context.close()
        dataset.info = {
            **(dataset.info or {}),
            "defect_assist": {**info, "model_version": context.model_version, "index": report, **runs},
        }
        dataset.save()
        ctx.trigger("reload_dataset")
        return {"model_version": context.model_version, "samples": len(view), "index": report}


class SendToLabelStudio(foo.Operator):
    @property
    def config(self) -> foo.OperatorConfig:
        return foo.OperatorConfig(
            name="send_to_label_studio", label="Defect Assist: send to Label Studio for review", dynamic=True
        )

    def resolve_input(self, ctx: Any) -> types.Property:
        inputs = types.Object()
        inputs.int("ls_project", label="Label Studio project id", required=True)
        inputs.str("image_url_prefix", label="Image URL prefix (optional)", required=False)
        return types.Property(inputs, view=types.View(label="Send to Label Studio"))

    def execute(self, ctx: Any) -> dict[str, Any]:
        from defect_assist.explore.review_tasks import create_review_tasks

        ids = _target_ids(ctx)
        if not ids:
            raise ValueError("select samples first")
        samples = ctx.dataset.select(ids, ordered=True)
        task_ids = create_review_tasks(
            samples,
            int(ctx.params["ls_project"]),
            image_url_prefix=ctx.params.get("image_url_prefix") or None,
        )
        for sample, task_id in zip(samples, task_ids, strict=True):
            sample["ls_task_id"] = task_id
            sample.tags = sorted({*sample.tags, "sent_to_label_studio"})
            sample.save()
        return {"created": len(task_ids), "task_ids": task_ids}


class TriggerRetrain(foo.Operator):
    @property
    def config(self) -> foo.OperatorConfig:
        return foo.OperatorConfig(
            name="trigger_retrain",
            label="Defect Assist: retrain the model",
            dynamic=True,
            allow_delegated_execution=True,
            default_choice_to_delegated=True,
        )

    def resolve_input(self, ctx: Any) -> types.Property:
        inputs = types.Object()
        _project_input(inputs, ctx)
        inputs.bool("normals_from_view", label="Train on the normal samples of this view", default=True)
        inputs.bool("use_queue", label="Through the worker queue", default=True)
        return types.Property(inputs, view=types.View(label="Retrain"))

    def resolve_delegation(self, ctx: Any) -> bool:
        return bool(ctx.params.get("delegate", True))

    def execute(self, ctx: Any) -> dict[str, Any]:
        view = ctx.target_view() if hasattr(ctx, "target_view") else ctx.view
        images: list[str] = []
        if ctx.params.get("normals_from_view", True):
            normals = view.match({"ground_truth.label": "normal", "split": "train"})
            images = normals.values("filepath")
        return request_retrain(_project(ctx), images, use_queue=bool(ctx.params.get("use_queue", True)))


def request_retrain(project: str, images: list[str], use_queue: bool = True) -> dict[str, Any]:
    """Retrain ``project`` on ``images``: a job on the worker's queue, or here (the operator is delegated).

    Either way it is the one training path (:func:`defect_assist.training.pipeline.train_and_publish`).
    """
    if use_queue and importlib.util.find_spec("rq") is not None:
        from defect_assist_worker.triggers import request_retrain as enqueue

        answer = enqueue(project, "fiftyone", images=images or None)
        return {"queued": True, "job_id": answer["job_id"], "status": answer["status"], "images": len(images)}
    from defect_assist.core.settings import get_settings
    from defect_assist.training.pipeline import train_and_publish

    if not images:
        raise ValueError("no normal training images in the view and no worker queue to ask")
    result = train_and_publish(
        project, [Path(p) for p in images], settings=get_settings(), extra={"source": "fiftyone"}
    )
    return {"queued": False, "version": result["version"], "trained_on": result["trained_on"]}


def register(plugin: Any) -> None:
    plugin.register(FindSimilar)
    plugin.register(ComputePredictions)
    plugin.register(SendToLabelStudio)
    plugin.register(TriggerRetrain)
