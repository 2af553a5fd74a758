"""A separate process that follows a SQLite state file through ``changes_since``, on command.

Usage: python -m tests._changes_reader STATE
Reads one line per command from stdin ("read" or "state") and answers one JSON line: for "read",
what ``changes_since`` returned since its last read and the store's read counters; for "state",
every record it holds (its view of the file, built only from what it was told).
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from computegroups.model import GroupRecord
from computegroups.state.sqlite import SqliteStateStore


async def main(path: str) -> None:
    store = SqliteStateStore(path)
    await store.open()
    held: dict[str, GroupRecord] = {}
    revision = 0
    first = await store.changes_since(-1)  # what open() read: everything, once
    held = {r.id: r for r in first.upserts}
    revision = first.revision
    print(json.dumps({"revision": revision}), flush=True)
    try:
        for line in sys.stdin:
            answer: dict[str, Any]
            if line.strip() == "read":
                changes = await store.changes_since(revision)
                if changes.full:
                    held = {}
                for r in changes.upserts:
                    held[r.id] = r
                for gid in changes.deletes:
                    held.pop(gid, None)
                answer = {
                    "from": revision,
                    "revision": changes.revision,
                    "full": changes.full,
                    "upserts": {r.id: r.to_json() for r in changes.upserts},
                    "deletes": sorted(changes.deletes),
                    "stats": store.stats,
                }
                revision = changes.revision
            else:
                answer = {"revision": revision, "records": {gid: r.to_json() for gid, r in held.items()}}
            print(json.dumps(answer), flush=True)
    finally:
        await store.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
