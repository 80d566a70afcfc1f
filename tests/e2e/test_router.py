"""The semantic router and the semantic cache, on real embeddings: all-MiniLM-L6-v2 on the real llama.cpp server.

One appliance (2 workers) for the module: the router chooses between a "code" profile (the real tiny model,
priced dear) and a "chit-chat" one (the fake, priced cheap); the semantic cache is on for some routes of the
fake only (its answers are fixed, so the fake's request count tells whether a backend was asked).
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

import httpx
import openai
import pytest

from tests.fakes.openai_upstream import FakeOpenAI
from tests.support.appliance import ADMIN_KEY, Appliance, toml
from tests.support.ledger import logged

pytestmark = pytest.mark.llamacpp

CODING = "How do I write a Python function to sort a list of dictionaries by a key?"
GREETING = "Hello! How are you doing today?"
THRESHOLD = 0.9  # paraphrases below score 0.95 and more with MiniLM; unrelated questions about 0.1

PROFILES = [
    {"name": "code", "model": "coder",
     "description": "Programming questions: writing, explaining and debugging code in Python, JavaScript, SQL or shell",
     "examples": ["Write a Python function that reverses a list", "Why does my JavaScript code throw a TypeError?"]},
    {"name": "chit-chat", "model": "chatty", "description": "Small talk, greetings and casual conversation",
     "examples": ["Hi there, how are you?", "Good morning! Nice to meet you."]},
]


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory, llamacpp_url: str, fake_openai: FakeOpenAI) -> Any:
    config = {
        "discovery": {"enabled": False},
        "backends": [{"name": "llamacpp", "url": llamacpp_url, "timeout_s": 120},
                     {"name": "fake", "url": fake_openai.url + "/v1"}],
        "models": [
            {"name": "coder", "target": "llamacpp/tiny", "input_per_mtok": 3, "output_per_mtok": 15},
            {"name": "chatty", "target": "fake/fake-chat", "input_per_mtok": 0.1, "output_per_mtok": 0.4},
            {"name": "faq", "target": "fake/fake-chat", "cache": {"semantic": True}},
            {"name": "faq-shared", "target": "fake/fake-chat", "cache": {"semantic": True, "shared": True}},
            {"name": "plain", "target": "fake/fake-chat"},
        ],
        "cache": {"semantic_threshold": THRESHOLD},  # [cache] semantic stays off: the routes above opt in
        "embeddings": {"model": "all-minilm-l6-v2"},
        "router": {"profiles": PROFILES},
    }
    appliance = Appliance(tmp_path_factory.mktemp("router"), config)
    appliance.start()
    deadline = time.monotonic() + 60
    while True:  # both backends probed, so the catalog knows every model
        backends = appliance.get("/ready")[1]["backends"]
        if all(backends[name]["state"] == "ready" for name in ("llamacpp", "fake")):
            break
        assert time.monotonic() < deadline, backends
        time.sleep(0.2)
    yield appliance
    appliance.stop()


@pytest.fixture(scope="module")
def sdk(app: Appliance) -> openai.OpenAI:
    return openai.OpenAI(base_url=app.url + "/v1", api_key=ADMIN_KEY, max_retries=0, timeout=120)


def post(app: Appliance, path: str, body: dict[str, Any], key: str = ADMIN_KEY) -> httpx.Response:
    return httpx.post(app.url + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120)


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def new_key(app: Appliance, **fields: Any) -> str:
    response = post(app, "/admin/keys", {"name": f"k-{uuid.uuid4().hex[:8]}", **fields})
    assert response.status_code == 201, response.text
    return response.json()["key"]


def embedded(app: Appliance, purpose: str) -> float:
    """appliance_embedded_texts_total for ``purpose``, both sources, all workers."""
    text = httpx.get(app.url + "/metrics", timeout=10).text
    pattern = rf'^appliance_embedded_texts_total{{[^}}]*purpose="{purpose}"[^}}]*}} (\S+)$'
    return sum(float(value) for value in re.findall(pattern, text, re.M))


# ------------------------------------------------------------------------------------------ the router


def test_decision_only_picks_code_for_a_coding_question(app):
    response = post(app, "/v1/router", {"messages": user(CODING), "execute": False})
    assert response.status_code == 200, response.text
    decision = response.json()
    assert (decision["profile"], decision["model"]) == ("code", "coder")
    assert response.headers["x-appliance-router-profile"] == "code"
    assert [s["profile"] for s in decision["scores"]] == ["code", "chit-chat"]
    for score in decision["scores"]:
        assert set(score) == {"profile", "model", "similarity", "cost", "score"}
    code, chat = decision["scores"]
    assert code["similarity"] > chat["similarity"] + 0.1
    assert (code["cost"], chat["cost"]) == (1.0, pytest.approx(0.5 / 18, abs=1e-6))
    assert decision["cost_weight"] == 0


def test_decision_only_picks_chit_chat_for_a_greeting(app):
    decision = post(app, "/v1/router", {"model": "anything", "messages": user(GREETING), "execute": False}).json()
    assert decision["profile"] == "chit-chat"
    assert decision["scores"][0]["similarity"] > 0.5


def test_cost_weight_1_picks_the_cheapest(app):
    decision = post(app, "/v1/router", {"messages": user(CODING), "execute": False, "cost_weight": 1}).json()
    assert (decision["profile"], decision["cost_weight"]) == ("chit-chat", 1)


def test_models_restricts_the_profiles(app):
    decision = post(app, "/v1/router", {"messages": user(CODING), "execute": False, "models": ["chatty"]}).json()
    assert [s["profile"] for s in decision["scores"]] == ["chit-chat"]
    response = post(app, "/v1/router", {"messages": user(CODING), "models": ["no-such-model"]})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "models"


def test_a_key_is_routed_only_to_models_it_may_use(app):
    key = new_key(app, models=["chatty"])
    decision = post(app, "/v1/router", {"messages": user(CODING), "execute": False}, key=key).json()
    assert decision["profile"] == "chit-chat" and len(decision["scores"]) == 1
    listed = httpx.get(app.url + "/v1/router/profiles", headers={"Authorization": f"Bearer {key}"}, timeout=10)
    assert [p["name"] for p in listed.json()["data"]] == ["chit-chat"]
    refused = post(app, "/v1/router", {"messages": user(CODING), "models": ["coder"]}, key=key)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "model_not_allowed"


def test_executed_on_the_chosen_model_without_the_router_fields(app, fake_openai):
    response = post(app, "/v1/router", {"messages": user(GREETING), "cost_weight": 0.2, "models": ["chatty", "coder"],
                                        "max_tokens": 8})
    assert response.status_code == 200, response.text
    assert response.headers["x-appliance-router-profile"] == "chit-chat"
    assert response.headers["x-appliance-backend"] == "fake"
    assert response.json()["object"] == "chat.completion"
    sent = fake_openai.find(response.headers["x-request-id"]).body
    assert sent["model"] == "fake-chat" and not {"models", "cost_weight", "execute"} & set(sent)


def test_the_router_model_name_works_for_plain_clients(app, sdk):
    raw = sdk.chat.completions.with_raw_response.create(model="router", messages=user(CODING), max_tokens=8)
    assert raw.headers["x-appliance-router-profile"] == "code"
    assert raw.headers["x-appliance-backend"] == "llamacpp"  # the real tiny model answered
    assert raw.parse().choices[0].finish_reason in ("length", "stop")
    stream = sdk.chat.completions.with_raw_response.create(model="router", messages=user(GREETING), stream=True)
    assert stream.headers["x-appliance-router-profile"] == "chit-chat"
    assert "".join(c.choices[0].delta.content or "" for c in stream.parse() if c.choices)
    assert "router" in {m.id for m in sdk.models.list().data}


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/messages", {"model": "router", "max_tokens": 8, "messages": user(GREETING)}),
    ("/v1/responses", {"model": "router", "input": GREETING, "max_output_tokens": 16}),
])
def test_the_router_model_name_works_on_the_other_surfaces(app, path, body):
    response = post(app, path, body)
    assert response.status_code == 200, response.text
    assert (response.headers["x-appliance-router-profile"], response.headers["x-appliance-backend"]) == (
        "chit-chat", "fake")


def test_profiles_are_listed_without_vectors(app):
    listed = httpx.get(app.url + "/v1/router/profiles", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                       timeout=10).json()
    assert [(p["name"], p["model"], p["cost"], p["served"]) for p in listed["data"]] == [
        ("code", "coder", 18, True), ("chit-chat", "chatty", 0.5, True)]
    assert listed["data"][0]["examples"] == PROFILES[0]["examples"]


# ------------------------------------------------------------------------------------------ the semantic cache


def chat(app: Appliance, model: str, text: str, key: str = ADMIN_KEY) -> httpx.Response:
    response = post(app, "/v1/chat/completions", {"model": model, "messages": user(text), "temperature": 0}, key=key)
    assert response.status_code == 200, response.text
    return response


def test_a_paraphrase_is_answered_from_the_semantic_cache(app, fake_openai):
    assert chat(app, "faq", "What is the capital of France?").headers["x-cache"] == "MISS"
    asked = len(fake_openai.chats())
    hit = chat(app, "faq", "What's the capital city of France?")
    assert hit.headers["x-cache"] == "HIT-SEMANTIC"
    assert THRESHOLD <= float(hit.headers["x-appliance-cache-similarity"]) < 1
    assert hit.headers["x-appliance-cost-usd"] == "0.000000000"
    assert len(fake_openai.chats()) == asked  # no backend saw it
    assert logged(app, hit.headers["x-request-id"])["cache"] == "HIT-SEMANTIC"
    assert chat(app, "faq", "How do I bake sourdough bread?").headers["x-cache"] == "MISS"
    assert len(fake_openai.chats()) == asked + 1


def test_routes_without_it_match_exactly_only(app):
    chat(app, "plain", "What is the tallest mountain in Africa?")
    response = chat(app, "plain", "Which is Africa's tallest mountain?")
    assert response.headers["x-cache"] == "MISS" and "x-appliance-cache-similarity" not in response.headers


def test_another_key_misses_unless_the_route_is_shared(app):
    other = new_key(app)
    chat(app, "faq", "How many legs does a spider have?")
    assert chat(app, "faq", "How many legs do spiders have?", key=other).headers["x-cache"] == "MISS"
    chat(app, "faq-shared", "How many moons does Mars have?")
    assert chat(app, "faq-shared", "How many moons orbit Mars?", key=other).headers["x-cache"] == "HIT-SEMANTIC"


def test_an_exact_hit_makes_no_embedding_call(app):
    question = "What is the boiling point of water at sea level?"
    before = embedded(app, "cache")
    assert chat(app, "faq", question).headers["x-cache"] == "MISS"
    after_miss = embedded(app, "cache")
    assert after_miss == before + 1  # the miss embedded its prompt (and stored the vector with the answer)
    assert chat(app, "faq", question).headers["x-cache"] == "HIT"
    assert embedded(app, "cache") == after_miss


def test_a_reload_brings_new_profiles_embedded_on_first_use(app):
    """Last in the module: it changes the running config."""
    weather = {"name": "weather", "model": "chatty", "description": "Weather forecasts: rain, sun, temperature",
               "examples": ["Will it rain in Paris tomorrow?"]}
    config = {**app.config, "router": {"profiles": [*PROFILES, weather]}}
    app.config_path.write_text(toml(config))
    reloaded = post(app, "/admin/reload", {})
    assert reloaded.status_code == 200 and reloaded.json()["workers_behind"] == [], reloaded.text
    decision = post(app, "/v1/router", {"messages": user("Is it going to be sunny in Rome this weekend?"),
                                        "execute": False}).json()
    assert decision["profile"] == "weather"
    assert {s["profile"] for s in decision["scores"]} == {"code", "chit-chat", "weather"}


