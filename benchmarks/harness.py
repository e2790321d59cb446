"""Shared benchmark harness: timing (median), environment stamp, CSV rows, ratio tables.

CPU timing: repeated runs, the median (a warm-up first). GPU timing: ``triton.testing.do_bench`` (median).
Every row records device, date, torch/triton versions, shape, and the achieved rate next to its ceiling.
"""

from __future__ import annotations

import csv
import datetime
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def environment() -> dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"cpu {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
    return {
        "device": device,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "torch": torch.__version__,
        "triton": triton_version,
    }


def median_seconds(
    fn: Callable[[], object], device: torch.device | str = "cpu", *, repeats: int = 10, warmup: int = 2
) -> float:
    """Median wall time of `fn()` in seconds (do_bench on CUDA, repeated runs on CPU)."""
    if torch.device(device).type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def round_robin_medians(
    fns: dict[str, Callable[[], object]], rounds: int, device: torch.device | str = "cpu"
) -> dict[str, float]:
    """Median seconds per candidate, the candidates taking turns, one run each per round, after one warm-up run
    each: on a shared CPU a burst of load from another process then hits every candidate alike instead of all
    repeats of one (seen: 20x outliers). On CUDA every run is synchronised."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


@dataclass
class Row:
    """One measured configuration. `rate` is in `unit` (GB/s, TFLOP/s, tiles/s, tokens/s); `ceiling` is the
    hardware or peer bound it is judged against (empty when none applies)."""

    family: str
    case: str
    backend: str
    shape: str
    seconds: float
    rate: float
    unit: str
    ceiling: float | str = ""
    note: str = ""
    env: dict[str, str] = field(default_factory=environment)

    def flat(self) -> dict[str, object]:
        d = asdict(self)
        return {**d.pop("env"), **d}


def write_rows(rows: list[Row], name: str) -> Path:
    """Append rows to benchmarks/results/<name>.csv (header written once)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.csv"
    flat = [r.flat() for r in rows]
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(flat[0]))
        if new:
            writer.writeheader()
        writer.writerows(flat)
    return path


def print_table(rows: list[Row], baseline: str | None = None) -> None:
    """Print rows per case; with `baseline` (a backend name) also each row's speed-up over it."""
    cases: dict[str, list[Row]] = {}
    for r in rows:
        cases.setdefault(r.case, []).append(r)
    for case, group in cases.items():
        print(f"\n{case}  [{group[0].shape}]")
        base = next((r for r in group if r.backend == baseline), None)
        for r in group:
            ratio = f"{base.seconds / r.seconds:6.2f}x vs {baseline}" if base else ""
            ceiling = f" (ceiling {r.ceiling})" if r.ceiling != "" else ""
            print(f"  {r.backend:<22} {r.seconds * 1e3:10.3f} ms  {r.rate:10.2f} {r.unit}{ceiling}  {ratio}")
