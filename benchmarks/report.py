"""Generate the README's "Measured" table and benchmarks/results/REPORT.md from benchmarks/results/*.csv only.

    python benchmarks/report.py [--results DIR] [--readme README.md] [--report DIR/REPORT.md] [--check]

Every figure written comes from a CSV row (or is a ratio of two rows of the same run): a figure that is not
in a CSV cannot reach the README. Each README row names the machine (CPU model and vector ISA, cores,
threads, GPU), the date and the torch/triton versions of the run it comes from.

README.md: the block between ``<!-- measured:begin -->`` and ``<!-- measured:end -->`` is replaced; the
rest of the file is left byte for byte. ``--check`` exits 1 if the README is not what this would write.

Structure: the CSV rows are grouped into runs (`Run`: consecutive rows of one case on one machine). The README
gets a headline table (`headline_runs`): one row per benchmark case, machine and thread count, its newest
run only, and of a family's cases only its headline ones (`Family.headline`: the end-to-end benchmark shows
the training step on the mix and generation at batch 1 and 16, not its sweeps). REPORT.md keeps everything:
the latest run of each case and shape (`latest_runs`), every row of those runs, and every run in the CSVs.
Each family (`FAMILIES`, one `Family` per benchmarks/results/<family>.csv) says how its runs read in one
line: which backends are ours and which peers they are compared with. A family without an entry still gets
rows (every backend's time). More report sections (plots, end-to-end tables) are added to `SECTIONS`.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
BEGIN, END = "<!-- measured:begin -->", "<!-- measured:end -->"


@dataclass
class Run:
    """Rows of one case measured together on one machine (consecutive in their CSV)."""

    family: str
    case: str
    rows: list[dict[str, str]] = field(default_factory=list)

    @property
    def first(self) -> dict[str, str]:
        return self.rows[0]

    @property
    def date(self) -> str:
        return max(r["date"] for r in self.rows)

    @property
    def threads(self) -> str:
        """Threads of the run: the column where recorded, else parsed from the older `device` text."""
        if self.first.get("threads"):
            return self.first["threads"]
        found = re.search(r"x(\d+) threads", self.first.get("device", ""))
        return found.group(1) if found else ""

    @property
    def cpu(self) -> str:
        return self.first.get("cpu", "")

    @property
    def gpu(self) -> str:
        return self.first.get("gpu", "")

    @property
    def base_case(self) -> str:
        """The case without its thread count (older rows did not name it): the key runs are matched by."""
        return re.sub(r"\s+\d+ threads?$", "", self.case)

    @property
    def key(self) -> tuple[str, ...]:
        """What a run measures, whatever the CPU: family, case, shape, threads, GPU."""
        return (self.family, self.base_case, self.first.get("shape", ""), self.threads, self.gpu)

    @property
    def case_key(self) -> tuple[str, ...]:
        """The case whatever its sizes, machine and threads: family, case, the shape's words. The shape's
        numbers are left out (a case re-measured at other sizes is the same case; its newest run stands);
        its words stay (transformers' padded and packed batches differ only there)."""
        return (self.family, self.base_case, re.sub(r"\d+(\.\d+)?", "#", self.first.get("shape", "")))

    def seconds(self, backend: str) -> float | None:
        row = next((r for r in self.rows if r["backend"] == backend), None)
        return float(row["seconds"]) if row else None

    def machine(self) -> str:
        """CPU model (vector ISA), cores, threads, GPU, load average: all from the rows."""
        first = self.first
        if self.cpu:
            parts = [self.cpu, f"{first.get('cores') or '?'} cores"]
        else:
            parts = ["CPU model not recorded"]
        if self.threads and not self.gpu:
            parts.append(f"{self.threads} thread{'' if self.threads == '1' else 's'}")
        if self.gpu:
            parts.append(self.gpu)
        if first.get("load"):
            parts.append(f"load {first['load']}")  # above the core count: other work shared the CPUs
        return ", ".join(parts)

    def versions(self) -> str:
        return f"torch {self.first.get('torch', '?')}, triton {self.first.get('triton', '?')}"


def read_runs(results: Path) -> list[Run]:
    """Every run of every CSV under `results`, in file order. A run ends where the case or machine changes or
    a backend repeats (the next run of the same case)."""
    runs: list[Run] = []
    for path in sorted(results.glob("*.csv")):
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        current: Run | None = None
        current_key: tuple | None = None
        for row in rows:
            key = (row.get("case"), row.get("device"), row.get("cpu", ""), row.get("threads", ""))
            same = current is not None and key == current_key
            if not same or any(r["backend"] == row["backend"] for r in current.rows):
                current = Run(row.get("family") or path.stem, row.get("case", ""))
                current_key = key
                runs.append(current)
            current.rows.append(row)
    return runs


def latest_runs(runs: list[Run]) -> list[Run]:
    """The latest run per (family, case without thread count, shape, threads, CPU model, GPU). A run whose CPU was
    not recorded is dropped when a recorded run of the same case and threads exists: a figure without its
    machine is kept only while there is nothing better."""
    latest = newest_by(runs, lambda run: (*run.key, run.cpu))
    recorded = {r.key for r in latest if r.cpu}
    return sorted((r for r in latest if r.cpu or r.key not in recorded), key=table_order)


def newest_by(runs: list[Run], key: Callable[[Run], tuple]) -> list[Run]:
    """The newest run (by date; the later in the CSVs on a tie) of each `key`."""
    newest: dict[tuple, Run] = {}
    for run in runs:
        k = key(run)
        if k not in newest or run.date >= newest[k].date:
            newest[k] = run
    return list(newest.values())


def table_order(run: Run) -> tuple:
    return (run.family, run.base_case, run.gpu, int(run.threads or 0), run.cpu)


def headline_runs(runs: list[Run]) -> list[Run]:
    """The README's rows: the newest run per (case whatever its sizes, CPU model, GPU, threads), of the
    family's headline cases only. A run whose CPU model was not recorded is left out when a newer run of the
    same case (any thread count) names its CPU: that figure's machine is unknown and a newer one exists; while
    nothing newer exists it stays, labelled "CPU model not recorded"."""
    newest = newest_by(runs, lambda run: (*run.case_key, run.cpu, run.gpu, run.threads))
    recorded: dict[tuple, str] = {}  # case and GPU -> date of the newest run that names its CPU
    for run in newest:
        if run.cpu:
            key = (*run.case_key, run.gpu)
            recorded[key] = max(recorded.get(key, ""), run.date)
    kept = [
        run
        for run in newest
        if family_of(run.family).in_headline(run.base_case)
        and (run.cpu or recorded.get((*run.case_key, run.gpu), "") <= run.date)
    ]
    return sorted(kept, key=table_order)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"


@dataclass
class Family:
    """How a family's runs read: `ours` (backends of this project, first present is the headline), `peers`
    (compared with, in order), the command that produced the CSV. `headline`: a regular expression the README's
    cases match in full (empty: every case); `headline_ours`: the backends of `ours` the README shows (empty:
    all of them). REPORT.md shows every case and backend."""

    command: str
    ours: tuple[str, ...] = ()
    peers: tuple[str, ...] = ()
    headline: str = ""
    headline_ours: tuple[str, ...] = ()

    def in_headline(self, case: str) -> bool:
        return not self.headline or re.fullmatch(self.headline, case) is not None

    def summary(self, run: Run, *, headline: bool = False) -> str:
        shown = self.headline_ours if headline and self.headline_ours else self.ours
        ours = [b for b in shown if run.seconds(b) is not None]
        if not ours:  # unknown layout: every backend's time, fastest first
            times = sorted((float(r["seconds"]), r["backend"]) for r in run.rows)
            return "; ".join(f"`{b}` {ms(s)}" for s, b in times)
        parts = []
        for backend in ours:
            s = run.seconds(backend)
            ratios = [
                f"**{run.seconds(p) / s:.2f}x** {p}" if i == 0 else f"{run.seconds(p) / s:.2f}x {p}"
                for i, p in enumerate(q for q in self.peers if run.seconds(q) is not None)
            ]
            parts.append(f"`{backend}` {ms(s)}" + (": " + ", ".join(ratios) if ratios else ""))
        return "; ".join(parts)


FAMILIES: dict[str, Family] = {
    "tiles": Family(
        "python benchmarks/bench_tiles.py",
        ours=("cpu", "cpu[avx2]", "cpu[scalar]", "cuda", "triton"),
        peers=("torchvision.v2", "torch"),
    ),
    "attention": Family(
        "python benchmarks/bench_attention.py",
        ours=("sphinx_kernels(torch)", "sphinx_kernels(triton)", "triton", "flash_attn"),
        peers=("padded_sdpa", "per_sequence_sdpa", "padded_sdpa(mask)"),
        # The sequence-length sweep's points are one case at several sizes: REPORT.md and its figure.
        headline=r"(?!.*seqlen sweep).*",
    ),
    "moe": Family(
        "python benchmarks/bench_moe.py",
        ours=("cpu", "triton", "cuda"),
        peers=("_grouped_mm sorted (peer)", "loop sorted (peer)", "torch"),
    ),
    "transformers": Family(
        "python benchmarks/bench_transformers.py",
        ours=("sphinx+sphinx",),
        peers=("sdpa+grouped_mm", "eager+eager"),
    ),
    "e2e": Family(
        "python benchmarks/bench_e2e.py",
        ours=("ours", "skip only", "packing only", "kernels only", "ours (packed cache)"),
        peers=("original", "padded (left-pad, padded cache)"),
        # The README: the training step on the mix, ours against the original, and generation at batch 1
        # and 16; the aspect-ratio and batch-size sweeps and each part alone are in REPORT.md.
        headline=r"train \w+ mix|generate (prefill|decode) b=(1|16)",
        headline_ours=("ours", "ours (packed cache)"),
    ),
}


def family_of(name: str) -> Family:
    return FAMILIES.get(name, Family(f"python benchmarks/bench_{name}.py"))


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


GENERATED = (
    "Generated by `python benchmarks/report.py` from `benchmarks/results/*.csv` (every figure is a CSV row or a "
    "ratio of two rows of the same run); medians; the candidates of a run take turns on the same machine."
)
README_SCOPE = (
    "One row per benchmark case, machine and thread count: its newest run (a run whose CPU model was not "
    "recorded gives way to a newer one of the same case that names it); of the end-to-end benchmark, the "
    "training step on the mix and generation at batch 1 and 16. Older runs, the end-to-end sweeps (aspect "
    "ratios, batch sizes, each part alone) and the figures: `benchmarks/results/REPORT.md`."
)
REPORT_SCOPE = (
    "The latest run of every case and shape, every backend; below it every row of those runs and every run."
)


def measured_block(runs: list[Run], *, headline: bool = True) -> str:
    """The Measured table, one row per run: the README's headline (`headline_runs`, headline backends) or,
    with ``headline=False``, REPORT.md's full one."""
    lines = [
        f"{GENERATED} {README_SCOPE if headline else REPORT_SCOPE}",
        "",
        "| benchmark (command) | case | result | machine | date (UTC) | versions |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        fam = family_of(run.family)
        lines.append(
            "| "
            + " | ".join(
                cell(x)
                for x in (
                    f"`{fam.command}`",
                    f"{run.base_case}: {run.first.get('shape', '')}",
                    fam.summary(run, headline=headline),
                    run.machine(),
                    run.date,
                    run.versions(),
                )
            )
            + " |"
        )
    return "\n".join(lines)


def runs_section(runs: list[Run]) -> str:
    """Every row of the kept runs, as measured."""
    out = ["## Latest run of each case", ""]
    for run in runs:
        out += [
            f"### {run.family}: {run.case}",
            "",
            f"`{family_of(run.family).command}`; {run.first.get('shape', '')}; {run.machine()}; {run.date} UTC; "
            f"{run.versions()}",
            "",
            "| backend | time | rate | ceiling | note |",
            "| --- | --- | --- | --- | --- |",
        ]
        for r in run.rows:
            rate = f"{float(r['rate']):.4g} {r['unit']}" if r.get("rate") else ""
            out.append(
                "| "
                + " | ".join(
                    cell(x)
                    for x in (
                        f"`{r['backend']}`",
                        ms(float(r["seconds"])),
                        rate,
                        r.get("ceiling", ""),
                        r.get("note", ""),
                    )
                )
                + " |"
            )
        out.append("")
    return "\n".join(out)


def history_section(all_runs: list[Run]) -> str:
    """Every run in the CSVs, one line each, so a figure can be traced to the run that produced it."""
    out = [
        "## Every run in the CSVs",
        "",
        "| family | case | machine | date (UTC) | result |",
        "| --- | --- | --- | --- | --- |",
    ]
    for run in all_runs:
        out.append(
            "| "
            + " | ".join(
                cell(x)
                for x in (run.family, run.case, run.machine(), run.date, family_of(run.family).summary(run))
            )
            + " |"
        )
    return "\n".join(out) + "\n"


# Sections of REPORT.md after the table, in order: each takes (kept runs, every run) and returns markdown.
SECTIONS: list[Callable[[list[Run], list[Run]], str]] = [
    lambda kept, _all: runs_section(kept),
    lambda _kept, every: history_section(every),
]


def report_markdown(kept: list[Run], every: list[Run]) -> str:
    head = ["# Measured results", "", "Do not edit by hand.", ""]
    table = measured_block(kept, headline=False)
    return "\n".join(head + [table, ""] + [section(kept, every) for section in SECTIONS])


def replace_block(readme: str, block: str) -> str:
    """`readme` with the text between the markers replaced by `block` (markers kept, each on its own line)."""
    if readme.count(BEGIN) != 1 or readme.count(END) != 1 or readme.index(BEGIN) > readme.index(END):
        raise ValueError(f"the README needs exactly one {BEGIN} followed by one {END}")
    head, rest = readme.split(BEGIN)
    _, tail = rest.split(END)
    return f"{head}{BEGIN}\n{block}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of <family>.csv files")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--report", type=Path, default=None, help="default: <results>/REPORT.md")
    parser.add_argument("--check", action="store_true", help="exit 1 if the README's table is out of date")
    args = parser.parse_args(argv)
    every = read_runs(args.results)
    if not every:
        print(f"no runs in {args.results}/*.csv", file=sys.stderr)
        return 1
    kept = latest_runs(every)
    headline = headline_runs(every)
    readme = args.readme.read_text()
    try:
        new = replace_block(readme, measured_block(headline))
    except ValueError as exc:
        print(f"{args.readme}: {exc}", file=sys.stderr)
        return 1
    if args.check:
        if new != readme:
            print(
                f"{args.readme}: the Measured table is out of date: run python benchmarks/report.py",
                file=sys.stderr,
            )
            return 1
        return 0
    args.readme.write_text(new)
    report = args.report or args.results / "REPORT.md"
    from plots import render  # benchmarks/plots.py: the figures, written beside REPORT.md

    figures = render(args.results, report.parent)
    SECTIONS.insert(0, lambda _k, _e: "\n\n".join(["## Figures", *(f"![{t}]({p.name})" for t, p in figures)]))
    report.write_text(report_markdown(kept, every))
    print(f"wrote the Measured table of {args.readme} ({len(headline)} rows) and {report} ({len(kept)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
