"""Models: list (also OpenAI-shaped), register a bundle from a server path, activate (hot swap), roll back."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Response

from service.deps import ADMIN, READ, EngineDep
from service.schemas import RegisterModelRequest

router = APIRouter(prefix="/v1/models", tags=["models"])


def _openai_entry(model, active_id: str | None) -> dict:
    """OpenAI's model object plus our fields (clients ignore unknown ones)."""
    return {"object": "model", "created": int(model.registered_at), "owned_by": "xclip-serve",
            **model.describe(active_id)}


@router.get("", dependencies=[READ])
async def list_models(engine: EngineDep) -> dict:
    """Registered models in OpenAI's list shape; `active` marks the one serving by default."""
    registry = engine.registry
    return {"object": "list", "active": registry.active_id,
            "data": [_openai_entry(m, registry.active_id) for m in registry.models.values()]}


@router.get("/{model_id}", dependencies=[READ])
async def get_model(model_id: str, engine: EngineDep) -> dict:
    """One model by id, name or alias."""
    return _openai_entry(engine.registry.get(model_id), engine.registry.active_id)


@router.post("", status_code=201, dependencies=[ADMIN])
async def register_model(body: RegisterModelRequest, engine: EngineDep) -> dict:
    """Verify, load and smoke-test a bundle directory; refused bundles change nothing."""
    model = engine.registry.register(await asyncio.to_thread(engine.registry.load, body.path))
    if body.activate:
        return await _activate(engine, model.model_id)
    return _openai_entry(model, engine.registry.active_id)


@router.post("/rollback", dependencies=[ADMIN])
async def rollback(engine: EngineDep) -> dict:
    """Re-activate the previously active model."""
    model_id = engine.registry.rollback()
    reembedding = engine.start_reembeds()
    return {"active": model_id, "reembedding": reembedding}


@router.post("/{model_id}/activate", dependencies=[ADMIN])
async def activate(model_id: str, engine: EngineDep) -> dict:
    """Hot swap: new requests use this model, in-flight ones finish on theirs; collections re-embed."""
    return await _activate(engine, model_id)


async def _activate(engine, model_id: str) -> dict:
    previous = engine.registry.activate(model_id)
    reembedding = engine.start_reembeds()
    return {"active": engine.registry.active_id, "previous": previous, "reembedding": reembedding}


@router.delete("/{model_id}", status_code=204, dependencies=[ADMIN])
async def unregister(model_id: str, engine: EngineDep) -> Response:
    """Forget a model that is not active and that no collection still needs."""
    model = engine.registry.get(model_id)
    engine.check_unused(model.model_id)
    engine.registry.unregister(model.model_id)
    for batcher in model.batchers.values():  # requests already queued on it fail; new ones cannot reach it
        await batcher.close()
    return Response(status_code=204)
