"""`appliance batches list|show|cancel`: on the data dir directly, also while the server runs.

A cancel here does what POST /v1/batches/{id}/cancel does: the batch turns cancelling, and the server's
runner (polling every batches.poll_interval_s) finishes it with its partial output.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from typing import Any

from appliance.batches import batch as batches
from appliance.common.errors import GatewayError
from appliance.storage import batches_repo
from appliance.storage.db import Database


async def run(db: Database, args: argparse.Namespace) -> int:
    if args.action == "list":
        if args.status is not None and args.status not in batches.STATUSES:
            raise GatewayError("invalid_value", f"Unknown status {args.status!r}; one of: "
                               f"{', '.join(batches.STATUSES)}.", param="--status")
        rows = await batches_repo.page(db, owner=args.key, after=None, limit=max(1, args.limit),
                                       status=args.status)
        shown = [batches.batch_object(row) for row in rows[:max(1, args.limit)]]
        if args.json:
            print(json.dumps(shown, indent=2))
        else:
            _table(shown)
        return 0
    row = await batches_repo.get(db, args.id)
    if row is None:
        raise batches.not_found(args.id)
    if args.action == "cancel":
        if batches.cancel_needed(row):
            row = await batches_repo.request_cancel(db, args.id, int(time.time())) or row
            batches.cancel_needed(row)  # raises if it moved on meanwhile (e.g. to finalizing)
        print(f"{args.id} {row['status']}")
        return 0
    print(json.dumps(batches.batch_object(row), indent=2))
    return 0


def _table(objects: list[dict[str, Any]]) -> None:
    if not objects:
        print("(none)")
        return
    header = ("id", "status", "endpoint", "model", "done", "failed", "total", "created")
    rows = [(b["id"], b["status"], b["endpoint"], b["model"] or "-", str(b["request_counts"]["completed"]),
             str(b["request_counts"]["failed"]), str(b["request_counts"]["total"]),
             dt.datetime.fromtimestamp(b["created_at"], dt.UTC).strftime("%Y-%m-%dT%H:%MZ")) for b in objects]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    for cells in (header, *rows):
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip())
