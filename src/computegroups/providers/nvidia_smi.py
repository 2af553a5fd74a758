"""Discovery and health through the ``nvidia-smi`` executable, for machines where NVML cannot be loaded.

Used when ``libnvidia-ml`` (or nvidia-ml-py) is missing but ``nvidia-smi`` is on
PATH (some containers ship the tool alone). Two calls discover a machine::

    nvidia-smi --query-gpu=index,uuid,name,pci.bus_id,memory.total,compute_cap,mig.mode.current \
               --format=csv,noheader,nounits
    nvidia-smi topo -m

and one samples health and use. Values nvidia-smi cannot give (``[N/A]``,
``[Not Supported]``, ``N/A``) become None. Drivers older than 510 have no
``compute_cap`` field; discovery then asks again without it.
"""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
from collections.abc import Sequence
from typing import Any

from computegroups.errors import InvalidRequestError
from computegroups.model import GpuSpec
from computegroups.topology import Topology, parse_nvidia_smi_topo

__all__ = ["DISCOVERY_FIELDS", "SAMPLE_FIELDS", "NvidiaSmi", "NvidiaSmiUnavailable", "parse_query_csv"]

DISCOVERY_FIELDS = ("index", "uuid", "name", "pci.bus_id", "memory.total", "compute_cap", "mig.mode.current")
SAMPLE_FIELDS = (
    "index",
    "utilization.gpu",
    "memory.used",
    "ecc.errors.uncorrected.volatile.total",
    "remapped_rows.uncorrectable",
    "remapped_rows.failure",
)
_MISSING = {"", "[n/a]", "n/a", "[not supported]", "not supported", "[unknown error]", "[insufficient permissions]"}


class NvidiaSmiUnavailable(Exception):
    """``nvidia-smi`` is not there or does not work; ``str(exc)`` says why."""


def parse_query_csv(text: str, fields: Sequence[str]) -> list[dict[str, str | None]]:
    """Parse ``--format=csv,noheader,nounits`` output into one dict per GPU; unavailable values are None.

    Lines that are not rows (warnings, "GPU is lost" messages) are skipped.
    """
    rows: list[dict[str, str | None]] = []
    for cells in csv.reader(io.StringIO(text), skipinitialspace=True):
        if len(cells) != len(fields):
            continue
        row: dict[str, str | None] = {}
        for f, c in zip(fields, cells, strict=True):
            v = c.strip()
            row[f] = None if v.lower() in _MISSING else v
        if row.get("index") is None or not str(row["index"]).isdigit():
            continue
        rows.append(row)
    return rows


def _int(v: str | None) -> int | None:
    try:
        return int(float(v)) if v is not None else None
    except ValueError:
        return None


def _float(v: str | None) -> float | None:
    try:
        return float(v) if v is not None else None
    except ValueError:
        return None


class NvidiaSmi:
    """Runs ``nvidia-smi`` (``executable``, looked up on PATH) and parses what it prints."""

    def __init__(self, executable: str = "nvidia-smi", *, timeout_s: float = 30.0) -> None:
        path = shutil.which(executable)
        if path is None:
            raise NvidiaSmiUnavailable(f"{executable} is not on PATH")
        self.executable = path
        self._timeout = timeout_s
        self._count = 0

    def _run(self, *args: str) -> str:
        try:
            done = subprocess.run(
                [self.executable, *args], capture_output=True, text=True, timeout=self._timeout, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise NvidiaSmiUnavailable(f"nvidia-smi {' '.join(args)}: {exc}") from exc
        if done.returncode != 0:
            msg = (done.stderr or done.stdout).strip().splitlines()
            raise NvidiaSmiUnavailable(
                f"nvidia-smi {' '.join(args)}: exit {done.returncode}: {msg[0] if msg else 'no output'}"
            )
        return done.stdout

    def _query(self, fields: Sequence[str]) -> list[dict[str, str | None]]:
        out = self._run(f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits")
        return parse_query_csv(out, fields)

    def discover(self) -> tuple[list[GpuSpec], Topology | None, list[str]]:
        """The GPUs, their topology (None if ``topo -m`` failed) and notes for a person."""
        notes: list[str] = []
        try:
            rows = self._query(DISCOVERY_FIELDS)
        except NvidiaSmiUnavailable:
            # Drivers before 510 refuse the compute_cap field; ask again without it.
            fields = tuple(f for f in DISCOVERY_FIELDS if f != "compute_cap")
            rows = self._query(fields)
            notes.append("nvidia-smi has no compute_cap field (driver older than 510)")
        rows.sort(key=lambda r: int(r["index"] or 0))
        topo: Topology | None = None
        try:
            topo = parse_nvidia_smi_topo(self._run("topo", "-m"))
        except (NvidiaSmiUnavailable, InvalidRequestError) as exc:
            notes.append(f"no topology from nvidia-smi topo -m: {exc}")
        if topo is not None and topo.gpu_count != len(rows):
            notes.append(f"nvidia-smi topo -m shows {topo.gpu_count} GPUs, --query-gpu {len(rows)}; topology ignored")
            topo = None
        gpus = [
            GpuSpec(
                index=n,
                uuid=r["uuid"] or f"GPU-index-{n}",
                name=r["name"] or "GPU",
                memory_mib=_int(r["memory.total"]) or 0,
                pci_bus_id=r["pci.bus_id"] or "",
                numa_node=topo.numa_node(n) if topo is not None else None,
                compute_capability=r.get("compute_cap") or "",
            )
            for n, r in enumerate(rows)
        ]
        self._count = len(gpus)
        self.mig_enabled = [str(r.get("mig.mode.current") or "").lower() == "enabled" for r in rows]
        return gpus, topo, notes

    def sample(self) -> list[dict[str, Any]]:
        """One monitoring round, in :meth:`NvmlSource.sample`'s shape; a GPU missing from the output is lost."""
        try:
            rows = self._query(SAMPLE_FIELDS)
        except NvidiaSmiUnavailable:
            rows = self._query(SAMPLE_FIELDS[:3])
        seen: dict[int, dict[str, Any]] = {}
        for r in rows:
            i = int(r["index"] or 0)
            s: dict[str, Any] = {"index": i, "xids": []}
            if (u := _float(r.get("utilization.gpu"))) is not None:
                s["gpu_util"] = u
            if (m := _int(r.get("memory.used"))) is not None:
                s["memory_used_mib"] = m
            s["ecc_dbe_volatile"] = _int(r.get("ecc.errors.uncorrected.volatile.total")) or 0
            s["remapped_rows_uncorrectable"] = _int(r.get("remapped_rows.uncorrectable")) or 0
            s["remap_failure"] = str(r.get("remapped_rows.failure") or "").lower() in ("yes", "1", "true")
            seen[i] = s
        return [seen.get(i, {"index": i, "lost": True, "xids": []}) for i in range(self._count)]

    def close(self) -> None:
        return None
