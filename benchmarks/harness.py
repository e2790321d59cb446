"""Shared benchmark harness: timing (median), environment stamp, CSV rows, ratio tables, pytest-benchmark.

GPU timing: ``triton.testing.do_bench`` (median). CPU timing for the CSVs: our own repeated runs and their
median, the candidates of a comparison taking turns (`round_robin_medians`), not pytest-benchmark, which times
one benchmark's rounds back to back before the next one starts: on a shared CPU a burst of other work then
lands on one candidate only (seen here: 20x outliers) and skews exactly the ratios the reports are about.
pytest-benchmark runs the same candidates (`pytest_benchmark_test`; ``pytest benchmarks/bench_<family>.py
--benchmark-only``) for its statistics and its comparisons between saved runs; its figures are not CSV rows.
Every row records device, date, torch/triton versions, shape, and the achieved rate next to its ceiling.
"""

from __future__ import annotations

import csv
import datetime
import functools
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


@functools.cache
def cpu_model() -> str:
    """The CPU's model name and widest x86 vector ISA (from /proc/cpuinfo where there is one): the same
    kernel runs ~2x apart on AVX2 and AVX-512 machines, so a figure without it cannot be compared."""
    name, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not name:
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    name = name or platform.processor() or platform.machine()
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else ""
    return f"{name} ({isa})" if isa else name


def cpu_cores() -> int:
    """CPUs this process may run on (its affinity mask: a container's share, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def environment(device: torch.device | str | None = None) -> dict[str, str]:
    """What a figure depends on, recorded in every row: device, CPU model and cores (also for GPU rows: the
    host feeds the GPU), threads, GPU model, date (UTC), torch and triton versions, load average.

    `device`: where the row was measured. A CPU device stamps the CPU (``cpu <arch> x<threads> threads``) and
    an empty ``gpu`` even on a machine with a GPU (bench_tiles' CPU candidates on the GPU machine); a CUDA
    device stamps that GPU's name; None (the default): the current GPU when CUDA is available, else the CPU.
    """
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    where = torch.device(device) if device is not None else None
    if where is None:
        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    elif where.type == "cuda":
        gpu = torch.cuda.get_device_name(where)
    else:
        gpu = ""
    threads = torch.get_num_threads()
    stamp = gpu or f"cpu {platform.processor() or platform.machine()} x{threads} threads"
    return {
        "device": stamp,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "torch": torch.__version__,
        "triton": triton_version,
        "cpu": cpu_model(),
        "cores": str(cpu_cores()),
        "threads": str(threads),
        "gpu": gpu,
        # Runnable processes (1-min load average) when the row was written: above the core count, other work
        # shared the CPUs (the round robin spreads it over the candidates; thread pools suffer most).
        "load": f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "",
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


def write_rows(rows: list[Row], name: str, results: Path = RESULTS) -> Path:
    """Append rows to <results>/<name>.csv (default benchmarks/results; header written once). A file written
    before a column was added is rewritten once with the union of the columns, its old rows blank in the new
    ones."""
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"{name}.csv"
    flat = [r.flat() for r in rows]
    fields = list(flat[0])
    if path.exists():
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            old_fields, old_rows = list(reader.fieldnames or []), list(reader)
        if old_fields != fields:
            fields = old_fields + [k for k in fields if k not in old_fields]
            with path.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fields, restval="")
                writer.writeheader()
                writer.writerows(old_rows)
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        if new:
            writer.writeheader()
        writer.writerows(flat)
    return path


def print_table(rows: list[Row], baseline: str | None = None) -> None:
    """Print rows per case and shape (a sweep's points are one case); with `baseline` (a backend name) also
    each row's speed-up over it within the same case and shape."""
    cases: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        cases.setdefault((r.case, r.shape), []).append(r)
    for (case, shape), group in cases.items():
        print(f"\n{case}  [{shape}]")
        base = next((r for r in group if r.backend == baseline), None)
        for r in group:
            ratio = f"{base.seconds / r.seconds:6.2f}x vs {baseline}" if base else ""
            ceiling = f" (ceiling {r.ceiling})" if r.ceiling != "" else ""
            print(f"  {r.backend:<22} {r.seconds * 1e3:10.3f} ms  {r.rate:10.2f} {r.unit}{ceiling}  {ratio}")


def pytest_benchmark_test(make: Callable[[], dict[str, Callable[[], object]]], names: Sequence[str]):
    """A pytest test function that runs each candidate named in `names` under pytest-benchmark's ``benchmark``
    fixture (one test per candidate, parametrized), or None where pytest is not installed. `make()` builds the
    candidates (name -> zero-argument callable) once, at the first test that runs, not at import: a script run
    of the benchmark never pays for it. Assign it to a module-level ``test_*`` name in a bench_<family>.py."""
    try:
        import pytest
    except ImportError:
        return None
    built: dict[str, Callable[[], object]] = {}

    @pytest.mark.parametrize("candidate", list(names))
    def test(benchmark, candidate: str) -> None:
        if not built:
            built.update(make())
        benchmark(built[candidate])

    return test
