"""The conformance suite (tests/conformance.py) on the simulated provider with SQLite and memory state."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from computegroups import ComputeGroupManager, MemoryStateStore, SimulatedComputeResourceProvider, SqliteStateStore
from tests import conformance

NODES = ["gpu-a", "gpu-b"]

#: The decisions of conformance.decision_transcript on two 8-GPU nodes, by shape. The Kubernetes
#: conformance test must produce the same (it compares against a simulated run in-process too).
EXPECTED = {
    "uniform": [
        ("allocate", 0, (0,)),
        ("allocate", 0, (1, 2)),
        ("allocate", 0, (3, 4, 5, 6)),
        ("allocate", 1, (0, 1)),
        ("allocate", 0, (7,)),
        ("allocate", 1, (2, 3, 4)),
        ("allocate", 1, (5, 6)),
        ("allocate", 0, (1, 2)),
        ("allocate", 0, (7,)),
        ("full", -1, ()),
    ],
    "pcie-pairs": [
        ("allocate", 0, (0,)),
        ("allocate", 0, (2, 3)),
        ("allocate", 0, (4, 5, 6, 7)),
        ("allocate", 1, (0, 1)),
        ("allocate", 0, (1,)),
        ("allocate", 1, (2, 3, 4)),
        ("allocate", 1, (6, 7)),
        ("allocate", 0, (2, 3)),
        ("allocate", 0, (1,)),
        ("full", -1, ()),
    ],
}


def sqlite_opener(tmp_path: Path, shape: str = "uniform") -> conformance.OpenManager:
    path = tmp_path / "state.db"

    @contextlib.asynccontextmanager
    async def open_manager() -> AsyncIterator[ComputeGroupManager]:
        provider = SimulatedComputeResourceProvider(conformance.node_specs(NODES, shape))
        async with ComputeGroupManager(provider, path) as mgr:
            yield mgr

    return open_manager


def memory_opener(shape: str = "uniform") -> conformance.OpenManager:
    store = MemoryStateStore()

    @contextlib.asynccontextmanager
    async def open_manager() -> AsyncIterator[ComputeGroupManager]:
        provider = SimulatedComputeResourceProvider(conformance.node_specs(NODES, shape))
        async with ComputeGroupManager(provider, store) as mgr:
            yield mgr

    return open_manager


@pytest.mark.parametrize("check", conformance.MANAGER_CHECKS, ids=lambda c: c.__name__)
async def test_sqlite(check: Any, tmp_path: Path) -> None:
    await check(sqlite_opener(tmp_path), NODES)


@pytest.mark.parametrize("check", conformance.MANAGER_CHECKS, ids=lambda c: c.__name__)
async def test_memory(check: Any) -> None:
    await check(memory_opener(), NODES)


@pytest.mark.parametrize("shape", ["uniform", "pcie-pairs"])
async def test_transcript_same_on_sqlite_and_memory(shape: str, tmp_path: Path) -> None:
    a = await conformance.decision_transcript(sqlite_opener(tmp_path, shape), NODES)
    b = await conformance.decision_transcript(memory_opener(shape), NODES)
    assert a == b == EXPECTED[shape]


async def test_store_sqlite(tmp_path: Path) -> None:
    await conformance.check_store(lambda: SqliteStateStore(tmp_path / "s.db"))
