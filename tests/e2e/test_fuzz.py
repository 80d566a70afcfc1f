"""Schemathesis against the appliance's own /openapi.json: a real `appliance serve` (2 workers) over the fakes.

The bounded run is part of every test run: seeded and derandomized (the same cases every time), a few
cases per operation, in well under a minute. The long run is the ``fuzz`` marker (tests/perf/README.md):

    bash tests/run tests/e2e/test_fuzz.py -m fuzz -p no:cacheprovider

What counts as a failure: a 5xx that is not a backend's (the appliance tried a backend, or says which
backend failure it is); an answer outside the published document (status, content type, body schema, the
error envelope, each stream event's data); a schema-violating request that the appliance's own validation
accepts (admin, files, batches: proxied bodies are the backend's to judge); a traceback in the appliance's log.

The generated ``model`` is swapped, some of the time, for one the fakes answer (their names script
successes, tool calls, backend errors, a backend that is down), and generated ids for objects that exist,
so the cases reach the backends and the stored objects instead of stopping at a 404.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from appliance.server.openapi import operations, vendored
from tests.fakes.anthropic_upstream import API_KEY as ANTHROPIC_KEY
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.ollama import FakeOllama
from tests.fakes.openai_upstream import FakeOpenAI
from tests.support.appliance import ADMIN_KEY, Appliance
from tests.support.threaded import free_port

AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
BOUNDED_EXAMPLES = 6  # per operation and generation mode: ~40 operations -> a few hundred cases
LONG_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "200"))
LONG_SEED = int(os.environ.get("FUZZ_SEED", "0"))  # another seed, other cases
OPERATIONS = sorted(operations.describe(vendored.load()))  # test_every_operation_is_fuzzed: all that is served

# Models the fakes answer, each a different path through the gateway; None keeps the generated name.
MODELS = (None, "fake-chat", "fake-tools", "fake-nousage", "fake-500", "fake-400", "fake-vllm-error",
          "fake-embed", "fake-reset", "chat", "llama3.2", "all-minilm", "down-model", "claude-fake",
          "claude-fake-tools", "claude-fake-overloaded", "script-no-such-script", "fake-rerank", "fake-moderation",
          "fake-image", "fake-whisper", "fake-tts")
# Error codes of a backend's failure or lack: 5xx the appliance reports, not makes (501 `unsupported`: none of
# the model's backends serves the endpoint).
BACKEND_CODES = frozenset(("backend_unreachable", "backend_error", "backend_timeout", "no_healthy_backend",
                           "backend_overloaded", "unsupported"))
# Operations whose every field the appliance itself validates: a case the document calls invalid must get a
# 4xx. Proxied requests are judged by their backend (unknown and invalid fields pass through, by design).
OWN_VALIDATION = frozenset(("/admin/keys", "/admin/keys/{key_id}", "/admin/usage", "/admin/requests",
                            "/admin/debug/profile", "/v1/files", "/v1/batches",
                            "/v1/responses/{response_id}/input_items", "/v1/providers", "/admin/templates",
                            "/admin/templates/{template_id}", "/admin/templates/{template_id}/versions"))


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory, fake_openai: FakeOpenAI, fake_ollama: FakeOllama,
           fake_anthropic: FakeAnthropic) -> Iterator[Appliance]:
    """Its own appliance: the fuzzer creates keys, files and batches the shared one should not see."""
    config = {
        "discovery": {"enabled": False},
        "backends": [
            {"name": "fake", "url": fake_openai.url + "/v1", "api_key": "sk-backend-secret",
             "capabilities": ["chat", "completions", "embeddings", "rerank", "moderations", "images", "audio"]},
            {"name": "ollama", "type": "ollama", "url": fake_ollama.url},
            {"name": "anthropic", "type": "anthropic", "url": fake_anthropic.url, "api_key": ANTHROPIC_KEY},
            {"name": "down", "url": f"http://127.0.0.1:{free_port()}/v1", "discover": False,
             "models": ["down-model"]},
        ],
        "models": [{"name": "chat", "target": "fake/fake-chat"}],
        # The router decides (the fake's embeddings are all alike: price and order decide) and answers.
        "embeddings": {"model": "fake/fake-embed"},
        "router": {"profiles": [{"name": "chat", "model": "chat", "description": "Anything at all."},
                                {"name": "tools", "model": "fake-tools", "examples": ["What is the weather?"]}]},
    }
    app = Appliance(tmp_path_factory.mktemp("fuzz"), config)
    app.start()
    app.wait_ready()
    yield app
    app.stop()


@pytest.fixture(scope="module")
def existing(target: Appliance) -> dict[str, str]:
    """One object of each kind, for the path parameters that name them: path parameter -> id."""
    with httpx.Client(base_url=target.url, headers=AUTH, timeout=30) as http:

        def made(response: httpx.Response) -> str:
            assert response.status_code in (200, 201), response.text
            return response.json()["id"]

        file_id = made(http.post("/v1/files", data={"purpose": "batch"}, files={"file": ("in.jsonl", _batch_line())}))
        return {
            "file_id": file_id,
            "batch_id": made(http.post("/v1/batches", json={"input_file_id": file_id, "completion_window": "24h",
                                                           "endpoint": "/v1/chat/completions"})),
            "response_id": made(http.post("/v1/responses", json={"model": "fake-chat", "input": "Hi"})),
            "key_id": made(http.post("/admin/keys", json={"name": "fuzzed", "role": "user"})),
            "template_id": made(http.post("/admin/templates", json={
                "id": "fuzzed", "messages": [{"role": "system", "content": "About {{topic}}."}],
                "variables": {"topic": {"default": "anything"}}})),
            "model": "fake-chat",
            "backend": "fake",  # /proxy/{backend}/{path}: a path the fake serves
            "path": "v1/chat/completions",
        }


def _batch_line() -> bytes:
    return json.dumps({"custom_id": "1", "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": "fake-chat", "messages": [{"role": "user", "content": "Hi"}]}}).encode()


@pytest.fixture(scope="module")
def document(target: Appliance) -> dict[str, Any]:
    """The document as the appliance serves it, read without a key (it is public)."""
    response = httpx.get(target.url + "/openapi.json", timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def api(document: dict[str, Any]) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_dict(document)


@schemathesis.check
def no_5xx_of_our_own(ctx: schemathesis.CheckContext, response: schemathesis.Response,
                      case: schemathesis.Case) -> bool | None:
    """A 5xx only where a backend failed: the appliance tried one, or names the backend failure."""
    if response.status_code < 500 or "x-appliance-attempts" in response.headers:
        return None
    try:
        body = json.loads(response.content)
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and (error.get("code") in BACKEND_CODES or error.get("type") == "overloaded_error"):
        return None
    raise AssertionError(f"{response.status_code} of the appliance's own making: {response.content[:500]!r}")


CHECKS = [no_5xx_of_our_own, status_code_conformance, content_type_conformance, response_schema_conformance]


def _steer(case: schemathesis.Case, model: str | None, use_existing: bool, existing: dict[str, str],
           positive: bool) -> None:
    """Point the case at a model the fakes answer and at objects that exist (some of the time); a query's
    model only in a valid case (an invalid one must stay invalid); keep a profile that would be taken to its
    shortest (it answers after ``seconds``: up to a minute)."""
    if model is not None and isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = model
    if model is not None and positive and case.query and "model" in case.query:
        case.query["model"] = model
    if case.path == "/admin/debug/profile" and isinstance(case.query, dict) and _waits(case.query.get("seconds")):
        case.query["seconds"] = 1
    if use_existing and case.path_parameters:
        for name in case.path_parameters:
            if name in existing:
                case.path_parameters[name] = existing[name]


def _waits(value: Any) -> bool:
    """A ``seconds`` the appliance takes (so it would wait that long); an invalid one stays, to be refused."""
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    return isinstance(text, str) and text.isascii() and text.isdigit() and 1 <= int(text) <= 60


@pytest.fixture(scope="module")
def tally() -> Counter[str]:
    """Cases sent, per generation mode, over the module."""
    return Counter()


def fuzz(operation: schemathesis.APIOperation, target: Appliance, existing: dict[str, str], examples: int,
         tally: Counter[str], seed: int | None = None) -> None:
    """``examples`` cases of each generation mode against one operation; the first failure raises.

    Without a seed, Hypothesis derives one from the test: the same cases on every run.
    """
    checks = list(CHECKS)
    if operation.path in OWN_VALIDATION:
        checks.append(negative_data_rejection)

    def send(case: schemathesis.Case, mode: schemathesis.GenerationMode, model: str | None,
             use_existing: bool) -> None:
        _steer(case, model, use_existing, existing, positive=mode is schemathesis.GenerationMode.POSITIVE)
        tally[mode.value] += 1
        # Streams too: schemathesis checks each event, and its data against the event's contentSchema.
        case.call_and_validate(base_url=target.url, headers=AUTH, checks=checks, timeout=30)

    for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
        run = settings(max_examples=examples, database=None, deadline=None, derandomize=seed is None,
                       suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])(
            given(case=operation.as_strategy(generation_mode=mode), mode=st.just(mode),
                  model=st.sampled_from(MODELS), use_existing=st.booleans())(send))
        try:
            (run if seed is None else hypothesis.seed(seed)(run))()
        except hypothesis.errors.Unsatisfiable:
            if mode is schemathesis.GenerationMode.POSITIVE:
                raise  # a negative case needs something to get wrong: /health takes no input at all


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_bounded(api: schemathesis.BaseSchema, target: Appliance,
                 existing: dict[str, str], tally: Counter[str], method: str, path: str) -> None:
    fuzz(api[path][method], target, existing, BOUNDED_EXAMPLES, tally)


@pytest.mark.fuzz
@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_long(api: schemathesis.BaseSchema, target: Appliance,
              existing: dict[str, str], tally: Counter[str], method: str, path: str) -> None:
    fuzz(api[path][method], target, existing, LONG_EXAMPLES, tally, seed=LONG_SEED)


def test_every_operation_is_fuzzed(document: dict[str, Any]) -> None:
    # HEAD answers as GET does, without a body: nothing more to fuzz there.
    served = {(method.upper(), path) for path, item in document["paths"].items() for method in item
              if method != "head"}
    assert served == set(OPERATIONS)


def _ran_and_left_no_traceback(target: Appliance, tally: Counter[str], least: int) -> None:
    """Runs after the fuzzing above (pytest keeps a module's order): it ran, and nothing failed unseen (say
    mid-stream, after a 200 went out)."""
    print(f"fuzz cases: {dict(tally)}")  # shown with -s: the figure tests/perf/README.md quotes
    if tally:  # empty when the fuzzing tests were deselected (-k)
        assert tally["positive"] >= least and tally["negative"] >= least // 2, dict(tally)
    log = target.log()
    assert "Traceback" not in log and "unhandled error" not in log, log[-5000:]


def test_bounded_run_left_no_traceback(target: Appliance, tally: Counter[str]) -> None:
    _ran_and_left_no_traceback(target, tally, least=100)


@pytest.mark.fuzz
def test_long_run_left_no_traceback(target: Appliance, tally: Counter[str]) -> None:
    _ran_and_left_no_traceback(target, tally, least=LONG_EXAMPLES)


@pytest.mark.frozen  # the one-file build must carry openai.json (build/appliance.spec)
def test_document_is_public(target: Appliance) -> None:
    response = httpx.get(target.url + "/openapi.json", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    document = response.json()
    assert document["openapi"].startswith("3.1") and "/v1/chat/completions" in document["paths"]
    assert "CreateChatCompletionRequest" in document["components"]["schemas"]  # the vendored OpenAI part
    assert httpx.get(target.url + "/v1/models", timeout=10).status_code == 401  # keys are on: public by design
