"""The README's Python tour runs as written (with its state file moved to a temp dir)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)


def _run(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "example.py"
    script.write_text(code)
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)


def test_readme_advanced_example_runs(tmp_path: Path) -> None:
    (block,) = [b for b in _blocks() if "reserve_compute_group" in b]
    out = _run(block, tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["preempting True", "urgent allocated", "MIG-", "['dgx-0', 'dgx-1']"]


def test_readme_python_tour_runs(tmp_path: Path) -> None:
    block = _blocks()[0]
    code = block.replace("/tmp/cg-tour.db", str(tmp_path / "tour.db"))
    out = _run(code, tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("pcie [0, 1] NV4")
    assert "no node can take 16 GPU(s)" in out.stdout
