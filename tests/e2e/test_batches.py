"""/v1/batches with the official openai SDK against the fakes (spec conformance B1-B9, B12), 2 workers.

One private appliance serves the module: its batch caps are per backend (``fake`` 2, ``fake1`` 1: the same
fake server under another name), and the runner polls often so short batches end quickly.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import base_config
from tests.support.appliance import ADMIN_KEY, Appliance
from tests.support.batches import CHAT_URL, TERMINAL, line, lines_of, poll, upload
from tests.support.engines import ENGINES, database_config
from tests.support.ledger import rows_where

pytestmark = pytest.mark.frozen



@pytest.fixture(scope="module", params=ENGINES)
def app(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, fake_openai: Any,
        fake_ollama: Any, llamacpp_port: int) -> Iterator[Appliance]:
    config = base_config(fake_openai, fake_ollama, llamacpp_port)
    config.update(database_config(request, "e2e_batches"))
    config["backends"] = [*config["backends"], {"name": "fake1", "url": fake_openai.url + "/v1"}]
    config["batches"] = {"poll_interval_s": 0.1, "backend_concurrency": {"fake": 2, "fake1": 1}}
    app = Appliance(tmp_path_factory.mktemp("batches"), config)
    app.start()
    app.wait_ready()
    yield app
    app.stop()


def user_client(app: Appliance, **fields: Any) -> openai.OpenAI:
    status, body, _ = app.post("/admin/keys", {"name": "batches-test", "role": "user", **fields})
    assert status == 201, body
    return openai.OpenAI(base_url=app.url + "/v1", api_key=body["key"], max_retries=0, timeout=30)


@pytest.fixture
def client(app: Appliance) -> openai.OpenAI:
    return user_client(app)


def chat_body(model: str = "fake/fake-chat", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


def test_b1_happy_path(client: openai.OpenAI, app: Appliance) -> None:
    file_id = upload(client, [line(f"r{i}", chat_body()) for i in range(3)])
    batch = client.batches.create(input_file_id=file_id, endpoint=CHAT_URL, completion_window="24h",
                                  metadata={"k": "v"})
    assert batch.status == "validating" and batch.object == "batch" and batch.endpoint == CHAT_URL
    assert batch.completion_window == "24h" and batch.metadata == {"k": "v"}
    assert batch.expires_at == batch.created_at + 86400
    assert batch.request_counts.total == 0 and batch.output_file_id is None
    done = poll(client, batch.id)
    assert done.status == "completed", done
    counts = done.request_counts
    assert (counts.total, counts.completed, counts.failed) == (3, 3, 0)
    assert done.model == "fake/fake-chat" and done.error_file_id is None
    assert done.created_at <= done.in_progress_at <= done.finalizing_at <= done.completed_at
    assert done.usage.total_tokens > 0 and done.usage.input_tokens == 33
    output = client.files.retrieve(done.output_file_id)
    assert output.purpose == "batch_output" and output.filename == f"{batch.id}_output.jsonl"
    results = lines_of(client, done.output_file_id)
    assert [r["custom_id"] for r in results] == ["r0", "r1", "r2"]
    for result in results:
        assert result["id"].startswith("batch_req_") and result["error"] is None
        assert result["response"]["status_code"] == 200 and result["response"]["request_id"]
        assert result["response"]["body"]["object"] == "chat.completion"
    # the ledger rows of the lines name the batch
    assert len(rows_where(app, "batch_id = ?", (batch.id,), count=3)) == 3


def test_b2_embeddings_routed_to_ollama(client: openai.OpenAI, fake_ollama: Any) -> None:
    url = "/v1/embeddings"
    file_id = upload(client, [line("one", {"model": "all-minilm", "input": "a"}, url),
                              line("two", {"model": "all-minilm", "input": ["b", "c"]}, url)])
    seen_before = len(fake_ollama.requests)
    done = poll(client, client.batches.create(input_file_id=file_id, endpoint=url, completion_window="24h").id)
    assert done.status == "completed", done
    results = {r["custom_id"]: r["response"]["body"] for r in lines_of(client, done.output_file_id)}
    for custom_id, n in (("one", 1), ("two", 2)):
        body = results[custom_id]
        assert body["object"] == "list" and len(body["data"]) == n
        assert all(isinstance(x, float) for item in body["data"] for x in item["embedding"])
    assert any(seen.path == "/api/embed" for seen in fake_ollama.requests[seen_before:])


def test_b3_create_time_validation(client: openai.OpenAI) -> None:
    file_id = upload(client, [line("r1", chat_body())])
    other = client.files.create(file=("x.txt", b"{}"), purpose="user_data").id
    before = [b.id for b in client.batches.list()]
    cases = [
        ({"endpoint": "/v1/foo"}, openai.BadRequestError, "endpoint"),
        ({"extra_body": {"completion_window": "48h"}}, openai.BadRequestError, "completion_window"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, openai.BadRequestError, "metadata"),
        ({"input_file_id": other}, openai.BadRequestError, "input_file_id"),
        ({"input_file_id": "file-doesnotexist"}, openai.NotFoundError, "input_file_id"),
    ]
    for change, error, param in cases:
        args = {"input_file_id": file_id, "endpoint": CHAT_URL, "completion_window": "24h", **change}
        with pytest.raises(error) as caught:
            client.batches.create(**args)
        assert caught.value.body["param"] == param, change
        assert caught.value.body["type"] == "invalid_request_error"
    assert [b.id for b in client.batches.list()] == before


@pytest.mark.parametrize(("content", "code", "line_no", "param"), [
    (b"".join(json.dumps(line(c, chat_body())).encode() + b"\n" for c in ("a", "a")), "duplicate_custom_id", 2,
     "custom_id"),
    (b"".join(json.dumps(line(c, chat_body())).encode() + b"\n" for c in ("a", "b")) + b"{not json\n",
     "invalid_json_line", 3, None),
    (json.dumps(line("a", chat_body(), "/v1/embeddings")).encode() + b"\n", "url_mismatch", 1, "url"),
    (b"", "empty_file", None, None),
    (json.dumps(line("a", chat_body(stream=True))).encode() + b"\n", "streaming_unsupported", 1, "body.stream"),
    (json.dumps(line("a", {"messages": []})).encode() + b"\n", "invalid_request", 1, "body.model"),
    (json.dumps({"custom_id": "a", "url": CHAT_URL, "body": chat_body()}).encode() + b"\n",
     "missing_required_parameter", 1, "method"),
])
def test_b4_content_validation(client: openai.OpenAI, content: bytes, code: str, line_no: int | None,
                               param: str | None) -> None:
    batch = client.batches.create(input_file_id=upload(client, content), endpoint=CHAT_URL, completion_window="24h")
    done = poll(client, batch.id)
    assert done.status == "failed" and done.failed_at is not None and done.in_progress_at is None
    assert done.request_counts.total == 0 and done.output_file_id is None
    error = done.errors.data[0]
    assert (error.code, error.line, error.param) == (code, line_no, param)


def test_b5_model_rules(app: Appliance, client: openai.OpenAI) -> None:
    mixed = upload(client, [line("a", chat_body()), line("b", chat_body("chat"))])
    done = poll(client, client.batches.create(input_file_id=mixed, endpoint=CHAT_URL, completion_window="24h").id)
    assert done.status == "failed"
    assert (done.errors.data[0].code, done.errors.data[0].param) == ("model_mismatch", "body.model")
    unknown = upload(client, [line("a", chat_body("no-such-model"))])
    done = poll(client, client.batches.create(input_file_id=unknown, endpoint=CHAT_URL, completion_window="24h").id)
    assert done.status == "failed" and done.errors.data[0].code == "model_not_found"
    # a model the key may not use is "not found" for it too
    scoped = user_client(app, models=["fake/fake-embed"])
    allowed_not = upload(scoped, [line("a", chat_body())])
    done = poll(scoped, scoped.batches.create(input_file_id=allowed_not, endpoint=CHAT_URL,
                                              completion_window="24h").id)
    assert done.status == "failed" and done.errors.data[0].code == "model_not_found"


def test_b6_per_line_http_failure(client: openai.OpenAI) -> None:
    file_id = upload(client, [line("a", chat_body()), line("b", chat_body(fake_status=400)), line("c", chat_body())])
    done = poll(client, client.batches.create(input_file_id=file_id, endpoint=CHAT_URL, completion_window="24h").id)
    assert done.status == "completed"
    counts = done.request_counts
    assert (counts.total, counts.completed, counts.failed) == (3, 2, 1)
    errors = lines_of(client, done.error_file_id)
    assert len(errors) == 1 and errors[0]["custom_id"] == "b" and errors[0]["error"] is None
    assert errors[0]["response"]["status_code"] == 400 and errors[0]["response"]["body"]["error"]["message"]
    all_bad = upload(client, [line(c, chat_body("fake/fake-400")) for c in ("a", "b")])
    done = poll(client, client.batches.create(input_file_id=all_bad, endpoint=CHAT_URL, completion_window="24h").id)
    assert done.status == "completed" and done.output_file_id is None and done.error_file_id is not None


def test_b7_cancel_in_progress(client: openai.OpenAI) -> None:
    ids = [f"r{i}" for i in range(20)]
    file_id = upload(client, [line(c, chat_body("fake1/fake-slow-500")) for c in ids])
    batch = client.batches.create(input_file_id=file_id, endpoint=CHAT_URL, completion_window="24h")
    deadline = time.monotonic() + 30
    while client.batches.retrieve(batch.id).request_counts.completed < 2:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at is not None
    done = poll(client, batch.id)
    assert done.status == "cancelled" and done.cancelled_at is not None
    counts = done.request_counts
    assert counts.completed + counts.failed == counts.total == 20
    assert 2 <= counts.completed < 20
    finished = lines_of(client, done.output_file_id)
    cancelled = lines_of(client, done.error_file_id)
    assert all(r["response"]["status_code"] == 200 for r in finished)
    assert all(r["response"] is None and r["error"]["code"] == "batch_cancelled" for r in cancelled)
    assert sorted(r["custom_id"] for r in finished + cancelled) == sorted(ids)
    assert client.batches.cancel(batch.id).status == "cancelled"


def test_b8_cancel_a_terminal_batch(client: openai.OpenAI) -> None:
    file_id = upload(client, [line("a", chat_body())])
    done = poll(client, client.batches.create(input_file_id=file_id, endpoint=CHAT_URL, completion_window="24h").id)
    with pytest.raises(openai.ConflictError) as caught:
        client.batches.cancel(done.id)
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert caught.value.body["code"] == "batch_not_cancellable"
    with pytest.raises(openai.NotFoundError):
        client.batches.cancel("batch_nope")


def test_b9_list_and_retrieve(app: Appliance, client: openai.OpenAI) -> None:
    file_id = upload(client, [line("a", chat_body())])
    made = []
    for _ in range(3):
        made.append(client.batches.create(input_file_id=file_id, endpoint=CHAT_URL, completion_window="24h").id)
        time.sleep(1.05)  # distinct created_at seconds
    page = client.batches.list(limit=2)
    assert [b.id for b in page.data] == made[::-1][:2] and page.has_more is True
    assert [b.id for b in client.batches.list(limit=2)] == made[::-1]  # auto-pagination: each once
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_" + "0" * 32)
    other = user_client(app)
    assert other.batches.list().data == []
    with pytest.raises(openai.NotFoundError):
        other.batches.retrieve(made[0])
    admin = openai.OpenAI(base_url=app.url + "/v1", api_key=ADMIN_KEY, max_retries=0)
    assert admin.batches.retrieve(made[0]).id == made[0]
    for batch_id in made:
        poll(client, batch_id)


def test_b12_concurrency_cap_and_interactive_priority(client: openai.OpenAI, fake_openai: Any) -> None:
    fake_openai.batch_max_in_flight = 0
    file_id = upload(client, [line(f"r{i}", chat_body("fake/fake-slow-200")) for i in range(40)])
    batch = client.batches.create(input_file_id=file_id, endpoint=CHAT_URL, completion_window="24h")
    poll(client, batch.id, until={"in_progress"} | TERMINAL)
    waits: list[float] = []
    errors: list[BaseException] = []

    def interactive() -> None:
        try:
            started = time.monotonic()
            response = httpx.post(client.base_url.join("chat/completions").__str__(), json=chat_body(),
                                  headers={"Authorization": f"Bearer {client.api_key}"}, timeout=30)
            assert response.status_code == 200, response.text
            waits.append(time.monotonic() - started)
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=interactive) for _ in range(10)]
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    for thread in threads:
        thread.join()
    assert not errors, errors
    done = poll(client, batch.id)
    assert done.status == "completed" and done.request_counts.completed == 40
    assert 1 <= fake_openai.batch_max_in_flight <= 2
    assert len(waits) == 10  # every interactive call was answered while the batch ran


def test_cli_lists_shows_and_cancels_while_serving(app: Appliance, client: openai.OpenAI) -> None:
    ids = [f"r{i}" for i in range(20)]
    batch = client.batches.create(input_file_id=upload(client, [line(c, chat_body("fake1/fake-slow-500"))
                                                                for c in ids]),
                                  endpoint=CHAT_URL, completion_window="24h")
    poll(client, batch.id, until={"in_progress"} | TERMINAL)
    listed = app.cli("batches", "list", "--status", "in_progress")
    assert listed.returncode == 0, listed.stderr
    assert batch.id in listed.stdout and "in_progress" in listed.stdout
    shown = app.cli("batches", "show", batch.id)
    assert shown.returncode == 0 and json.loads(shown.stdout)["id"] == batch.id
    cancelled = app.cli("batches", "cancel", batch.id)
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout.split() in ([batch.id, "cancelling"], [batch.id, "cancelled"])
    done = poll(client, batch.id)
    assert done.status == "cancelled" and done.request_counts.total == 20
    again = app.cli("batches", "cancel", batch.id)
    assert again.returncode == 0 and again.stdout.split() == [batch.id, "cancelled"]
    finished = app.cli("batches", "cancel", poll(client, client.batches.create(
        input_file_id=upload(client, [line("a", chat_body())]), endpoint=CHAT_URL, completion_window="24h").id).id)
    assert finished.returncode == 1 and "Cannot cancel a batch with status 'completed'" in finished.stderr
    unknown = app.cli("batches", "list", "--status", "bogus")
    assert unknown.returncode == 1 and "--status" in unknown.stderr
    missing = app.cli("batches", "show", "batch_nope")
    assert missing.returncode == 1 and "No such Batch object: batch_nope" in missing.stderr


@pytest.mark.llamacpp
def test_200_lines_against_the_real_server(app: Appliance, client: openai.OpenAI, llamacpp_url: str) -> None:
    """The issue's batch: 200 lines on the real llama.cpp server (tiny model), progress on /statsz meanwhile."""
    app.wait_ready()
    ids = [f"line-{i:03d}" for i in range(200)]
    body = {"model": "tiny-chat", "max_tokens": 4, "temperature": 0}
    file_id = upload(client, [line(c, {**body, "messages": [{"role": "user", "content": f"Count to {i}."}]})
                              for i, c in enumerate(ids)])
    batch = client.batches.create(input_file_id=file_id, endpoint=CHAT_URL, completion_window="24h")
    seen_running = None
    deadline = time.monotonic() + 300
    while (current := client.batches.retrieve(batch.id)).status not in TERMINAL:
        assert time.monotonic() < deadline, current
        if current.status == "in_progress" and current.request_counts.completed and seen_running is None:
            status, stats, _ = app.get("/statsz")
            assert status == 200
            seen_running = next((b for b in stats["batches"]["active"] if b["id"] == batch.id), None)
        time.sleep(0.3)
    assert current.status == "completed", current
    assert (current.request_counts.total, current.request_counts.completed, current.request_counts.failed) == \
        (200, 200, 0)
    assert seen_running is not None and seen_running["status"] == "in_progress"
    assert seen_running["request_counts"]["total"] == 200 and seen_running["request_counts"]["completed"] > 0
    results = lines_of(client, current.output_file_id)
    assert sorted(r["custom_id"] for r in results) == ids  # exactly one line per custom_id
    for result in results:
        answer = result["response"]["body"]
        assert result["response"]["status_code"] == 200 and answer["object"] == "chat.completion"
        assert answer["usage"]["completion_tokens"] <= 4 and answer["choices"][0]["message"]["role"] == "assistant"
    status, stats, _ = app.get("/statsz")
    assert stats["batches"]["by_status"].get("completed", 0) >= 1
    assert all(b["id"] != batch.id for b in stats["batches"]["active"])


def test_responses_lines(client: openai.OpenAI) -> None:
    """/v1/responses batches: each line through the Responses surface, its answer a Response object."""
    url = "/v1/responses"
    lines = [line(f"r{i}", {"model": "fake/fake-chat", "input": f"Say {i}", "max_output_tokens": 16}, url)
             for i in range(3)]
    done = poll(client, client.batches.create(input_file_id=upload(client, lines), endpoint=url,
                                              completion_window="24h").id)
    assert done.status == "completed" and done.endpoint == url, done
    assert (done.request_counts.completed, done.request_counts.failed) == (3, 0)
    results = lines_of(client, done.output_file_id)
    assert sorted(r["custom_id"] for r in results) == ["r0", "r1", "r2"]
    for result in results:
        response = result["response"]["body"]
        assert result["response"]["status_code"] == 200
        assert response["object"] == "response" and response["id"].startswith("resp_")
        assert response["status"] == "completed" and response["output"][0]["type"] == "message"
        assert response["usage"]["input_tokens"] > 0
    chat_line = [line("c", chat_body())]
    wrong = poll(client, client.batches.create(input_file_id=upload(client, chat_line), endpoint=url,
                                               completion_window="24h").id)
    assert wrong.status == "failed" and wrong.errors.data[0].code == "url_mismatch"  # a chat line in a Responses batch
