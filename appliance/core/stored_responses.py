"""Where stored Responses live: the database, or with ``[state] url`` Redis, so every node can continue them.

In Redis a response is one JSON string under ``responses:<id>`` that expires with ``[responses] keep_days``
(no sweep needed). A lookup that Redis cannot answer is a 503 ``state_unavailable``, never a 404: the response
may well exist, and the client should try again rather than start the conversation over.
"""

from __future__ import annotations

import math
from typing import Any

import orjson

from appliance.storage import responses_repo
from appliance.storage.db import Database
from appliance.storage.state import SharedState, StateUnavailable


class StoredResponses:
    """save / get / delete / sweep of stored Responses, over the database or the shared state."""

    def __init__(self, db: Database, state: SharedState | None) -> None:
        self._db = db
        self._state = state

    def _key(self, response_id: str) -> str:
        assert self._state is not None
        return self._state.key("responses", response_id)

    async def save(self, *, response: dict[str, Any], key_id: str | None, input_items: list[dict[str, Any]],
                   conversation: list[dict[str, Any]], created_at: float, expires_at: float) -> None:
        """Kept at once (before the client sees the answer): the next turn may arrive anywhere."""
        state = self._state
        if state is None:
            await responses_repo.save(self._db, response=response, key_id=key_id, input_items=input_items,
                                      conversation=conversation, created_at=created_at, expires_at=expires_at)
            return
        row = {"id": response["id"], "key_id": key_id, "created_at": created_at, "expires_at": expires_at,
               "status": response.get("status", "completed"), "input_items": input_items,
               "conversation": conversation, "response": response}
        ttl_ms = max(1, math.ceil((expires_at - created_at) * 1000))
        await self._command(state, "SET", self._key(response["id"]), orjson.dumps(row), "PX", ttl_ms)

    async def get(self, response_id: str, now: float) -> dict[str, Any] | None:
        state = self._state
        if state is None:
            return await responses_repo.get(self._db, response_id, now)
        raw = await self._command(state, "GET", self._key(response_id))
        if raw is None:
            return None
        row: dict[str, Any] = orjson.loads(raw)
        return row if row["expires_at"] > now else None

    async def delete(self, response_id: str) -> bool:
        state = self._state
        if state is None:
            return await responses_repo.delete(self._db, response_id)
        return bool(await self._command(state, "DEL", self._key(response_id)))

    @staticmethod
    async def _command(state: SharedState, *args: Any) -> Any:
        """One command; Redis unreachable is a 503 state_unavailable (a missing response would be a lie)."""
        try:
            return await state.command(*args)
        except StateUnavailable:
            raise state.refusal("Stored responses are in") from None

    async def sweep(self, now: float) -> int:
        """Drop the expired ones from the database (Redis expires its own)."""
        return 0 if self._state is not None else await responses_repo.sweep(self._db, now)
