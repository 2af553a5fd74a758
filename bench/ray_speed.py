"""The same allocate-and-release cycle through Ray placement groups, on a local Ray with 8 logical GPUs.

A cycle is ``placement_group([{"GPU": k}], strategy="STRICT_PACK")``, waiting
until it is ready, then ``remove_placement_group``. Two modes: *settled* waits,
untimed, until Ray has returned the previous group's GPUs before timing the
next cycle (the fair comparison); *back-to-back* starts the next cycle at once,
so it also pays for Ray freeing the previous bundle asynchronously. Ray is
optional: without it this module reports why and the comparison is skipped.
"""

from __future__ import annotations

import time
from typing import Any

from bench.common import median, percentile


def available() -> str | None:
    """None if Ray can be imported, else the reason it cannot."""
    try:
        import ray  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"{type(exc).__name__}: {exc}"
    return None


def run(sizes: tuple[int, ...] = (1, 2, 4, 8), cycles: int = 200, warmup: int = 20, log: Any = print) -> dict[str, Any]:
    """Latency of cycles per group size; ``{"error": ...}`` if Ray is missing or will not start."""
    why = available()
    if why is not None:
        return {"error": why}
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    t0 = time.perf_counter()
    try:
        ray.init(num_gpus=8, num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    except Exception as exc:
        return {"error": f"ray.init failed: {type(exc).__name__}: {exc}"}
    start_s = time.perf_counter() - t0
    rows = []

    def settle() -> None:
        # Removal returns before Ray frees the bundle; wait (untimed) until all 8 GPUs are back.
        deadline = time.perf_counter() + 30
        while ray.available_resources().get("GPU", 0) < 8 and time.perf_counter() < deadline:
            time.sleep(0.001)

    try:
        for k in sizes:
            for mode in ("settled", "back-to-back"):
                lat: list[float] = []
                n_cycles = cycles if mode == "settled" else max(10, cycles // 10)
                for n in range(warmup + n_cycles):
                    if mode == "settled":
                        settle()
                    t1 = time.perf_counter()
                    pg = placement_group([{"GPU": k}], strategy="STRICT_PACK")
                    ray.get(pg.ready(), timeout=60)
                    remove_placement_group(pg)
                    dt = time.perf_counter() - t1
                    if n >= warmup:
                        lat.append(dt)
                settle()
                row = {
                    "k": k,
                    "mode": mode,
                    "cycles": n_cycles,
                    "p50_us": 1e6 * median(lat),
                    "p99_us": 1e6 * percentile(lat, 99),
                    "per_s": n_cycles / sum(lat),
                }
                rows.append(row)
                log(
                    f"ray ({mode}): k={k}: p50 {row['p50_us']:9.1f} us  p99 {row['p99_us']:9.1f} us  "
                    f"{row['per_s']:7.1f} cycles/s"
                )
    finally:
        ray.shutdown()
    return {"version": ray.__version__, "start_s": start_s, "rows": rows}
