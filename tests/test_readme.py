"""The README's Python tour runs as written (with its state file moved to a temp dir)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_readme_python_tour_runs(tmp_path: Path) -> None:
    text = (REPO / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", text, re.S)
    assert block is not None
    code = block.group(1).replace("/tmp/cg-tour.db", str(tmp_path / "tour.db"))
    script = tmp_path / "tour.py"
    script.write_text(code)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("pcie [0, 1] NV4")
    assert "no node can take 16 GPU(s)" in out.stdout
