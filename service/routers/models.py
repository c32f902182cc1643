"""Models: list (also OpenAI-shaped), register a bundle from a server path, activate (hot swap), roll back."""

from __future__ import annotations

from fastapi import APIRouter, Response

from service.deps import ADMIN, READ, EngineDep
from service.schemas import ERRORS, RegisterModelRequest

router = APIRouter(prefix="/v1/models", tags=["models"], responses=ERRORS)


def _openai_entry(model, active_id: str | None) -> dict:
    """OpenAI's model object plus our fields (clients ignore unknown ones)."""
    return {"object": "model", "created": int(model.registered_at), "owned_by": "xclip-serve",
            **model.describe(active_id)}


@router.get("", dependencies=[READ])
async def list_models(engine: EngineDep) -> dict:
    """Registered models in OpenAI's list shape; `active` marks the one serving by default."""
    return {"object": "list", "active": engine.active_id,
            "data": [_openai_entry(m, engine.active_id) for m in engine.models()]}


@router.get("/{model_id}", dependencies=[READ])
async def get_model(model_id: str, engine: EngineDep) -> dict:
    """One model by id, name or alias."""
    return _openai_entry(engine.model(model_id), engine.active_id)


@router.post("", status_code=201, dependencies=[ADMIN])
async def register_model(body: RegisterModelRequest, engine: EngineDep) -> dict:
    """Verify, load and smoke-test a bundle directory; refused bundles change nothing."""
    model = await engine.register(body.path)
    if body.activate:
        return await engine.activate(model.model_id)
    return _openai_entry(model, engine.active_id)


@router.post("/rollback", dependencies=[ADMIN])
async def rollback(engine: EngineDep) -> dict:
    """Re-activate the previously active model; collections re-embed toward it."""
    return await engine.rollback()


@router.post("/{model_id}/activate", dependencies=[ADMIN])
async def activate(model_id: str, engine: EngineDep) -> dict:
    """Hot swap: new requests use this model, in-flight ones finish on theirs; collections re-embed."""
    return await engine.activate(model_id)


@router.delete("/{model_id}", status_code=204, dependencies=[ADMIN])
async def unregister(model_id: str, engine: EngineDep) -> Response:
    """Forget a model that is not active and that no collection still needs."""
    await engine.unregister(model_id)
    return Response(status_code=204)
