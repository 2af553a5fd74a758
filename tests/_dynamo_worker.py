"""A stand-in Dynamo worker: records what it was given, then waits; exits cleanly on SIGTERM.

    python tests/_dynamo_worker.py --record-dir DIR --model M --disaggregation-mode prefill --tensor-parallel-size 2

Writes DIR/<pid>.json (CUDA_VISIBLE_DEVICES, its arguments, its group) and, on SIGTERM,
DIR/<pid>.term before exiting 0 — as a real ``python3 -m dynamo.vllm`` drains and exits.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType


def main(argv: list[str]) -> None:
    record_dir = Path(argv[argv.index("--record-dir") + 1])
    pid = os.getpid()

    def on_term(signum: int, frame: FrameType | None) -> None:
        (record_dir / f"{pid}.term").write_text("SIGTERM")
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_term)
    record = {
        "pid": pid,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        "group_id": os.environ.get("COMPUTEGROUPS_GROUP_ID", ""),
        "component": os.environ.get("COMPUTEGROUPS_COMPONENT", ""),
        "mode": argv[argv.index("--disaggregation-mode") + 1],
        "tp": int(argv[argv.index("--tensor-parallel-size") + 1]),
        "argv": argv,
    }
    tmp = record_dir / f"{pid}.json.tmp"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, record_dir / f"{pid}.json")
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main(sys.argv[1:])
