"""Shared fixtures: the recorded nvidia-smi outputs and ready-made managers."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import stamina.instrumentation

from computegroups import ComputeGroupManager, SimulatedComputeResourceProvider
from computegroups.runtime.circus import CircusDaemon

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    """Refuse to test compiled modules older than their source (edited since the last ``make install``)."""
    import importlib

    for path in (REPO / "setup.py").read_text().split('"'):
        if not (path.startswith("src/computegroups/") and path.endswith(".py")):
            continue
        module = importlib.import_module(path[len("src/") : -len(".py")].replace("/", "."))
        built = Path(module.__file__ or "")
        if built.suffix == ".so" and built.stat().st_mtime < (REPO / path).stat().st_mtime:
            pytest.exit(f"{built.name} is older than {path}: run 'make install' to rebuild it", returncode=2)


TOPO_FIXTURES = REPO / "tests" / "fixtures" / "nvidia-smi-topo"


def topo_fixture(name: str) -> str:
    """The text of one recorded `nvidia-smi topo -m` output."""
    return (TOPO_FIXTURES / name).read_text()


def a6000_spec(count: int = 1, **extra: Any) -> dict[str, Any]:
    """A spec of nodes built from the real A6000 NVLink-pairs output."""
    return {
        "nodes": [
            {
                "id": "a6000",
                "count": count,
                "topology": str(TOPO_FIXTURES / "rtx_a6000_x8_nv4_pairs.txt"),
                "gpu": {"model": "NVIDIA RTX A6000", "memory_mib": 49140},
                "cpus": 128,
                "memory_mib": 1048576,
                **extra,
            }
        ]
    }


@pytest.fixture
async def a6000() -> AsyncIterator[ComputeGroupManager]:
    """A manager over one simulated 8x A6000 node with NVLink pairs, state in memory."""
    async with ComputeGroupManager(SimulatedComputeResourceProvider.from_spec(a6000_spec()), ":memory:") as mgr:
        yield mgr


@pytest.fixture
async def fleet() -> AsyncIterator[ComputeGroupManager]:
    """The built-in demo cluster (2 DGX H100, 2 A6000 pairs boxes, 1 CPU-only node), state in memory."""
    async with ComputeGroupManager(SimulatedComputeResourceProvider.from_spec(None), ":memory:") as mgr:
        yield mgr


@pytest.fixture(scope="module")
def daemon() -> Iterator[CircusDaemon]:
    """A real circus daemon in a private folder (a short path: ipc:// socket paths are limited), per module."""
    folder = Path(tempfile.mkdtemp(prefix="cg-circus-", dir="/tmp"))
    d = CircusDaemon(folder, check_delay=0.1)
    yield d
    d.quit()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def waits() -> Iterator[list[float]]:
    """The waits the retries asked for (stamina's retry hook), in order."""
    asked: list[float] = []
    old = stamina.instrumentation.get_on_retry_hooks()
    stamina.instrumentation.set_on_retry_hooks([lambda details: asked.append(details.wait_for)])
    try:
        yield asked
    finally:
        stamina.instrumentation.set_on_retry_hooks(old)
