import fnmatch

import pytest

from appliance.common.config import ModelSettings
from appliance.common.errors import GatewayError
from appliance.core.catalog import Catalog
from appliance.providers.base import ModelInfo


@pytest.fixture
def catalog():
    catalog = Catalog([ModelSettings(name="chat", target="vllm/Qwen/Qwen2.5-7B"),
                       ModelSettings(name="Qwen/Qwen2.5-7B", context_window=16384),
                       ModelSettings(name="broken", target="nowhere-model")])
    catalog.add_backend("vllm", "vllm")
    catalog.add_backend("ollama", "ollama")
    catalog.update("vllm", models=[ModelInfo("Qwen/Qwen2.5-7B", created=5, context_window=32768),
                                   ModelInfo("shared", context_window_trained=4096)])
    catalog.update("ollama", models=[ModelInfo("llama3.2:latest", aliases=("llama3.2",),
                                               capabilities={"tools": True, "embeddings": False}),
                                     ModelInfo("shared", capabilities={"vision": True})])
    return catalog


def test_backend_prefix_forces_a_backend_even_for_unlisted_models(catalog):
    route = catalog.resolve("ollama/qwen2.5:7b")
    assert (route.backend, route.upstream_model) == ("ollama", "qwen2.5:7b")


def test_aliases_then_catalog_with_first_backend_owning_a_shared_model(catalog):
    assert catalog.resolve("chat").upstream_model == "Qwen/Qwen2.5-7B"
    assert catalog.resolve("chat").backend == "vllm"
    assert catalog.resolve("Qwen/Qwen2.5-7B").backend == "vllm"  # a model id with a slash, no such backend
    assert catalog.resolve("shared").backend == "vllm"
    llama = catalog.resolve("llama3.2")
    assert (llama.backend, llama.upstream_model) == ("ollama", "llama3.2:latest")


def test_unknown_model_lists_known_ids(catalog):
    with pytest.raises(GatewayError) as info:
        catalog.resolve("gpt-9")
    error = info.value
    assert (error.status, error.code, error.param) == (404, "model_not_found", "model")
    assert "chat" in error.message and "llama3.2:latest" in error.message
    with pytest.raises(GatewayError, match="points to 'nowhere-model'"):
        catalog.resolve("broken")


def test_unknown_model_lists_at_most_ten(catalog):
    catalog.update("ollama", models=[ModelInfo(f"m{i}") for i in range(20)])
    message = catalog.not_found("x").message
    assert message.count(", ") == 10 and message.endswith(", ....")


def test_listing_deduplicates_and_enriches(catalog):
    entries = {e["id"]: e for e in catalog.list_models()}
    assert set(entries) == {"chat", "broken", "Qwen/Qwen2.5-7B", "shared", "llama3.2:latest"}
    shared = entries["shared"]
    assert shared["owned_by"] == "vllm"
    assert [b["id"] for b in shared["backends"]] == ["vllm", "ollama"]
    assert shared["context_window"] == 4096 and shared["capabilities"]["vision"] is True
    qwen = entries["Qwen/Qwen2.5-7B"]
    assert qwen["context_window"] == 16384  # the operator's override wins
    assert qwen["created"] == 5
    chat = entries["chat"]
    assert chat["owned_by"] == "appliance" and chat["target"] == "vllm/Qwen/Qwen2.5-7B"
    assert chat["context_window"] == 16384
    assert entries["llama3.2:latest"]["capabilities"]["tools"] is True


def test_describe_accepts_untagged_ollama_names(catalog):
    assert catalog.describe("llama3.2")["id"] == "llama3.2:latest"
    assert catalog.describe("nope") is None


def test_a_failed_probe_keeps_the_last_model_list(catalog):
    catalog.update("vllm", models=None, error="connection refused")
    assert catalog.backends["vllm"].state == "unreachable"
    assert catalog.resolve("Qwen/Qwen2.5-7B").backend == "vllm"


def test_routes_with_several_targets_skip_what_no_backend_serves():
    catalog = Catalog([ModelSettings(name="chat", targets=["vllm/big", "gone-model", "ollama/llama3.2:latest"],
                                     strategy="least_busy")])
    catalog.add_backend("vllm", "vllm")
    catalog.add_backend("ollama", "ollama")
    plan = catalog.plan("chat")
    assert [(r.backend, r.upstream_model) for r in plan.routes] == [("vllm", "big"), ("ollama", "llama3.2:latest")]
    assert plan.name == "chat" and plan.alias.strategy == "least_busy"
    entry = catalog.describe("chat")
    assert entry["targets"] == ["vllm/big", "gone-model", "ollama/llama3.2:latest"]


def test_alias_patterns_catch_vendor_names_but_exact_names_win(catalog):
    catalog = Catalog([ModelSettings(name="claude-*", target="ollama/llama3.2:latest"),
                       ModelSettings(name="claude-exact", target="vllm/Qwen/Qwen2.5-7B"),
                       ModelSettings(name="gpt-*", target="vllm/Qwen/Qwen2.5-7B")])
    catalog.add_backend("vllm", "vllm")
    catalog.add_backend("ollama", "ollama")
    catalog.update("ollama", models=[ModelInfo("gpt-oss:20b")])
    sonnet = catalog.plan("claude-sonnet-4-5")
    assert sonnet.name == "claude-*" and sonnet.routes[0].upstream_model == "llama3.2:latest"
    assert sonnet.routes[0].model == "claude-sonnet-4-5"
    assert catalog.resolve("claude-exact").backend == "vllm"
    assert catalog.resolve("gpt-oss:20b").backend == "ollama"  # a listed model beats a pattern
    assert catalog.resolve("gpt-4o").backend == "vllm"
    assert "claude-*" not in [m["id"] for m in catalog.list_models()]


# ------------------------------------------------------------------------------------------ a key's models


def patterns(*globs):
    return lambda name: any(fnmatch.fnmatchcase(name, glob) for glob in globs)


@pytest.mark.parametrize(("globs", "usable"), [
    (("vllm/Qwen/Qwen2.5-7B",), {"Qwen/Qwen2.5-7B", "vllm/Qwen/Qwen2.5-7B", "chat"}),  # backend/model
    (("Qwen/*",), {"Qwen/Qwen2.5-7B", "vllm/Qwen/Qwen2.5-7B", "chat"}),  # the model's own id
    (("chat",), {"chat"}),  # an alias: only that name
    (("llama3.2",), {"llama3.2", "llama3.2:latest", "ollama/llama3.2", "ollama/llama3.2:latest"}),  # untagged
    (("ollama/*",), {"llama3.2", "llama3.2:latest", "ollama/llama3.2", "ollama/llama3.2:latest",
                     "ollama/shared"}),
    (("shared",), {"shared", "vllm/shared", "ollama/shared"}),
])
def test_one_rule_for_what_a_key_may_use(catalog, globs, usable):
    may_use = patterns(*globs)
    names = ("chat", "Qwen/Qwen2.5-7B", "vllm/Qwen/Qwen2.5-7B", "llama3.2", "llama3.2:latest", "ollama/llama3.2",
             "ollama/llama3.2:latest", "shared", "vllm/shared", "ollama/shared", "broken", "gpt-9")
    assert {name for name in names if catalog.usable(name, may_use)} == usable
    for name in names:  # the request path takes the same decision
        try:
            routes = catalog.plan(name).routes
        except GatewayError:
            continue
        assert bool(catalog.allowed(routes, may_use)) == (name in usable), name


def test_any_model_needs_no_test(catalog):
    routes = catalog.plan("chat").routes
    assert catalog.allowed(routes, None) is routes
    assert catalog.usable("gpt-9", None)


def test_an_unknown_model_names_only_what_the_key_may_use(catalog):
    with pytest.raises(GatewayError) as info:
        catalog.plan("gpt-9", patterns("llama*"))
    assert info.value.message.endswith("Known models: llama3.2:latest.")
    message = catalog.not_found("gpt-9", patterns("nothing-*")).message
    assert "Known models" not in message and "Qwen" not in message
    assert "Qwen/Qwen2.5-7B" in catalog.not_found("gpt-9").message


def test_describe_backend_slash_model(catalog):
    entry = catalog.describe("vllm/Qwen/Qwen2.5-7B")
    assert entry["id"] == "vllm/Qwen/Qwen2.5-7B" and entry["owned_by"] == "vllm"
    assert entry["context_window"] == 16384
    shared = catalog.describe("ollama/shared")
    assert [b["id"] for b in shared["backends"]] == ["ollama"] and shared["capabilities"]["vision"] is True
    assert catalog.describe("ollama/llama3.2")["id"] == "ollama/llama3.2"
    assert catalog.describe("ollama/not-listed") is None
