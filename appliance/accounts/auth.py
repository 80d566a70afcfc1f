"""API keys: their format and hashing, who a request is, and what it may do.

Keys look like ``sk-app-<43 random characters>``. Only an HMAC-SHA256 of a key (keyed with a
per-install secret) is stored; a presented key is hashed the same way, looked up, and compared in
constant time. Each worker trusts a looked-up key for ``auth.cache_ttl_s``, which bounds how long a
revoked or disabled key keeps working. A key's own upstream credentials (accounts/credentials.py) are
opened when its Principal is built, so they are cached with it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from cachetools import TTLCache
from pydantic import ValidationError

from appliance.accounts.credentials import Vault, sealed_changes
from appliance.accounts.key_fields import KeyFields, check_budget
from appliance.common.errors import GatewayError
from appliance.common.paths import PROXY, canonical
from appliance.storage import keys_repo
from appliance.storage.db import Database

KEY_PREFIX = "sk-app-"
ROLES = ("admin", "user", "read-only")
PERIODS = ("day", "week", "month")
ANONYMOUS_ID = "anonymous"
_SHOWN = len(KEY_PREFIX) + 6  # characters of a key kept for listings
_READ_METHODS = frozenset(("GET", "HEAD", "OPTIONS"))


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def new_key_id() -> str:
    return "key_" + secrets.token_hex(8)


def key_hash(key: str, install_secret: bytes) -> str:
    return hmac.new(install_secret, key.encode(), hashlib.sha256).hexdigest()


def shown_prefix(key: str) -> str:
    return key[:_SHOWN]


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request runs as: an API key, or the anonymous owner when auth is off."""

    key_id: str
    name: str
    role: str
    models: tuple[str, ...] = ("*",)
    endpoints: tuple[str, ...] | None = None  # None: everything except /admin and /proxy
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    budget_usd: float | None = None
    budget_tokens: int | None = None
    budget_period: str | None = None
    budget_counts: str = "price"  # what budget_usd counts: price, compute or both
    weight: float | None = None  # share in the fair admission queue (None: [admission] default_weight)
    slot: int | None = None  # row of the live counters; None for the anonymous owner
    expires_at: float | None = None
    guardrails: tuple[str, ...] = ()  # applied to every request of the key (a request can add, not remove)
    # The key's own secret per backend (BYOK), opened; None where it could not be (the request then fails
    # rather than fall back to the backend's key). Out of repr and comparisons: it must never be printed.
    upstream_keys: Mapping[str, str | None] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_row(cls, row: dict[str, Any], upstream_keys: Mapping[str, str | None] | None = None) -> Principal:
        return cls(
            key_id=row["id"], name=row["name"], role=row["role"], models=tuple(row["models"] or ("*",)),
            endpoints=tuple(row["endpoints"]) if row["endpoints"] is not None else None, rpm=row["rpm"],
            tpm=row["tpm"], max_concurrent=row["max_concurrent"], budget_usd=row["budget_usd"],
            budget_tokens=row["budget_tokens"], budget_period=row["budget_period"],
            budget_counts=row.get("budget_counts") or "price", weight=row.get("weight"), slot=row["slot"],
            expires_at=row["expires_at"], upstream_keys=upstream_keys or {},
            guardrails=tuple(row.get("guardrails") or ()),
        )

    def check_endpoint(self, method: str, path: str) -> None:
        """Raise 403 endpoint_not_allowed unless this principal may call ``method path``.

        ``path`` is the canonical spelling (common/paths.py); the key's patterns were made canonical too, so
        a key allowed ``/v1/chat/*`` may call ``/api/v1/chat/completions``. /proxy/ reaches a backend raw,
        past every rule of the gateway: admin keys, or keys whose own patterns name it (``*`` does not).
        """
        if path.startswith("/admin"):
            allowed = self.role == "admin"
        elif path.startswith(PROXY) and self.role == "admin":
            allowed = True
        elif self.role == "read-only" and method not in _READ_METHODS:
            allowed = False
        elif path.startswith(PROXY):
            allowed = any(pattern.startswith(PROXY) and fnmatch.fnmatchcase(path, pattern)
                          for pattern in self.endpoints or ())
        elif self.endpoints is None:
            allowed = True
        else:
            allowed = any(fnmatch.fnmatchcase(path, pattern) for pattern in self.endpoints)
        if not allowed:
            raise GatewayError("endpoint_not_allowed", f"This key may not call {method} {path}.")

    # The key's model patterns as a test of one name; None when it may use any model. Which names of a
    # request's model are tested is the catalog's rule (core/catalog.py, Catalog.allowed). Made once per
    # key: the request path only reads it.
    may_use: Callable[[str], bool] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "may_use", None if self.models == ("*",) else partial(_matches, self.models))
        if self.endpoints is not None:  # matched against canonical paths: /api/v1/x patterns mean /v1/x
            object.__setattr__(self, "endpoints", tuple(canonical(pattern) for pattern in self.endpoints))

    def allows_model(self, name: str) -> bool:
        return _matches(self.models, name)


def _matches(patterns: tuple[str, ...], name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def model_not_allowed(model: str) -> GatewayError:
    """403 for a model the key's patterns leave out, named as the client wrote it."""
    return GatewayError("model_not_allowed", f"This key may not use the model '{model}'.", param="model")


ANONYMOUS = Principal(key_id=ANONYMOUS_ID, name=ANONYMOUS_ID, role="admin")

_INVALID = "Incorrect API key provided. Send a valid key as 'Authorization: Bearer <key>' or 'x-api-key: <key>'."


def presented_key(authorization: str | None, x_api_key: str | None) -> str | None:
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return x_api_key.strip() if x_api_key else None


class Authenticator:
    """Turns a presented key into a Principal, through a short per-worker cache in front of SQLite."""

    def __init__(self, db: Database, install_secret: bytes, ttl_s: float, *, enabled: bool = True,
                 vault: Vault | None = None) -> None:
        self._db = db
        self._secret = install_secret
        self._enabled = enabled
        self.vault = vault
        # Negative answers are cached too, so a flood of bad keys does not become a flood of queries.
        self._cache: TTLCache[str, Principal | None] = TTLCache(maxsize=10_000, ttl=ttl_s)

    @property
    def enabled(self) -> bool:
        return self._enabled

    async def authenticate(self, key: str | None, now: float | None = None) -> Principal:
        if not self._enabled:
            return ANONYMOUS
        if not key or not key.startswith(KEY_PREFIX):
            raise GatewayError("invalid_api_key", _INVALID)
        try:
            # Keyed by the presented key itself: a hit costs no HMAC. Memory only, for cache_ttl_s.
            principal = self._cache[key]
        except KeyError:
            digest = key_hash(key, self._secret)
            row = await keys_repo.find_by_hash(self._db, digest)
            usable = row is not None and row["enabled"] and hmac.compare_digest(row["hash"], digest)
            principal = self._cache[key] = self.principal_of(row) if usable else None  # type: ignore[arg-type]
        # Unknown, disabled or expired: one answer, so a caller cannot tell which.
        if principal is None:
            raise GatewayError("invalid_api_key", _INVALID)
        if principal.expires_at is not None and principal.expires_at <= (now if now is not None else time.time()):
            raise GatewayError("invalid_api_key", _INVALID)
        return principal

    def principal_of(self, row: dict[str, Any]) -> Principal:
        """A key's row as a Principal, its upstream credentials opened (none can be without a vault)."""
        sealed = row.get("upstream_keys") or {}
        if not sealed:
            return Principal.from_row(row)
        opened = (self.vault.open_all(row["id"], sealed) if self.vault is not None
                  else dict.fromkeys(sealed, None))
        return Principal.from_row(row, opened)


# ---------------------------------------------------------------------------------------- key management
# The same operations behind the admin API and the CLI (which works on the data dir directly).

def public_view(row: dict[str, Any]) -> dict[str, Any]:
    """A key as listed: everything but the hash; the secret itself is never stored. Of its upstream
    credentials, only the backend names (no part of a secret, not even masked)."""
    view = {k: v for k, v in row.items() if k not in ("hash", "slot")}
    view["object"] = "api_key"
    view["upstream_keys"] = sorted(row.get("upstream_keys") or ())
    return view


def validated(fields: dict[str, Any], *, partial: bool) -> dict[str, Any]:
    """Check create/update input; raise GatewayError naming the field at fault."""
    try:
        if partial:
            unknown = set(fields) - set(KeyFields.model_fields)
            if unknown:
                raise GatewayError("invalid_value", f"Unknown field: {sorted(unknown)[0]}.", param=sorted(unknown)[0])
            checked = KeyFields.model_validate({"name": "x", **fields}).model_dump()
            return {k: checked[k] for k in fields}
        return KeyFields.model_validate(fields).model_dump()
    except ValidationError as exc:
        error = exc.errors()[0]
        param = ".".join(str(p) for p in error["loc"]) or None
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "missing":
            raise GatewayError("missing_field", f"Missing required field: '{param}'.", param=param) from None
        raise GatewayError("invalid_value", f"{param}: {message}", param=param) from None


def _sealed(asked: dict[str, str | None] | None, vault: Vault | None, backends: Collection[str],
            held: Collection[str] = ()) -> dict[str, str | None]:
    if not asked:
        return {}
    if vault is None:
        raise TypeError("storing upstream keys needs the data dir's vault")
    return sealed_changes(asked, vault, backends, held)


async def create_key(db: Database, fields: dict[str, Any], *, slots: int, secret: str | None = None,
                     vault: Vault | None = None, backends: Collection[str] = ()) -> tuple[dict[str, Any], str]:
    """Create a key; returns its row and its secret (shown once, never stored).

    ``backends``: the names an ``upstream_keys`` entry may use; ``vault`` seals those secrets.
    """
    values = validated(fields, partial=False)
    bad = check_budget(values)
    if bad:
        raise GatewayError("invalid_value", "A budget needs budget_period, and budget_period a budget.", param=bad)
    sealed = _sealed(values.pop("upstream_keys"), vault, backends)
    values["upstream_keys"] = {backend: token for backend, token in sealed.items() if token is not None}
    secret = secret or new_key()
    values.update(id=new_key_id(), hash=key_hash(secret, await keys_repo.install_secret(db)),
                  prefix=shown_prefix(secret))
    try:
        row = await keys_repo.create(db, values, slots=slots)
    except keys_repo.NoFreeSlot as exc:
        raise GatewayError("invalid_value", str(exc)) from None
    return row, secret


async def update_key(db: Database, key_id: str, changes: dict[str, Any], *, vault: Vault | None = None,
                     backends: Collection[str] = ()) -> dict[str, Any]:
    """Change the fields given; ``upstream_keys`` sets, replaces or (null) removes one backend's secret each."""
    current = await keys_repo.get(db, key_id)
    if current is None:
        raise GatewayError("not_found", f"No such key: {key_id}", param="id")
    values = validated(changes, partial=True)
    bad = check_budget({**current, **values})
    if bad:
        raise GatewayError("invalid_value", "A budget needs budget_period, and budget_period a budget.", param=bad)
    sealed = _sealed(values.pop("upstream_keys", None), vault, backends, held=current["upstream_keys"])
    row = await keys_repo.update(db, key_id, values, upstream_keys=sealed)
    assert row is not None
    return row


async def rotate_key(db: Database, key_id: str) -> tuple[dict[str, Any], str]:
    """A new secret for the same key (id, limits, usage history and upstream keys kept); the old secret stops
    working."""
    if await keys_repo.get(db, key_id) is None:
        raise GatewayError("not_found", f"No such key: {key_id}", param="id")
    secret = new_key()
    row = await keys_repo.update(db, key_id, {"hash": key_hash(secret, await keys_repo.install_secret(db)),
                                              "prefix": shown_prefix(secret)})
    assert row is not None
    return row, secret


async def delete_key(db: Database, key_id: str) -> None:
    if not await keys_repo.delete(db, key_id):
        raise GatewayError("not_found", f"No such key: {key_id}", param="id")


async def get_key(db: Database, key_id: str) -> dict[str, Any]:
    row = await keys_repo.get(db, key_id)
    if row is None:
        raise GatewayError("not_found", f"No such key: {key_id}", param="id")
    return row


async def ensure_admin_key(db: Database, env_key: str | None, *, slots: int) -> str | None:
    """At start: make sure someone can administer the appliance.

    With APPLIANCE_ADMIN_KEY set, that key exists as an admin key. Otherwise, when no key exists at all,
    an admin key is generated and returned (for printing once); None when nothing was generated.
    """
    if env_key:
        if not env_key.startswith(KEY_PREFIX) or len(env_key) < len(KEY_PREFIX) + 16:
            raise ValueError(f"APPLIANCE_ADMIN_KEY must look like {KEY_PREFIX}<at least 16 characters>")
        digest = key_hash(env_key, await keys_repo.install_secret(db))
        if await keys_repo.find_by_hash(db, digest) is None:
            with contextlib.suppress(keys_repo.DuplicateKey):  # another node, starting too, made it just now
                await create_key(db, {"name": "admin (APPLIANCE_ADMIN_KEY)", "role": "admin"}, slots=slots,
                                 secret=env_key)
        return None
    if await keys_repo.count(db):
        return None
    _, secret = await create_key(db, {"name": "admin", "role": "admin"}, slots=slots)
    return secret


async def list_keys(db: Database) -> list[dict[str, Any]]:
    return await keys_repo.list_all(db)
