"""Build hook: compile the placement core with mypyc (pure Python when that is not possible).

The modules below are plain, type-checked Python; mypyc turns them into C extensions, which makes
decisions several times faster. Set COMPUTEGROUPS_PURE_PYTHON=1 to install without compiling
(the same code then runs interpreted, with the same behaviour).
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

COMPILED = [
    "src/computegroups/memo.py",
    "src/computegroups/model.py",
    "src/computegroups/topology.py",
    "src/computegroups/placement/cluster.py",
    "src/computegroups/placement/engine.py",
    "src/computegroups/placement/plugins.py",
    "src/computegroups/placement/fragmentation.py",
    "src/computegroups/placement/preemption.py",
    "src/computegroups/placement/existing.py",
    "src/computegroups/decide/ledger.py",
    "src/computegroups/decide/plan.py",
    "src/computegroups/decide/request.py",
    "src/computegroups/decide/quota.py",
    "src/computegroups/decide/acquire.py",
    "src/computegroups/decide/release.py",
    "src/computegroups/views.py",
    "src/computegroups/state/memory.py",
    "src/computegroups/state/sqlite.py",
    "src/computegroups/manager.py",
    "src/computegroups/commit.py",
]


def _remove_compiled() -> None:
    """Delete extensions an earlier in-place (editable) build left beside the sources."""
    for source in COMPILED:
        for built in glob.glob(source[: -len(".py")] + ".*.so"):
            os.remove(built)
    for shared in glob.glob("src/*__mypyc*.so"):
        os.remove(shared)


def ext_modules() -> list[object]:
    if os.environ.get("COMPUTEGROUPS_PURE_PYTHON"):
        _remove_compiled()  # or Python would keep importing them
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        print("computegroups: mypyc not available; installing pure Python", file=sys.stderr)
        return []
    # mypyc type-checks what it compiles: without the runtime dependencies (a build environment
    # usually has none), imports it cannot resolve are treated as untyped, not as errors.
    options = ["--ignore-missing-imports", "--no-warn-unused-ignores"]
    extensions = list(mypycify([*options, *COMPILED], opt_level="3"))
    for ext in extensions:
        ext.optional = True  # no working C compiler: a warning, and the modules stay pure Python
    return extensions


class BuildAllOrNone(build_ext):
    """Keep every compiled module or none: each module's extension imports the library mypyc builds
    for all of them (``*__mypyc``), so if one failed (a compiler error, a compiler killed for memory)
    the others would fail to import. Then none is kept and the package installs as pure Python."""

    def run(self) -> None:
        self.failed: list[str] = []
        super().run()
        if self.failed:
            for ext in self.extensions:
                built = os.path.join(self.build_lib, self.get_ext_filename(self.get_ext_fullname(ext.name)))
                if os.path.exists(built):
                    os.remove(built)
            _remove_compiled()
            print(f"computegroups: {', '.join(self.failed)} did not build; installing pure Python", file=sys.stderr)

    def build_extension(self, ext: object) -> None:
        try:
            super().build_extension(ext)
        except Exception:
            self.failed.append(getattr(ext, "name", "?"))
            raise


setup(ext_modules=ext_modules(), cmdclass={"build_ext": BuildAllOrNone})
