"""Stored Responses: found until they expire, swept after."""

from __future__ import annotations

import asyncio
from pathlib import Path

from appliance.common.resources import migrations_dir
from appliance.storage import responses_repo
from appliance.storage.db import Database
from appliance.storage.migrate import migrate


def test_expired_responses_are_not_found_and_swept(tmp_path: Path) -> None:
    async def main() -> None:
        path = tmp_path / "a.db"
        migrate(path, migrations_dir())
        db = await Database.open(path)
        try:
            for rid, expires in (("resp_old", 100.0), ("resp_new", 10_000.0)):
                await responses_repo.save(db, response={"id": rid, "status": "completed", "output": []},
                                          key_id="key_a", input_items=[{"id": "msg_1"}], conversation=[],
                                          created_at=1.0, expires_at=expires)
            assert await responses_repo.get(db, "resp_old", now=500.0) is None
            found = await responses_repo.get(db, "resp_new", now=500.0)
            assert found["input_items"] == [{"id": "msg_1"}] and found["key_id"] == "key_a"
            assert await responses_repo.sweep(db, now=500.0) == 1
            assert await responses_repo.delete(db, "resp_new") is True
            assert await responses_repo.delete(db, "resp_new") is False
        finally:
            await db.close()

    asyncio.run(main())
