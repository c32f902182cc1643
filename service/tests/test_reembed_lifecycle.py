"""Activation and re-embedding as one engine operation: whatever the order of activations and roll-backs, and
however far a re-embed has got, every collection ends in (or re-embedding toward) the active model's space."""

from __future__ import annotations

import asyncio
import time

import pytest

from index.store import CollectionStore
from service.engine import Engine, NewItem
from service.registry import ModelRegistry
from service.settings import Settings

DEADLINE_S = 60


@pytest.fixture
def engine(tmp_path, tiny_bundle, tiny_bundle_b):
    settings = Settings(auth_disabled=True, state_dir=tmp_path, max_batch_size=8, max_wait_ms=1)
    registry = ModelRegistry(settings)
    first = registry.register(registry.load(tiny_bundle))
    registry.register(registry.load(tiny_bundle_b))
    registry.activate(first.model_id)
    return Engine(settings, registry, CollectionStore(settings.collections_dir))


async def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def hold_reembeds_into(engine: Engine, model_id: str) -> asyncio.Event:
    """Make re-embeds toward `model_id` wait at their first batch until the returned event is set."""
    gate, encode = asyncio.Event(), engine.collections.encode

    async def held(model, modality, items):
        if model.model_id == model_id:
            await gate.wait()
        return await encode(model, modality, items)

    engine.collections.encode = held
    return gate


@pytest.mark.parametrize("held", ["first", "second"])
def test_activating_again_while_a_reembed_runs_leaves_the_collection_in_the_active_space(engine, held):
    first, second = (m.model_id for m in engine.models())

    async def main():
        info = engine.collections.info
        await engine.collections.create("docs", "text", None)
        await engine.collections.upsert("docs", [NewItem(f"t{i}", {}, text=f"text {i}") for i in range(20)])
        if held == "first":  # A → B done; roll back to A (held); B again while A's re-embed runs
            await engine.activate(second)
            await wait_until(lambda: info("docs")["model_id"] == second, "the re-embed into B")
            gate = hold_reembeds_into(engine, first)
            assert (await engine.rollback())["reembedding"] == ["docs"]
            answer = await engine.activate(second)
            expected = second
        else:  # A → B (held); roll back to A while B's re-embed runs
            gate = hold_reembeds_into(engine, second)
            assert (await engine.activate(second))["reembedding"] == ["docs"]
            answer = await engine.rollback()
            expected = first
        assert answer["reembedding"] == []  # the collection is in the active space already
        gate.set()
        await wait_until(lambda: not info("docs")["reembed"], "the abandoned re-embed to be dropped")
        await asyncio.sleep(0.2)  # a late batch of the cancelled re-embed would land now
        final = info("docs")
        other = second if expected == first else first
        await engine.unregister(other)  # nothing needs the other model any more (was a 409)
        await engine.close()
        return final

    final = asyncio.run(main())
    assert final["model_id"] == (second if held == "first" else first)
    assert final["reembed"] is None and final["count"] == 20
