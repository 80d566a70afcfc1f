"""Keys: hashing, lookup through the cache, expiry with an injected clock, roles and patterns."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from appliance.accounts import auth
from appliance.common.errors import GatewayError
from appliance.storage import keys_repo
from appliance.storage.db import Database
from tests.support.engines import on_database

Runner = Callable[[Path, Callable[[Database], Awaitable[Any]]], Any]


@pytest.fixture
def run(database_url: str | None) -> Runner:
    """Runs ``work`` on a migrated database of each engine (SQLite in ``tmp_path``, or PostgreSQL)."""

    def runner(tmp_path: Path, work: Callable[[Database], Awaitable[Any]]) -> Any:
        return on_database(tmp_path, database_url)(work)

    return runner


def test_keys_are_stored_only_as_hashes_and_found_again(tmp_path: Path, run: Runner) -> None:
    async def work(db: Database) -> None:
        row, secret = await auth.create_key(db, {"name": "a", "rpm": 5}, slots=16)
        assert secret.startswith("sk-app-") and len(secret) == 50
        assert secret not in str(await keys_repo.list_all(db))
        assert row["prefix"] == secret[:13] and row["hash"] != secret
        authenticator = auth.Authenticator(db, await keys_repo.install_secret(db), ttl_s=60)
        principal = await authenticator.authenticate(secret)
        assert principal.key_id == row["id"] and principal.rpm == 5 and principal.role == "user"
        for bad in (None, "", "sk-app-wrong", secret + "x", "Bearer " + secret):
            with pytest.raises(GatewayError) as info:
                await authenticator.authenticate(bad)
            assert info.value.status == 401 and info.value.code == "invalid_api_key"

    run(tmp_path, work)


def test_changes_show_after_the_cache_ttl_and_expiry_uses_the_clock(tmp_path: Path, run: Runner) -> None:
    async def work(db: Database) -> None:
        expires = time.time() + 3600
        row, secret = await auth.create_key(db, {"name": "a", "expires_at": expires}, slots=16)
        authenticator = auth.Authenticator(db, await keys_repo.install_secret(db), ttl_s=0.05)
        await authenticator.authenticate(secret, now=expires - 1)
        with pytest.raises(GatewayError):
            await authenticator.authenticate(secret, now=expires)
        await auth.update_key(db, row["id"], {"enabled": False})
        await asyncio.sleep(0.06)
        with pytest.raises(GatewayError) as info:
            await authenticator.authenticate(secret, now=expires - 1)
        assert "Incorrect API key" in info.value.message  # the same words as for an unknown key
        _, new_secret = await auth.rotate_key(db, row["id"])
        await auth.update_key(db, row["id"], {"enabled": True})
        await asyncio.sleep(0.06)
        assert (await authenticator.authenticate(new_secret, now=expires - 1)).key_id == row["id"]
        with pytest.raises(GatewayError):
            await authenticator.authenticate(secret, now=expires - 1)

    run(tmp_path, work)


def test_admin_key_from_the_environment_or_generated_once(tmp_path: Path, run: Runner) -> None:
    async def work(db: Database) -> None:
        generated = await auth.ensure_admin_key(db, None, slots=16)
        assert generated is not None and generated.startswith("sk-app-")
        assert await auth.ensure_admin_key(db, None, slots=16) is None  # never again
        env_key = "sk-app-from-the-environment-0001"
        assert await auth.ensure_admin_key(db, env_key, slots=16) is None
        authenticator = auth.Authenticator(db, await keys_repo.install_secret(db), ttl_s=1)
        assert (await authenticator.authenticate(env_key)).role == "admin"
        assert len(await keys_repo.list_all(db)) == 2
        with pytest.raises(ValueError):
            await auth.ensure_admin_key(db, "short", slots=16)

    run(tmp_path, work)


def test_slots_are_reused_and_run_out_clearly(tmp_path: Path, run: Runner) -> None:
    async def work(db: Database) -> None:
        rows = [(await auth.create_key(db, {"name": str(i)}, slots=2))[0] for i in range(2)]
        assert sorted(r["slot"] for r in rows) == [0, 1]
        with pytest.raises(GatewayError) as info:
            await auth.create_key(db, {"name": "third"}, slots=2)
        assert "key_slots" in info.value.message
        await auth.delete_key(db, rows[0]["id"])
        assert (await auth.create_key(db, {"name": "again"}, slots=2))[0]["slot"] == 0

    run(tmp_path, work)


@pytest.mark.parametrize(("fields", "param"), [
    ({}, "name"),
    ({"name": "a", "role": "root"}, "role"),
    ({"name": "a", "rpm": 0}, "rpm"),
    ({"name": "a", "budget_usd": 1}, "budget_period"),
    ({"name": "a", "budget_period": "day"}, "budget_usd"),
    ({"name": "a", "expires_at": 1}, "expires_at"),
    ({"name": "a", "endpoints": ["v1/chat"]}, "endpoints"),
    ({"name": "a", "colour": "red"}, "colour"),
])
def test_invalid_key_fields_name_the_field(tmp_path: Path, run: Runner, fields: dict[str, Any], param: str) -> None:
    async def work(db: Database) -> None:
        with pytest.raises(GatewayError) as info:
            await auth.create_key(db, fields, slots=16)
        assert info.value.status == 400 and info.value.param == param

    run(tmp_path, work)


def test_roles_and_patterns() -> None:
    user = auth.Principal("k", "u", "user", models=("llama*", "ollama/*"))
    user.check_endpoint("POST", "/v1/chat/completions")
    with pytest.raises(GatewayError, match="may not call GET /admin/keys"):
        user.check_endpoint("GET", "/admin/keys")
    assert user.may_use("llama3:8b") and user.may_use("ollama/qwen")
    assert not user.may_use("gpt-4o") and not user.may_use("openai/gpt-4o")
    assert auth.Principal("k", "any", "user").may_use is None  # any model: nothing to test
    error = auth.model_not_allowed("gpt-4o")
    assert error.code == "model_not_allowed" and error.status == 403 and "gpt-4o" in error.message

    reader = auth.Principal("k", "r", "read-only")
    reader.check_endpoint("GET", "/v1/models")
    with pytest.raises(GatewayError):
        reader.check_endpoint("POST", "/v1/embeddings")

    narrow = auth.Principal("k", "n", "user", endpoints=("/v1/embeddings",))
    narrow.check_endpoint("POST", "/v1/embeddings")
    with pytest.raises(GatewayError):
        narrow.check_endpoint("POST", "/v1/chat/completions")
    admin = auth.Principal("k", "a", "admin")
    admin.check_endpoint("DELETE", "/admin/keys/x")


def test_patterns_match_the_canonical_path_whichever_spelling_wrote_them() -> None:
    # The web layer passes /api/v1/x as /v1/x (common/paths.canonical); patterns are read the same way.
    for written in ("/v1/chat/*", "/api/v1/chat/*"):
        key = auth.Principal("k", "n", "user", endpoints=(written,))
        key.check_endpoint("POST", "/v1/chat/completions")
        with pytest.raises(GatewayError):
            key.check_endpoint("GET", "/v1/models")


def test_proxy_takes_an_admin_key_or_a_pattern_that_names_it() -> None:
    auth.Principal("k", "a", "admin").check_endpoint("POST", "/proxy/vllm/tokenize")
    auth.Principal("k", "a", "admin", endpoints=("/v1/*",)).check_endpoint("GET", "/proxy/vllm/metrics")
    for endpoints in (None, ("*",), ("/v1/*", "*/tokenize"), ("/proxy/llamacpp/*",)):
        with pytest.raises(GatewayError, match="may not call POST /proxy/vllm/tokenize"):
            auth.Principal("k", "u", "user", endpoints=endpoints).check_endpoint("POST", "/proxy/vllm/tokenize")
    allowed = auth.Principal("k", "u", "user", endpoints=("/proxy/vllm/*",))
    allowed.check_endpoint("POST", "/proxy/vllm/tokenize")
    reader = auth.Principal("k", "r", "read-only", endpoints=("/proxy/vllm/*",))
    reader.check_endpoint("GET", "/proxy/vllm/metrics")
    with pytest.raises(GatewayError):
        reader.check_endpoint("POST", "/proxy/vllm/tokenize")


def test_presented_key_from_either_header() -> None:
    assert auth.presented_key("Bearer sk-app-x", None) == "sk-app-x"
    assert auth.presented_key("bearer  sk-app-x ", None) == "sk-app-x"
    assert auth.presented_key(None, "sk-app-y") == "sk-app-y"
    assert auth.presented_key("Basic abc", "sk-app-y") == "sk-app-y"
    assert auth.presented_key(None, None) is None
