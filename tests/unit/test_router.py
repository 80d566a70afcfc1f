"""The router's scoring math, its request options, the vector helpers and the semantic cache's pieces."""

import asyncio

import orjson
import pytest

from appliance.accounts.usage import Prices, Tokens
from appliance.common.config import (
    CacheSettings,
    ConfigError,
    ModelSettings,
    RouteCacheSettings,
    RouterProfile,
    RouterSettings,
)
from appliance.common.config_file import load_settings
from appliance.common.errors import GatewayError
from appliance.core import router, vectors
from appliance.core.cache import Policy, context_key, policy, semantic_prompt
from appliance.core.catalog import Catalog
from appliance.providers.base import ModelInfo
from tests.unit.test_cache import ANSWER, CHAT, Clock, migrated, open_worker

# ------------------------------------------------------------------------------------------ scoring


def test_cost_weight_0_picks_the_most_similar():
    ranked = router.rank(["code", "chat"], ["big", "small"], [0.42, 0.05], [18.0, 0.5], 0.0)
    assert [s.profile for s in ranked] == ["code", "chat"]
    assert ranked[0].score == pytest.approx(0.42)


def test_cost_weight_1_picks_the_cheapest_whatever_the_similarity():
    ranked = router.rank(["code", "chat"], ["big", "small"], [0.42, 0.05], [18.0, 0.5], 1.0)
    assert ranked[0].profile == "chat"
    assert ranked[0].score == pytest.approx(-0.5 / 18)
    assert ranked[1].score == pytest.approx(-1.0)


def test_a_middle_weight_trades_similarity_against_relative_cost():
    # code: 0.5 * 0.42 - 0.5 * 1.0 = -0.29; chat: 0.5 * 0.30 - 0.5 * 0.25 = 0.025
    ranked = router.rank(["code", "chat"], ["big", "small"], [0.42, 0.30], [20.0, 5.0], 0.5)
    assert [(s.profile, round(s.score, 6), s.cost) for s in ranked] == [("chat", 0.025, 0.25), ("code", -0.29, 1.0)]


def test_free_candidates_have_no_cost_and_ties_go_to_similarity_then_order():
    assert router.relative_costs([0.0, 0.0]) == [0.0, 0.0]
    ranked = router.rank(["a", "b", "c"], ["m", "m", "m"], [0.1, 0.3, 0.3], [0.0, 0.0, 0.0], 1.0)
    assert [s.profile for s in ranked] == ["b", "c", "a"]


def test_decision_shape():
    ranked = router.rank(["code"], ["big"], [0.4], [1.0], 0.2)
    decision = router.Decision("code", "big", 0.2, ranked).as_dict()
    assert decision == {"object": "router.decision", "model": "big", "profile": "code", "cost_weight": 0.2,
                        "scores": [{"profile": "code", "model": "big", "similarity": 0.4, "cost": 1.0,
                                    "score": pytest.approx(0.12)}]}


# ------------------------------------------------------------------------------------------ request options


def test_options_defaults_and_values():
    settings = RouterSettings(cost_weight=0.3)
    assert router.options({}, settings) == router.Options(None, 0.3, True)
    assert router.options({"models": ["a", "b"], "cost_weight": 1, "execute": False}, settings) == router.Options(
        frozenset(("a", "b")), 1.0, False)


@pytest.mark.parametrize(("body", "param"), [
    ({"models": "a"}, "models"), ({"models": []}, "models"), ({"models": [""]}, "models"), ({"models": [1]}, "models"),
    ({"cost_weight": 1.5}, "cost_weight"), ({"cost_weight": -0.1}, "cost_weight"),
    ({"cost_weight": True}, "cost_weight"), ({"cost_weight": "0.5"}, "cost_weight"),
    ({"execute": "no"}, "execute"),
])
def test_bad_options_are_400_naming_the_field(body, param):
    with pytest.raises(GatewayError) as caught:
        router.options(body, RouterSettings())
    assert (caught.value.status, caught.value.code, caught.value.param) == (400, "invalid_value", param)


def test_request_text_is_the_last_user_message():
    body = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "first"},
                         {"role": "assistant", "content": "ok"},
                         {"role": "user", "content": [{"type": "text", "text": "second"}]}]}
    assert router.request_text(body) == "second"
    assert router.request_text({"messages": [{"role": "system", "content": "only this"}]}) == "only this"
    with pytest.raises(GatewayError) as caught:
        router.request_text({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})
    assert caught.value.param == "messages"


# ------------------------------------------------------------------------------------------ candidates


def catalog_with(*names: str) -> Catalog:
    models = [ModelSettings(name="big", target="b/big-1", input_per_mtok=3, output_per_mtok=15),
              ModelSettings(name="small", target="b/small-1", input_per_mtok=0.1, output_per_mtok=0.4)]
    catalog = Catalog(models)
    if names:  # else no backend "b": nothing serves the aliases' targets
        catalog.add_backend("b", "openai")
        catalog.update("b", models=[ModelInfo(id=n) for n in names])
    return catalog


PROFILES = [RouterProfile(name="code", model="big", examples=["code"]),
            RouterProfile(name="chat", model="small", description="chat"),
            RouterProfile(name="fixed", model="small", description="x", cost=7)]


def test_candidates_carry_their_price_and_follow_models_and_the_key():
    catalog = catalog_with("big-1", "small-1")
    prices = Prices([ModelSettings(name="big", target="b/big-1", input_per_mtok=3, output_per_mtok=15),
                     ModelSettings(name="small", target="b/small-1", input_per_mtok=0.1, output_per_mtok=0.4)])
    found = router.candidates(PROFILES, catalog, prices, None, None)
    assert [(c.profile.name, c.price) for c in found] == [("code", 18), ("chat", 0.5), ("fixed", 7)]
    only_small = router.candidates(PROFILES, catalog, prices, None, frozenset(("small",)))
    assert [c.profile.name for c in only_small] == ["chat", "fixed"]
    allowed = router.candidates(PROFILES, catalog, prices, lambda name: name == "small", None)
    assert [c.profile.name for c in allowed] == ["chat", "fixed"]


@pytest.mark.parametrize(("served", "may_use", "models", "code"), [
    (("big-1", "small-1"), None, frozenset(("other",)), "invalid_value"),
    (("big-1", "small-1"), lambda name: False, None, "model_not_allowed"),
    ((), None, None, "model_not_found"),
])
def test_no_candidate_left_says_why(served, may_use, models, code):
    with pytest.raises(GatewayError) as caught:
        router.candidates(PROFILES, catalog_with(*served), Prices([]), may_use, models)
    assert caught.value.code == code


# ------------------------------------------------------------------------------------------ vectors


def test_unit_rows_and_best_per_group():
    rows = vectors.unit_rows([[3, 4], [0, 2], [1, 0], [0, 0]])
    assert list(rows[0]) == pytest.approx([0.6, 0.8]) and list(rows[3]) == [0, 0]  # a zero row stays zero
    query = vectors.unit_rows([[0, 1]])[0]
    assert vectors.best_per_group(vectors.stack(rows), query, [0, 0, 1, 1]) == pytest.approx([1.0, 0.0])
    with pytest.raises(ValueError):
        vectors.unit_rows([[1, 2], [1]])
    with pytest.raises(ValueError):
        vectors.unit_rows([[float("nan")]])
    with pytest.raises(ValueError):
        vectors.unit_rows([["one"]])


def test_nearest_skips_vectors_of_another_length():
    query = vectors.unit_rows([[1, 0, 0]])[0]
    blobs = [vectors.to_bytes(v) for v in vectors.unit_rows([[0, 1, 0], [1, 1, 0]])]
    other_model = vectors.to_bytes(vectors.unit_rows([[1, 0]])[0])
    index, similarity = vectors.nearest(query, [blobs[0], other_model, blobs[1]])
    assert index == 2 and similarity == pytest.approx(2 ** -0.5)
    assert vectors.nearest(query, [other_model]) is None


# ------------------------------------------------------------------------------------------ semantic cache


def test_a_route_overrides_the_cache_settings_it_names():
    settings = CacheSettings(semantic_threshold=0.9)
    assert policy(settings, None) == Policy(False, False, 0.9)
    assert policy(settings, RouteCacheSettings(semantic=True)) == Policy(False, True, 0.9)
    assert policy(CacheSettings(semantic=True, shared=True), RouteCacheSettings(semantic=False, shared=False,
                                                                                 semantic_threshold=0.8)) == (
        Policy(False, False, 0.8))


def test_semantic_prompt_is_the_last_user_text_only():
    user = {"role": "user", "content": "What is the capital of France?"}
    assert semantic_prompt({"messages": [user]}, 100) == "What is the capital of France?"
    assert semantic_prompt({"messages": [user, {"role": "assistant", "content": "Paris"}]}, 100) is None
    image = {"role": "user", "content": [{"type": "text", "text": "What is this?"}, {"type": "image_url"}]}
    assert semantic_prompt({"messages": [image]}, 100) is None
    assert semantic_prompt({"messages": [user]}, 10) is None  # too long to embed whole: exact matches only


def test_context_key_ignores_only_the_last_message():
    first = {"model": "m", "temperature": 0, "messages": [{"role": "system", "content": "S"},
                                                            {"role": "user", "content": "one"}]}
    paraphrase = {**first, "messages": [*first["messages"][:-1], {"role": "user", "content": "uno"}]}
    assert context_key(first, "b/m", "key_1", "e") == context_key(paraphrase, "b/m", "key_1", "e")
    others = [context_key(first, "b/m", "key_2", "e"), context_key(first, "b/other", "key_1", "e"),
              context_key({**first, "tools": [{"type": "function"}]}, "b/m", "key_1", "e"),
              context_key({**first, "messages": [{"role": "system", "content": "T"}, first["messages"][1]]}, "b/m",
                          "key_1", "e"),
              context_key(first, "b/m", "key_1", "another-embedding-model")]
    assert context_key(first, "b/m", "key_1", "e") not in others


def test_the_most_similar_entry_of_the_context_answers(tmp_path):
    path = migrated(tmp_path)
    clock = Clock()
    close, far = vectors.unit_rows([[1, 0.1, 0], [0, 0, 1]])
    query = vectors.unit_rows([[1, 0, 0]])[0]
    other_answer = orjson.dumps({**orjson.loads(ANSWER), "id": "chatcmpl-2"})

    async def run():
        db, writer, cache = await open_worker(path, clock)
        try:
            await cache.put("k1", endpoint=CHAT, scope=None, served="b/m", body=ANSWER, tokens=Tokens(9, 1),
                            ttl_s=60, context="ctx", vector=close)
            await cache.put("k2", endpoint=CHAT, scope=None, served="b/m", body=other_answer, tokens=Tokens(9, 1),
                            ttl_s=60, context="ctx", vector=far)
            found = await cache.similar("ctx", query, 0.9)
            assert found is not None and found.hit.body == ANSWER and found.similarity == pytest.approx(0.995, 1e-3)
            assert await cache.similar("ctx", query, 0.999) is None
            assert await cache.similar("another context", query, 0.1) is None
            clock.now += 61
            assert await cache.similar("ctx", query, 0.5) is None  # expired entries never answer
            row = (await db.fetchall("SELECT size FROM response_cache WHERE key = 'k1'"))[0]
            assert row["size"] == len(ANSWER) + 3 * 4 + 256  # the vector counts against max_mb
        finally:
            await writer.stop()
            await db.close()

    asyncio.run(run())


# ------------------------------------------------------------------------------------------ config


def test_router_and_semantic_cache_need_an_embedding_model():
    profile = {"name": "code", "model": "m", "examples": ["x"]}
    with pytest.raises(ConfigError, match=r"embeddings\.model"):
        load_settings(environ={}, overrides={"router": {"profiles": [profile]}})
    with pytest.raises(ConfigError, match=r"embeddings\.model"):
        load_settings(environ={}, overrides={"cache": {"semantic": True}})
    settings = load_settings(environ={}, overrides={"router": {"profiles": [profile]}, "embeddings": {"model": "e"}})
    assert settings.router.profiles[0].texts == ["x"]


@pytest.mark.parametrize(("profiles", "message"), [
    ([{"name": "a", "model": "m"}], "description or examples"),
    ([{"name": "a", "model": "m", "description": "x"}, {"name": "a", "model": "n", "description": "y"}],
     "duplicate name"),
])
def test_bad_profiles_are_refused(profiles, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(environ={}, overrides={"router": {"profiles": profiles}, "embeddings": {"model": "e"}})
