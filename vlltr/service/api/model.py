"""`GET /v1/model`: what is being served."""

from __future__ import annotations

from fastapi import APIRouter

from vlltr.model.runtime.unknown import effective_rule
from vlltr.service.api.deps import CoreDep
from vlltr.service.api.docs import error_responses
from vlltr.service.schemas import ClassCounts, ModelInfo, UnknownRuleInfo

router = APIRouter(prefix="/v1/model", tags=["model"])


@router.get("", response_model=ModelInfo, summary="The served bundle and runtime", responses=error_responses(503))
async def model_info(core: CoreDep) -> ModelInfo:
    """Bundle id, architecture, class counts, the execution provider really in use, precision and the
    class-table version, and how the `unknown` verdict is decided."""
    bundle = core.bundle
    set_threshold = core.settings.unknown_threshold
    rule = effective_rule(bundle.calibration.unknown, set_threshold)
    table = core.registry.current
    training = bundle.manifest.training
    return ModelInfo(
        bundle_id=bundle.bundle_id,
        arch=bundle.arch,
        embed_dim=bundle.embed_dim,
        image_size=bundle.preprocess.size,
        num_anchors=bundle.num_anchors,
        precision=bundle.precision,
        provider=core.provider,
        classes=ClassCounts(trained=table.table.num_trained, added=table.table.num_added, total=table.num_classes),
        class_table_version=table.version,
        created=bundle.manifest.created,
        dataset=training.dataset if training is not None else None,
        max_batch_size=core.settings.max_batch_size,
        batch_buckets=list(core.buckets),
        inference_lanes=core.batcher.lanes,
        encoder_threads=core.image_encoder.threads if core.provider == "cpu" else None,
        unknown_rule=None
        if rule is None
        else UnknownRuleInfo(
            score=rule.score,  # type: ignore[arg-type]  # one of UNKNOWN_SCORES, checked when the bundle loaded
            components=list(rule.components) if rule.components else None,
            threshold=rule.threshold,
            source="bundle" if set_threshold is None else "setting",
            fitted_on=rule.fitted_on if set_threshold is None else None,
            keep=rule.keep if set_threshold is None else None,
        ),
    )
