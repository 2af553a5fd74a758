"""What a user of the package expects: version, licence, changelog, declared imports, self-contained data."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

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
