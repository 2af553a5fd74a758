"""The benchmarks run (CI's light mode), and their independent references are right on small cases."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench import packing, topology_quality

from tests.conftest import REPO


def test_light_mode_runs_and_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--light", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = out / "benchmarks" / "results"
    sections = ("speed", "sqlite", "ray", "topology", "worst_case", "packing", "openb", "openb_binpack")
    for name in ("machine", *sections, "openb_baselines", "memory"):
        assert (results / f"{name}.json").is_file(), name
    topo = json.loads((results / "topology.json").read_text())
    assert all(r["placements"] > 0 for r in topo)
    md = (out / "benchmarks" / "results.md").read_text()
    assert "Allocate + release latency" in md and "Production trace" in md
    assert "Processes on one SQLite file" in md


def test_exact_fit_oracle_on_small_cases() -> None:
    assert packing.exact_fits((8000, 8000), 2)
    assert not packing.exact_fits((8000, 8000, 500), 2)
    # Three 3-GPU... sizes are powers of two: 4+4 on one node, 2+2+2+2 on the other.
    assert packing.exact_fits((4000, 4000, 2000, 2000, 2000, 2000), 2)
    # Shares pack into GPUs left over: 7 whole + 2 x 0.5 fill one node exactly.
    assert packing.exact_fits((4000, 2000, 1000, 500, 500), 1)
    assert not packing.exact_fits((4000, 2000, 1000, 500, 500, 250), 1)


def test_first_fit_and_optimum_replay_the_same_events() -> None:
    events = packing.workload(nodes=2, events=200, load=1.0, seed=3)
    ff = packing.first_fit(events, 2)
    opt = packing.optimum(events, 2)
    assert ff.accepted + ff.rejected == opt.accepted + opt.rejected == 200
    assert opt.frag_rejected == 0  # the oracle only refuses what does not fit at all


def test_brute_force_link_ranking_is_independent_and_ordered() -> None:
    v = topology_quality.link_value
    assert v("NV18") > v("NV4") > v("PIX") > v("PXB") > v("PHB") > v("NODE") > v("SYS")
    links = [["X", "NV4", "SYS"], ["NV4", "X", "SYS"], ["SYS", "SYS", "X"]]
    assert topology_quality.brute_best(links, [0, 1, 2], 2) == v("NV4")
    assert topology_quality.brute_best(links, [0, 2], 2) == v("SYS")
