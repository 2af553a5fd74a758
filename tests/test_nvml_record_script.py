"""scripts/record-gpu-machine: refuses cleanly without NVML; records what replays to the same machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from computegroups.providers.nvml import ReplayNvml, discover_gpus

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "record-gpu-machine"
NVML = REPO / "tests" / "fixtures" / "nvml"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_records_a_machine_that_replays_the_same(tmp_path: Path) -> None:
    src = NVML / "rtx_a6000_8_nvlink_pairs.json"
    out = tmp_path / "rec.json"
    done = run("-o", str(out), "--rounds", "2", "--interval", "0", "--source-recording", str(src))
    assert done.returncode == 0, done.stderr
    assert "8 GPUs" in done.stdout and "NV4" in done.stdout
    rec = json.loads(out.read_text())
    assert len(rec["samples"]) == 2
    assert discover_gpus(ReplayNvml(rec)) == discover_gpus(ReplayNvml(src))


def test_without_nvml_it_says_why(tmp_path: Path) -> None:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        done = run("-o", str(tmp_path / "x.json"))
        assert done.returncode == 1 and done.stderr.startswith("record-gpu-machine: ")
        assert not (tmp_path / "x.json").exists()
    else:  # pragma: no cover - a machine with a GPU: the real thing is recorded
        pynvml.nvmlShutdown()
        done = run("-o", str(tmp_path / "x.json"), "--rounds", "1")
        assert done.returncode == 0, done.stderr
