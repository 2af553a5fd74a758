"""Build hook: compile the placement core with mypyc (pure Python when that is not possible).

The modules below are plain, type-checked Python; mypyc turns them into C extensions, which makes
decisions several times faster. Set COMPUTEGROUPS_PURE_PYTHON=1 to install without compiling
(the same code then runs interpreted, with the same behaviour).
"""

from __future__ import annotations

import os
import sys

from setuptools import setup

COMPILED = [
    "src/computegroups/topology.py",
    "src/computegroups/placement/cluster.py",
    "src/computegroups/placement/engine.py",
    "src/computegroups/placement/plugins.py",
    "src/computegroups/placement/fragmentation.py",
    "src/computegroups/placement/preemption.py",
    "src/computegroups/state/memory.py",
    "src/computegroups/manager.py",
]


def ext_modules() -> list[object]:
    if os.environ.get("COMPUTEGROUPS_PURE_PYTHON"):
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        print("computegroups: mypyc not available; installing pure Python", file=sys.stderr)
        return []
    return list(mypycify(COMPILED, opt_level="3"))


setup(ext_modules=ext_modules())
