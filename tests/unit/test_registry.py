"""The one registry type, and every plug-in family built on it (arrival processes, target kinds, load APIs)."""

from __future__ import annotations

import pytest

from bench.apis import USER_KINDS, generates_tokens
from bench.arrivals import ARRIVALS
from bench.registry import Registry, UnknownName
from harness.targets import TARGETS


def test_a_name_is_registered_once_and_an_unknown_one_lists_the_known():
    shapes: Registry[type] = Registry("shape kind")

    @shapes.add("steps")
    class Steps:
        pass

    shapes.register("ramp", int)
    assert shapes["steps"] is Steps and shapes.names() == ["steps", "ramp"] and "ramp" in shapes and len(shapes) == 2
    with pytest.raises(ValueError, match=r"shape kind 'steps' is registered twice \(Steps, str\)"):
        shapes.register("steps", str)
    with pytest.raises(UnknownName, match=r"unknown shape kind 'stpes'; known kinds: steps, ramp"):
        shapes["stpes"]
    assert shapes.get("stpes") is None


def test_every_plug_in_family_is_one_registry():
    for registry, names in ((ARRIVALS, {"users", "constant", "poisson", "gamma"}),
                            (TARGETS, {"llama-server", "llama-cpp-python", "external"}),
                            (USER_KINDS, {"native", "openai", "chat", "embeddings"})):  # fmt: skip
        assert isinstance(registry, Registry) and set(registry) == names


def test_a_property_of_the_api_replaces_comparing_its_name():
    assert [api for api in USER_KINDS if not generates_tokens(api)] == ["embeddings"]
    with pytest.raises(UnknownName, match="unknown load api 'grpc'; known apis: native, openai, chat, embeddings"):
        generates_tokens("grpc")
    # A target serves the APIs its kind lists; one it lacks is routed to its first (llama-cpp-python: no /completion).
    assert TARGETS["llama-cpp-python"].route_api("native") == "openai"
    assert TARGETS["llama-server"].route_api("native") == "native"
