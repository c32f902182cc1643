"""Operations: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.deps import State

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> dict:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(state: State) -> dict:
    """Ready when a model is active (503 before)."""
    model = state.engine.registry.active
    return {"status": "ready", "model": model.model_id, "collections": len(state.engine.store.list())}


@router.get("/metrics")
async def metrics(state: State) -> Response:
    """Prometheus exposition."""
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
