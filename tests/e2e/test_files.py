"""/v1/files with the official openai SDK (spec conformance F1-F7), 2 workers, plus upload limits.

One private appliance serves the module (small file limits, so the 413 needs no huge upload). Each test
makes its own user key, so listings hold only that test's files.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import base_config
from tests.support.appliance import ADMIN_KEY, Appliance
from tests.support.engines import ENGINES, database_config

pytestmark = pytest.mark.frozen

MAX_BYTES = 2 * 1024 * 1024
BATCH_MAX_BYTES = 1024 * 1024
LINES = b"".join(b'{"custom_id": "r%d", "method": "POST", "url": "/v1/chat/completions", '
                 b'"body": {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}}\n' % i
                 for i in range(3))


@pytest.fixture(scope="module", params=ENGINES)
def app(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, fake_openai: Any,
        fake_ollama: Any, llamacpp_port: int) -> Iterator[Appliance]:
    config = base_config(fake_openai, fake_ollama, llamacpp_port)
    config["files"] = {"max_bytes": MAX_BYTES, "batch_max_bytes": BATCH_MAX_BYTES}
    config.update(database_config(request, "e2e_files"))
    app = Appliance(tmp_path_factory.mktemp("files"), config)
    app.start()
    yield app
    app.stop()


def user_client(app: Appliance) -> openai.OpenAI:
    status, body, _ = app.post("/admin/keys", {"name": "files-test", "role": "user"})
    assert status == 201, body
    return openai.OpenAI(base_url=app.url + "/v1", api_key=body["key"], max_retries=0, timeout=30)


@pytest.fixture
def client(app: Appliance) -> openai.OpenAI:
    return user_client(app)


def test_f1_upload_and_retrieve(client: openai.OpenAI) -> None:
    created = client.files.create(file=("in.jsonl", LINES), purpose="batch")
    assert created.id.startswith("file-") and created.object == "file"
    assert created.bytes == len(LINES) and created.filename == "in.jsonl"
    assert created.purpose == "batch" and created.status == "processed"
    assert abs(created.created_at - time.time()) <= 5
    assert created.expires_at == created.created_at + 2592000
    assert client.files.retrieve(created.id) == created
    started = time.monotonic()
    assert client.files.wait_for_processing(created.id).status == "processed"
    assert time.monotonic() - started < 2


def test_f2_expiry_options(client: openai.OpenAI) -> None:
    kept = client.files.create(file=("notes.txt", b"x"), purpose="user_data")
    assert kept.expires_at is None
    hour = client.files.create(file=("notes.txt", b"x"), purpose="user_data",
                               expires_after={"anchor": "created_at", "seconds": 3600})
    assert hour.expires_at == hour.created_at + 3600
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=("notes.txt", b"x"), purpose="user_data",
                            expires_after={"anchor": "created_at", "seconds": 100})
    assert caught.value.body["type"] == "invalid_request_error"
    assert caught.value.body["param"] == "expires_after"


@pytest.mark.parametrize(("expires_after", "expected"), [
    ({"anchor": "created_at", "seconds": 7200}, 7200),
    ({"anchor": "created_at"}, "expires_after"),  # found by the fuzzer: silently kept forever before
    ({"anchor": "created_at", "seconds": "7200"}, "expires_after"),
    ({"anchor": "updated_at", "seconds": 7200}, "expires_after"),
    ([3600], "expires_after"),
])
def test_f2_expiry_as_one_json_part(app: Appliance, expires_after: Any, expected: int | str) -> None:
    """expires_after as /openapi.json's clients send an object in a multipart body: one application/json part."""
    uploaded = httpx.post(app.url + "/v1/files", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, files={
        "purpose": (None, "user_data"), "expires_after": (None, json.dumps(expires_after), "application/json"),
        "file": ("notes.txt", b"x")})
    if isinstance(expected, int):
        assert uploaded.status_code == 200, uploaded.text
        assert uploaded.json()["expires_at"] == uploaded.json()["created_at"] + expected
    else:
        assert uploaded.status_code == 400, uploaded.text
        assert uploaded.json()["error"]["param"] == expected


def test_f3_upload_errors(app: Appliance, client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=("in.jsonl", LINES), purpose="bogus")  # type: ignore[arg-type]
    assert caught.value.body["param"] == "purpose"
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=("in.txt", LINES), purpose="batch")
    assert caught.value.body["param"] == "file" and caught.value.body["code"] == "invalid_file_format"
    no_file = httpx.post(app.url + "/v1/files", data={"purpose": "batch"}, files={"other": ("x", b"1")},
                         headers={"Authorization": f"Bearer {client.api_key}"})
    assert no_file.status_code == 400 and no_file.json()["error"]["param"] == "file"
    not_multipart = httpx.post(app.url + "/v1/files", json={"purpose": "batch"},
                               headers={"Authorization": f"Bearer {client.api_key}"})
    assert not_multipart.status_code == 400
    assert set(not_multipart.json()["error"]) >= {"message", "type", "param", "code"}


def test_f4_content_round_trip(client: openai.OpenAI) -> None:
    original = os.urandom(300 * 1024)
    created = client.files.create(file=("blob.bin", original), purpose="user_data")
    assert client.files.content(created.id).content == original
    raw = b"\xef\xbb\xbf" + LINES.replace(b"\n", b"\r\n")
    jsonl = client.files.create(file=("bom.jsonl", raw), purpose="batch")
    response = client.files.with_raw_response.content(jsonl.id)
    assert response.content == raw
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.headers["content-disposition"] == 'attachment; filename="bom.jsonl"'


def test_f5_list_and_pages(client: openai.OpenAI) -> None:
    ids = []
    for i in range(3):
        ids.append(client.files.create(file=(f"in{i}.jsonl", LINES), purpose="batch").id)
        time.sleep(1.05)  # distinct created_at seconds, so the order is by time, not only by id
    client.files.create(file=("other.txt", b"x"), purpose="user_data")
    page = client.files.list(purpose="batch", order="asc", limit=2)
    assert len(page.data) == 2 and page.has_more is True
    assert [f.id for f in page] == ids  # the pager follows `after` to the end
    assert [f.id for f in client.files.list(purpose="batch", order="desc")] == ids[::-1]
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.list(limit=0)
    assert caught.value.body["param"] == "limit"
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.list(order="sideways")  # type: ignore[arg-type]
    assert caught.value.body["param"] == "order"
    empty = client.files.list(purpose="vision")
    assert empty.data == [] and empty.has_more is False


def test_f6_delete(client: openai.OpenAI) -> None:
    created = client.files.create(file=("in.jsonl", LINES), purpose="batch")
    deleted = client.files.delete(created.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (created.id, "file", True)
    for call in (client.files.retrieve, client.files.content, client.files.delete):
        with pytest.raises(openai.NotFoundError) as caught:
            call(created.id)
        assert caught.value.body["message"] == f"No such File object: {created.id}"
        assert caught.value.body["param"] == "id"


def test_f7_isolation_and_auth(app: Appliance, client: openai.OpenAI) -> None:
    created = client.files.create(file=("in.jsonl", LINES), purpose="batch")
    other = user_client(app)
    for call in (other.files.retrieve, other.files.content, other.files.delete):
        with pytest.raises(openai.NotFoundError):
            call(created.id)
    assert created.id not in [f.id for f in other.files.list()]
    admin = openai.OpenAI(base_url=app.url + "/v1", api_key=ADMIN_KEY, max_retries=0)
    assert admin.files.retrieve(created.id).id == created.id  # admin keys see every file
    wrong = openai.OpenAI(base_url=app.url + "/v1", api_key="sk-app-wrong-key-000000000000000000", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        wrong.files.list()
    assert caught.value.body["code"] == "invalid_api_key"


def test_size_limits_answer_413_in_the_envelope(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        client.files.create(file=("big.bin", b"x" * (MAX_BYTES + 1)), purpose="user_data")
    assert caught.value.status_code == 413
    assert caught.value.body["code"] == "file_too_large" and caught.value.body["param"] == "file"
    with pytest.raises(openai.APIStatusError) as caught:
        client.files.create(file=("big.jsonl", b"x" * (BATCH_MAX_BYTES + 1)), purpose="batch")
    assert caught.value.status_code == 413
    assert client.files.create(file=("ok.bin", b"x" * MAX_BYTES), purpose="user_data").bytes == MAX_BYTES


def test_upload_with_curl_style_field_order(app: Appliance, client: openai.OpenAI) -> None:
    """The file part first, purpose after (curl -F keeps the command line's order)."""
    body = (b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"late.jsonl\"\r\n"
            b"Content-Type: application/octet-stream\r\n\r\n" + LINES + b"\r\n--XyZ\r\n"
            b"Content-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--XyZ--\r\n")
    response = httpx.post(app.url + "/v1/files", content=body, headers={
        "Authorization": f"Bearer {client.api_key}", "Content-Type": "multipart/form-data; boundary=XyZ"})
    assert response.status_code == 200, response.text
    assert client.files.content(response.json()["id"]).content == LINES
