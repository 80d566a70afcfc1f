"""Two appliances (2 workers each) on one PostgreSQL and one shared files dir: what one node records, the other
sees. Each node has its own data dir (journal, vault, locks), as two hosts would.
"""

from __future__ import annotations

import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import base_config
from tests.support.appliance import ADMIN_KEY, Appliance, appliance_cmd
from tests.support.batches import poll
from tests.support.engines import Engine, create_database, start_postgres
from tests.support.ledger import query
from tests.support.polling import eventually


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, postgres_engine: Engine) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("pg-shared")
    return {"database": {"url": create_database(postgres_engine, "two_nodes"), "pool_size": 2},
            "files": {"dir": str(root / "files")}}


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory, shared: dict[str, Any], fake_openai: Any, fake_ollama: Any,
          llamacpp_port: int) -> Iterator[tuple[Appliance, Appliance]]:
    config = {**base_config(fake_openai, fake_ollama, llamacpp_port), **shared}
    a = Appliance(tmp_path_factory.mktemp("node-a"), config)
    b = Appliance(tmp_path_factory.mktemp("node-b"), config)
    a.start()
    b.start()  # a second start on a migrated database: nothing to apply, the same admin key
    yield a, b
    a.stop()
    b.stop()


def client(app: Appliance, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=app.url + "/v1", api_key=key, max_retries=0, timeout=30)


def new_key(app: Appliance, name: str) -> dict[str, Any]:
    status, body, _ = app.post("/admin/keys", {"name": name, "role": "user"})
    assert status == 201, body
    return body


def test_a_key_created_on_one_node_works_on_the_other(nodes: tuple[Appliance, Appliance]) -> None:
    a, b = nodes
    made = new_key(a, "made-on-a")
    reply = client(b, made["key"]).chat.completions.create(model="chat",
                                                           messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content
    listed = httpx.get(b.url + "/admin/keys", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()
    assert made["id"] in {key["id"] for key in listed["data"]}


def test_usage_from_both_nodes_lands_in_one_ledger(nodes: tuple[Appliance, Appliance]) -> None:
    a, b = nodes
    key = new_key(a, "usage-both")
    ok = 0
    for i in range(12):
        node = (a, b)[i % 2]
        reply = client(node, key["key"]).chat.completions.with_raw_response.create(
            model="chat", messages=[{"role": "user", "content": f"count {i}"}])
        ok += reply.status_code == 200
    assert ok == 12

    def counted() -> None:
        rows = query(a, "SELECT count(*), count(DISTINCT id) FROM requests WHERE key_id = ? AND status = 200",
                     (key["id"],))
        usage = query(a, "SELECT sum(requests) FROM usage_daily WHERE key_id = ?", (key["id"],))
        assert tuple(rows[0]) == (ok, ok) and usage[0][0] == ok, (tuple(rows[0]), usage[0][0])

    eventually(counted)
    status, report, _ = b.get(f"/admin/usage?key={key['id']}&group_by=model")
    assert status == 200, report
    assert sum(row["requests"] for row in report["data"]) == ok


def test_a_file_uploaded_on_one_node_is_read_on_the_other(nodes: tuple[Appliance, Appliance],
                                                          shared: dict[str, Any]) -> None:
    a, b = nodes
    key = new_key(a, "files-both")["key"]
    content = b'{"custom_id": "x", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n'
    created = client(a, key).files.create(file=("in.jsonl", content), purpose="batch")
    assert client(b, key).files.retrieve(created.id).bytes == len(content)
    assert client(b, key).files.content(created.id).read() == content
    assert (Path(shared["files"]["dir"]) / created.id).read_bytes() == content
    assert not (a.data_dir / "files").exists() and not (b.data_dir / "files").exists()


def test_a_batch_made_on_one_node_is_seen_on_the_other(nodes: tuple[Appliance, Appliance]) -> None:
    a, b = nodes
    key = new_key(a, "batch-both")["key"]
    line = (b'{"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", '
            b'"body": {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}}\n')
    file_id = client(a, key).files.create(file=("in.jsonl", line), purpose="batch").id
    batch = client(a, key).batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                          completion_window="24h")

    finished = poll(client(b, key), batch.id)
    assert finished.status == "completed", finished
    assert finished.request_counts.completed == 1
    output = client(a, key).files.content(finished.output_file_id).read()
    assert b'"custom_id":"r1"' in output.replace(b" ", b"")


def test_a_template_made_on_one_node_is_used_on_the_other(nodes: tuple[Appliance, Appliance]) -> None:
    a, b = nodes
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    body = {"id": "pg-greeting", "messages": [{"role": "system", "content": "Greet {{name}}."}],
            "variables": {"name": {"default": "you"}}}
    status, made, _ = a.post("/admin/templates", body, headers=admin)
    assert status in (200, 201), made
    status, found, _ = b.get("/admin/templates/pg-greeting", headers=admin)
    assert status == 200 and found["id"] == "pg-greeting", found


def test_check_config_reports_the_schema(nodes: tuple[Appliance, Appliance]) -> None:
    a, _ = nodes
    checked = a.cli("check-config")
    assert checked.returncode == 0, checked.stderr
    assert "database: postgresql://" in checked.stderr and "PostgreSQL 15" in checked.stderr
    assert "schema at 0016_stream_failover.sql, 0 migrations pending" in checked.stderr


def test_backup_points_to_pg_dump(nodes: tuple[Appliance, Appliance], tmp_path: Path) -> None:
    a, _ = nodes
    done = a.cli("backup", str(tmp_path / "copy.db"))
    assert done.returncode == 1 and "pg_dump" in done.stderr
    assert not (tmp_path / "copy.db").exists()


def test_the_cli_works_on_the_shared_database(nodes: tuple[Appliance, Appliance]) -> None:
    a, b = nodes
    made = a.cli("keys", "create", "--name", "cli-on-pg", "--role", "user")
    assert made.returncode == 0, made.stderr
    secret = next(word for word in made.stdout.split() if word.startswith("sk-app-"))
    reply = client(b, secret).chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content
    listed = b.cli("keys", "list", "--json")
    assert listed.returncode == 0 and "cli-on-pg" in listed.stdout


def test_an_unreachable_database_stops_the_start_with_a_clear_error(tmp_path: Path, postgres_engine: Engine) -> None:
    gone = postgres_engine.url.rsplit("/", 1)[0] + "/never_created"
    app = Appliance(tmp_path / "node", {"discovery": {"enabled": False}, "database": {"url": gone}}, workers=1)
    served = subprocess.run([*appliance_cmd(), "serve", "--config", str(app.config_path)], cwd=app.root,
                            env=app.env, capture_output=True, text=True, timeout=60)
    assert served.returncode == 2 and "never_created" in served.stderr and "Traceback" not in served.stderr
    checked = app.cli("check-config")
    assert checked.returncode == 2 and "database: postgresql://" in checked.stderr
    assert "unreachable" in checked.stderr and "never_created" in checked.stderr
    listed = app.cli("keys", "list")
    assert listed.returncode == 1 and "never_created" in listed.stderr and "Traceback" not in listed.stderr


def test_answers_go_on_while_the_database_is_down_and_their_rows_land_after(
        tmp_path: Path, fake_openai: Any, fake_ollama: Any, llamacpp_port: int) -> None:
    engine = start_postgres(tmp_path / "pg", survives_kill=True)  # this test kills it: its own server
    try:
        config = {**base_config(fake_openai, fake_ollama, llamacpp_port), "auth": {"cache_ttl_s": 60},
                  "database": {"url": create_database(engine, "outage")}}
        app = Appliance(tmp_path / "node", config, workers=1)  # one worker: the key is in its cache
        app.start()
        try:
            key = new_key(app, "outage")
            user = client(app, key["key"])
            ask = [{"role": "user", "content": "before"}]
            assert user.chat.completions.with_raw_response.create(model="chat", messages=ask).status_code == 200
            engine.kill()
            for i in range(5):
                ask = [{"role": "user", "content": f"during {i}"}]
                assert user.chat.completions.with_raw_response.create(model="chat", messages=ask).status_code == 200
            unknown = httpx.post(app.url + "/v1/chat/completions", json={"model": "chat", "messages": ask},
                                 headers={"Authorization": "Bearer sk-app-" + "q" * 43}, timeout=30)
            assert unknown.status_code == 503, unknown.text
            assert unknown.json()["error"]["code"] == "database_unavailable"
            assert unknown.headers["x-request-id"]

            def degraded() -> None:
                _, ready, _ = app.get("/ready")
                assert "database writes failing" in ready.get("degraded", []), ready

            eventually(degraded)
            engine.start()

            def landed() -> None:
                try:
                    rows = query(app, "SELECT count(*) FROM requests WHERE key_id = ?", (key["id"],))
                except sqlite3.Error as exc:  # the server is still recovering from its kill
                    raise AssertionError(exc) from None
                assert rows[0][0] == 6, rows[0][0]

            eventually(landed, timeout=30)
        finally:
            app.stop()
    finally:
        engine.stop()
