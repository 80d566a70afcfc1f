"""Per-key upstream credentials (BYOK): sealed at rest, opened once per Principal, sent instead of the backend's key."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from appliance.accounts import auth
from appliance.accounts.credentials import KEY_FILE, Vault, VaultError, read_or_create
from appliance.common.config import BackendSettings
from appliance.common.errors import GatewayError
from appliance.common.resources import migrations_dir
from appliance.core.exchange import Exchange, upstream_key
from appliance.providers.anthropic import AnthropicProvider
from appliance.providers.base import Call
from appliance.providers.ollama import OllamaProvider
from appliance.providers.openai_compat import OpenAICompatProvider
from appliance.storage import keys_repo
from appliance.storage.db import Database
from appliance.storage.migrate import database_path, migrate

SECRET = "sk-proj-user-own-secret-123456"
BACKENDS = ("openai", "anthropic")


def run(tmp_path: Path, work: Callable[[Database, Vault], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        path = database_path(tmp_path)
        migrate(path, migrations_dir())
        db = await Database.open(path)
        try:
            return await work(db, Vault(tmp_path))
        finally:
            await db.close()

    return asyncio.run(main())


# ------------------------------------------------------------------------------------------ the vault


def test_the_key_file_is_made_on_first_seal_with_mode_0600(tmp_path: Path) -> None:
    vault = Vault(tmp_path)
    assert vault.open("anything") is None  # nothing sealed yet: no key file, and none made by a read
    assert not (tmp_path / KEY_FILE).exists()
    token = vault.seal(SECRET)
    assert SECRET not in token
    assert stat.S_IMODE((tmp_path / KEY_FILE).stat().st_mode) == 0o600
    assert vault.open(token) == SECRET
    assert Vault(tmp_path).open(token) == SECRET  # another process, the same file
    assert Vault(tmp_path / "elsewhere").open(token) is None  # another data dir: no key
    assert [p.name for p in tmp_path.iterdir()] == [KEY_FILE]  # no temporary file left behind


def test_a_token_from_another_key_or_changed_does_not_open(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    token = Vault(tmp_path / "a").seal(SECRET)
    other = Vault(tmp_path / "b")
    other.seal("something")  # b has a key of its own
    assert other.open(token) is None
    assert Vault(tmp_path / "a").open(token[:-4] + "AAAA") is None
    assert Vault(tmp_path / "a").open("not a token ü") is None


def _make_key(path: str, out: Any) -> None:
    out.put(read_or_create(Path(path)))


def test_processes_racing_to_make_the_key_all_get_the_same_one(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_make_key, args=(str(tmp_path / KEY_FILE), out)) for _ in range(6)]
    for proc in procs:
        proc.start()
    keys = {out.get(timeout=30) for _ in procs}
    for proc in procs:
        proc.join(30)
    assert keys == {(tmp_path / KEY_FILE).read_bytes()}
    assert os.listdir(tmp_path) == [KEY_FILE]


def test_a_damaged_key_file_refuses_to_seal_and_opens_nothing(tmp_path: Path) -> None:
    token = Vault(tmp_path).seal(SECRET)
    (tmp_path / KEY_FILE).write_bytes(b"not a key")
    with pytest.raises(VaultError):
        Vault(tmp_path).seal(SECRET)
    assert Vault(tmp_path).open(token) is None


# ------------------------------------------------------------------------------------------ keys


def test_a_key_stores_only_tokens_and_shows_only_backend_names(tmp_path: Path) -> None:
    async def work(db: Database, vault: Vault) -> None:
        row, _ = await auth.create_key(db, {"name": "byok", "upstream_keys": {"openai": SECRET}}, slots=16,
                                       vault=vault, backends=BACKENDS)
        assert set(row["upstream_keys"]) == {"openai"} and SECRET not in str(row)
        assert auth.public_view(row)["upstream_keys"] == ["openai"]
        assert SECRET not in str(auth.public_view(row))
        assert vault.open(row["upstream_keys"]["openai"]) == SECRET

    run(tmp_path, work)
    assert SECRET.encode() not in database_path(tmp_path).read_bytes()


def test_unknown_backends_and_bad_secrets_are_refused_naming_the_field(tmp_path: Path) -> None:
    async def work(db: Database, vault: Vault) -> None:
        for upstream, param in (({"nope": SECRET}, "upstream_keys.nope"),
                                ({"openai": "two words"}, "upstream_keys.openai"),
                                ({"openai": "line\r\nX-Evil: 1"}, "upstream_keys.openai"),
                                ({"openai": ""}, "upstream_keys.openai"),
                                ({"openai": 5}, "upstream_keys.openai"),
                                ("openai", "upstream_keys")):
            with pytest.raises(GatewayError) as info:
                await auth.create_key(db, {"name": "x", "upstream_keys": upstream}, slots=16, vault=vault,
                                      backends=BACKENDS)
            assert (info.value.status, info.value.param) == (400, param)
            assert "two words" not in info.value.message and "Evil" not in info.value.message
        assert await keys_repo.count(db) == 0

    run(tmp_path, work)


def test_patch_sets_replaces_and_removes_one_backend_at_a_time_and_rotation_keeps_them(tmp_path: Path) -> None:
    async def work(db: Database, vault: Vault) -> None:
        row, _ = await auth.create_key(db, {"name": "byok", "upstream_keys": {"openai": SECRET}}, slots=16,
                                       vault=vault, backends=BACKENDS)
        key_id = row["id"]
        row = await auth.update_key(db, key_id, {"upstream_keys": {"anthropic": "sk-ant-1"}}, vault=vault,
                                    backends=BACKENDS)
        assert auth.public_view(row)["upstream_keys"] == ["anthropic", "openai"]
        row = await auth.update_key(db, key_id, {"upstream_keys": {"openai": "sk-new"}, "rpm": 5}, vault=vault,
                                    backends=BACKENDS)
        assert vault.open(row["upstream_keys"]["openai"]) == "sk-new" and row["rpm"] == 5
        row, _ = await auth.rotate_key(db, key_id)
        assert vault.open(row["upstream_keys"]["anthropic"]) == "sk-ant-1"
        # A backend that left the config: its credential may still be removed, not set.
        with pytest.raises(GatewayError):
            await auth.update_key(db, key_id, {"upstream_keys": {"anthropic": "x"}}, vault=vault, backends=["openai"])
        row = await auth.update_key(db, key_id, {"upstream_keys": {"anthropic": None}}, vault=vault,
                                    backends=["openai"])
        assert auth.public_view(row)["upstream_keys"] == ["openai"]
        row = await auth.update_key(db, key_id, {"name": "renamed"}, vault=vault, backends=BACKENDS)
        assert auth.public_view(row)["upstream_keys"] == ["openai"]  # absent: unchanged

    run(tmp_path, work)


def test_merge_applies_sets_and_removals() -> None:
    assert keys_repo.merged({"a": "1", "b": "2"}, {"b": None, "c": "3", "d": None}) == {"a": "1", "c": "3"}


def test_the_principal_carries_the_opened_secrets_but_never_prints_them(tmp_path: Path) -> None:
    async def work(db: Database, vault: Vault) -> None:
        _, secret = await auth.create_key(db, {"name": "byok", "upstream_keys": {"openai": SECRET}}, slots=16,
                                          vault=vault, backends=BACKENDS)
        authenticator = auth.Authenticator(db, await keys_repo.install_secret(db), ttl_s=60, vault=Vault(tmp_path))
        principal = await authenticator.authenticate(secret)
        assert principal.upstream_keys == {"openai": SECRET}
        assert SECRET not in repr(principal)
        x = Exchange(path="/v1/chat/completions", request_id="r", upstream_id="u", headers={}, principal=principal)
        assert upstream_key(x, "openai") == SECRET
        assert upstream_key(x, "anthropic") is None  # not its own: the backend's configured key goes
        # Without the key file the secret cannot be opened: the request fails, never falls back.
        (tmp_path / KEY_FILE).unlink()
        blind = auth.Authenticator(db, await keys_repo.install_secret(db), ttl_s=60, vault=Vault(tmp_path))
        x.principal = await blind.authenticate(secret)
        with pytest.raises(GatewayError) as info:
            upstream_key(x, "openai")
        assert info.value.code == "upstream_key_unreadable" and info.value.status == 500

    run(tmp_path, work)


# ------------------------------------------------------------------------------------------ providers


def _call(api_key: str | None) -> Call:
    return Call("chat/completions", {"model": "m"}, "rid", {"x-client": "1"}, api_key=api_key)


@pytest.mark.parametrize(("kind", "header", "configured", "own"), [
    ("openai", "Authorization", "Bearer sk-backend", f"Bearer {SECRET}"),
    ("ollama", "Authorization", "Bearer sk-backend", f"Bearer {SECRET}"),
    ("anthropic", "x-api-key", "sk-backend", SECRET),
])
def test_providers_send_the_keys_own_secret_instead_of_the_backends(kind: str, header: str, configured: str,
                                                                   own: str) -> None:
    settings = BackendSettings(name="b", type=kind, url="http://127.0.0.1:9/v1", api_key="sk-backend")
    provider: Any = {"openai": OpenAICompatProvider, "ollama": OllamaProvider, "anthropic": AnthropicProvider}[kind](
        settings, None)

    def headers(call: Call) -> dict[str, str]:
        return provider._headers(call) if kind != "ollama" else provider._headers(call.request_id, call.api_key)

    assert headers(_call(None))[header] == configured
    assert headers(_call(SECRET))[header] == own
    assert SECRET not in repr(_call(SECRET))
