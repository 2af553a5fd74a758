"""Every fenced Python block of the README runs as written; one that needs a cluster at least compiles.

The Kubernetes block is run for real against the test control plane in ``tests/k8s/test_readme_k8s.py``.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Blocks that construct these need a cluster this machine does not have.
NEEDS_CLUSTER = ("KubernetesComputeResourceProvider(",)


def readme_blocks() -> list[str]:
    """The fenced ``python`` blocks of the README, in order."""
    return re.findall(r"^```python\n(.*?)^```", (REPO / "README.md").read_text(), re.S | re.M)


def run_block(code: str, tmp_path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run one block as a script of its own, with /tmp paths moved under ``tmp_path``."""
    script = tmp_path / "example.py"
    script.write_text(code.replace("/tmp/", f"{tmp_path}/"))
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)


def _needs_cluster(block: str) -> bool:
    return any(marker in block for marker in NEEDS_CLUSTER)


def test_the_readme_has_the_blocks_this_file_checks() -> None:
    blocks = readme_blocks()
    assert len(blocks) >= 3
    assert sum(_needs_cluster(b) for b in blocks) == 1


@pytest.mark.parametrize("index", range(len(readme_blocks())))
def test_every_python_block_runs_or_compiles(index: int, tmp_path: Path) -> None:
    block = readme_blocks()[index]
    compile(block, f"README.md block {index}", "exec")  # a SyntaxError names the block
    if _needs_cluster(block):
        return
    out = run_block(block, tmp_path)
    assert out.returncode == 0, out.stderr


def test_readme_advanced_example_prints_what_it_says(tmp_path: Path) -> None:
    (block,) = [b for b in readme_blocks() if "reserve_compute_group" in b]
    out = run_block(block, tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["preempting True", "urgent allocated", "MIG-", "['dgx-0', 'dgx-1']"]


def test_readme_python_tour_prints_what_it_says(tmp_path: Path) -> None:
    out = run_block(readme_blocks()[0], tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("pcie [0, 1] NV4")
    assert "no node can take 16 GPU(s)" in out.stdout
    assert (tmp_path / "cg-tour.db").is_file()  # its state went where the test moved it
