"""What a user of the package expects: version, licence, changelog, declared imports, self-contained data."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

import computegroups

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# Import name -> distribution name, where they differ.
DISTRIBUTIONS = {"yaml": "PyYAML", "pynvml": "nvidia-ml-py"}
# Imported only inside ``try``, for the host it runs in: Dynamo's own planner types, where Dynamo runs.
GUARDED = {"dynamo"}


def test_python_dash_m_and_the_script_print_the_version() -> None:
    for argv in (
        [sys.executable, "-m", "computegroups", "--version"],
        [str(Path(sys.executable).parent / "computegroups"), "--version"],
    ):
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
        assert out.stdout.strip() == f"computegroups, version {computegroups.__version__}"
    assert re.fullmatch(r"\d+\.\d+\.\d+", computegroups.__version__)


def test_licence_and_changelog() -> None:
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    assert "Apache License" in (REPO / "LICENSE").read_text() and "Version 2.0" in (REPO / "LICENSE").read_text()
    changelog = (REPO / "CHANGELOG.md").read_text()
    assert f"## [{computegroups.__version__}]" in changelog


def _third_party_imports() -> dict[str, set[str]]:
    """Top-level modules imported by the package that are neither stdlib nor the package, by file."""
    found: dict[str, set[str]] = {}
    for path in (REPO / "src" / "computegroups").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "computegroups":
                    found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


def _declared() -> set[str]:
    project = PYPROJECT["project"]
    reqs = [*project["dependencies"], *project["optional-dependencies"]["kubernetes"]]
    return {re.split(r"[<>=!~\[ ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs}


def test_every_imported_third_party_module_is_a_declared_dependency() -> None:
    declared = _declared()
    imported = _third_party_imports()
    assert "psutil" in imported  # the local runtime's, which used to arrive only through circus
    missing = {
        module: files
        for module, files in imported.items()
        if module not in GUARDED and DISTRIBUTIONS.get(module, module).lower().replace("_", "-") not in declared
    }
    assert not missing, missing


def _escapes(relative: Path, line: str) -> bool:
    """Whether a line names a path outside the repository: ``parents[k]`` above the root, an absolute
    path under ``/work/``, or a ``shared`` data folder beside the clone (test data lives in the repo)."""
    for k in re.findall(r"parents\[(\d+)\]", line):
        if int(k) >= len(relative.parts):
            return True
    return bool(re.search(r"""/work/|["'/]shared["'/]|\.\./shared""", line))


def test_nothing_reads_outside_the_repository() -> None:
    """No code or script names a folder beside the repository (data and fixtures are committed)."""
    files = [REPO / "Makefile", REPO / "setup.py"]
    for root in ("src", "tests", "bench", "scripts", ".ci"):
        files += [p for p in (REPO / root).rglob("*") if p.is_file() and p.suffix in {"", ".py", ".sh", ".toml"}]
    offenders = [
        f"{path.relative_to(REPO)}:{n}: {line.strip()}"
        for path in files
        if path != Path(__file__)
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if _escapes(path.relative_to(REPO), line)
    ]
    assert not offenders, "\n".join(offenders)
    assert _escapes(Path("tests/conftest.py"), "REPO.parent / {0}shared{0}".format('"'))  # the check can fail
    assert _escapes(Path("bench/openb.py"), "Path(__file__).resolve().parents[2]")
    assert not _escapes(Path("tests/k8s/harness.py"), "Path(__file__).resolve().parents[2]")


@pytest.mark.slow
def test_a_compiled_module_that_fails_to_build_leaves_pure_python(tmp_path: Path) -> None:
    """If the library mypyc shares among the compiled modules does not build (here the C compiler
    refuses that one file), no module's extension is kept, stale ones from an earlier build included,
    and the package imports as plain Python."""
    if shutil.which("gcc") is None:
        pytest.skip("no gcc to build with")
    tree = tmp_path / "tree"
    (tree / "src").mkdir(parents=True)
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE"):
        (tree / name).write_bytes((REPO / name).read_bytes())
    shutil.copytree(
        REPO / "src" / "computegroups", tree / "src" / "computegroups", ignore=shutil.ignore_patterns("*.so")
    )
    stale = tree / "src" / "computegroups" / f"manager{sysconfig.get_config_var('EXT_SUFFIX')}"
    stale.write_bytes(b"an extension an earlier build left")
    cc = tmp_path / "cc"
    cc.write_text('#!/bin/sh\ncase "$*" in *__native_*) echo "refused" >&2; exit 1;; esac\nexec gcc "$@"\n')
    cc.chmod(0o755)
    env = {**os.environ, "CC": str(cc), "LDSHARED": f"{cc} -shared"}
    env.pop("COMPUTEGROUPS_PURE_PYTHON", None)
    out = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "did not build; installing pure Python" in out.stderr
    assert not list((tree / "src").rglob("*.so"))
    probe = "import computegroups.manager as m, computegroups.state.sqlite as s; print(m.__file__, s.__file__)"
    where = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tree,
        env={**env, "PYTHONPATH": str(tree / "src")},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert where.stdout.split() == [
        str(tree / "src/computegroups/manager.py"),
        str(tree / "src/computegroups/state/sqlite.py"),
    ]
