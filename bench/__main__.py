"""``python -m bench [SECTION ...] [--light] [--out DIR]``: run benchmarks, write results, tables and plots.

Sections: speed, sqlite (the durable path: in memory against SQLite, 1/2/4 processes on one file, Ray in
the same run), features (the advanced features in use), ray, topology, worst_case (the slowest
decisions inside one node: the largest nodes, MIG slices), packing, openb,
openb_binpack (the same replay with the fragmentation score disabled: the "before"), openb_baselines
(the paper's BestFit and Random under the same protocol), memory; ``all`` (the default)
runs every one. ``--light`` is the CI mode: small sizes, no Ray, a minute or
so; it checks that every benchmark runs and never judges a time.

Results go to ``DIR/benchmarks/results/*.json`` (one file per section, so sections can be
run separately), and ``DIR/benchmarks/results.md`` plus PNG plots are rebuilt
from whatever results are there. ``DIR`` defaults to a new temporary folder;
``python -m bench all --out docs`` rewrites the committed tables and plots.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import common, report

SECTIONS = (
    "speed",
    "sqlite",
    "features",
    "ray",
    "topology",
    "worst_case",
    "packing",
    "openb",
    "openb_binpack",
    "openb_baselines",
    "memory",
)


def _save(out: Path, name: str, data: Any) -> None:
    d = out / "benchmarks" / "results"
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}.json").write_text(json.dumps(data, indent=1, default=str) + "\n")


def _record_run(out: Path, info: dict[str, Any]) -> None:
    """Keep, per section, the machine and command of the run that produced its results."""
    path = out / "benchmarks" / "results" / "machine.json"
    runs: list[dict[str, Any]] = []
    if path.is_file():
        old = json.loads(path.read_text())
        runs = old.get("runs", [old] if "cpu" in old else [])
    for r in runs:
        r["sections"] = [s for s in r.get("sections", []) if s not in info["sections"]]
    runs = [r for r in runs if r.get("sections")] + [info]
    _save(out, "machine", {"runs": runs})


def run_section(name: str, light: bool, workers: int) -> Any:
    if name == "speed":
        from bench import speed

        if light:
            return speed.run(clusters=(1, 100), sizes=(1, 8), cycles=300, sqlite_cycles=100, warmup=30)
        return speed.run()
    if name == "sqlite":
        from bench import sqlite_speed

        if light:
            return sqlite_speed.run(nodes=100, cycles=100, warmup=20, procs=(1, 2), duration=1.0, ray=False)
        return sqlite_speed.run()
    if name == "ray":
        from bench import ray_speed

        if light:
            return {"error": "skipped in --light mode"}
        return ray_speed.run()
    if name == "topology":
        from bench import topology_quality

        return topology_quality.run()
    if name == "worst_case":
        from bench import worst_case

        return worst_case.run(samples=2 if light else 8)
    if name == "packing":
        from bench import packing

        if light:
            return {
                "rows": packing.run(clusters=(2,), events=400, loads=(1.1,), seeds=(1,)),
                "curve": packing.utilisation_curve(nodes=2, events=400),
            }
        return {"rows": packing.run(), "curve": packing.utilisation_curve()}
    if name in ("openb", "openb_binpack"):
        from bench import openb

        frag = name == "openb"
        results = (
            openb.run(("default",), (42,), limit_tasks=1500, workers=1, fragmentation=frag)
            if light
            else openb.run(workers=workers, fragmentation=frag)
        )
        data = {
            "light": light,
            "summary": openb.summarise(results),
            "runs": [{k: v for k, v in r.__dict__.items() if k != "curve"} | {"curve": r.curve[::5]} for r in results],
        }
        return data
    if name == "openb_baselines":  # the paper's BestFit and Random under the same protocol, seed 42, for the plot
        from bench import openb

        runs = openb.baselines(("default",), limit_tasks=500, workers=1) if light else openb.baselines(workers=workers)
        return {
            "light": light,
            "runs": [{k: v for k, v in r.__dict__.items() if k != "curve"} | {"curve": r.curve[::5]} for r in runs],
        }
    if name == "features":
        from bench import features

        return features.run(nodes=100, cycles=200, warmup=20) if light else features.run()
    if name == "memory":
        from bench import memory

        return memory.run(nodes=100 if light else 10_000)
    raise ValueError(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("sections", nargs="*", default=["all"], help="all, or any of " + ", ".join(SECTIONS))
    parser.add_argument("--light", action="store_true", help="CI mode: small and quick, no Ray")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: a new temporary one)")
    parser.add_argument("--workers", type=int, default=2, help="processes for the openb replay")
    parser.add_argument("--report-only", action="store_true", help="rebuild tables and plots from saved results")
    args = parser.parse_args(argv)
    sections = list(SECTIONS) if "all" in args.sections else args.sections
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section {unknown[0]!r}; allowed: all, {', '.join(SECTIONS)}")
    out: Path = args.out or Path(tempfile.mkdtemp(prefix="computegroups-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        _record_run(out, common.machine() | {"light": args.light, "argv": sys.argv[1:], "sections": sections})
        for name in sections:
            t0 = time.perf_counter()
            print(f"== {name}", flush=True)
            data = run_section(name, args.light, args.workers)
            _save(out, name, data)
            print(f"== {name}: {time.perf_counter() - t0:.1f}s", flush=True)
    path = report.write(out)
    print(f"results: {out / 'benchmarks' / 'results'}; tables: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
