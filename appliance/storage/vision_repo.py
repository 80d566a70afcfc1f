"""SQL for the image descriptions that models without vision get instead of images."""

from __future__ import annotations

from appliance.storage.db import Database
from appliance.storage.writer import BufferedWriter

_GET = "SELECT description FROM image_descriptions WHERE image = ? AND describer = ?"
_PUT = ("INSERT INTO image_descriptions (image, describer, description, created_at) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (image, describer) DO UPDATE SET description = excluded.description, "
        "created_at = excluded.created_at")


async def get(db: Database, image: str, describer: str) -> str | None:
    """The description of ``image`` that ``describer`` made, if one is stored."""
    rows = await db.fetchall(_GET, (image, describer))
    return str(rows[0][0]) if rows else None


def put(writer: BufferedWriter, image: str, describer: str, description: str, now: float) -> None:
    """Store a description at the next flush: other workers find it a flush interval later (until then they
    would describe the image again, which only costs a call)."""
    writer.add(_PUT, (image, describer, description, now))
