"""benchmarks/report.py: the README's Measured table generated from the CSVs alone, rewritten between its
markers and nowhere else."""

import csv
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "report.py"
FIELDS = "device,date,torch,triton,family,case,backend,shape,seconds,rate,unit,ceiling,note,cpu,cores,threads,gpu,load"
README = """# project

Intro text | with a pipe.

## Measured

<!-- measured:begin -->
| a hand-written 9.9x that no CSV holds |
<!-- measured:end -->

## Layout
tail text
"""


def write_csv(path, rows):
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS.split(","), restval="")
        writer.writeheader()
        writer.writerows(rows)


def row(
    backend,
    seconds,
    *,
    date="2026-12-02 21:00",
    case="tile_gather cpu 2 threads",
    cpu="Test CPU (AVX2)",
    **kw,
):
    return {
        "device": "cpu x86_64 x2 threads",
        "date": date,
        "torch": "2.14.1",
        "triton": "3.8.0",
        "family": "tiles",
        "case": case,
        "backend": backend,
        "shape": "32 imgs, bf16",
        "seconds": seconds,
        "rate": "1.0",
        "unit": "GB/s",
        "cpu": cpu,
        "cores": "7" if cpu else "",
        "threads": "2" if cpu else "",
        "load": "3.5" if cpu else "",
        **kw,
    }


def run_report(tmp_path, *args):
    return subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--results",
            str(tmp_path / "results"),
            "--readme",
            str(tmp_path / "README.md"),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def block(text):
    return text.split("<!-- measured:begin -->")[1].split("<!-- measured:end -->")[0]


@pytest.fixture
def project(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "README.md").write_text(README)
    return tmp_path


def test_table_comes_from_the_csvs_only(project):
    results = project / "results"
    write_csv(
        results / "tiles.csv",
        [
            # An older run whose CPU was not recorded: superseded by the recorded run of the same case.
            row("cpu", "0.5", date="2026-11-28 12:22", case="tile_gather cpu", cpu=""),
            row("torchvision.v2", "0.9", date="2026-11-28 12:22", case="tile_gather cpu", cpu=""),
            row("torch", "0.400"),
            row("cpu", "0.050"),
            row("torchvision.v2", "0.125"),
        ],
    )
    write_csv(
        results / "newfam.csv",
        [row("alpha", "0.002", family="newfam", case="c1"), row("beta", "0.001", family="newfam", case="c1")],
    )
    result = run_report(project)
    assert result.returncode == 0, result.stderr
    text = (project / "README.md").read_text()
    table = block(text)
    # Outside the markers nothing changed.
    assert text.replace(table, "") == README.replace(block(README), "")
    assert "9.9x" not in table
    lines = [line for line in table.splitlines() if line.startswith("| `python")]
    assert len(lines) == 2, table
    tiles = next(line for line in lines if "bench_tiles" in line)
    # Ratios of rows of the same run (0.125/0.050, 0.400/0.050), machine, cores, threads, date, versions.
    for expected in (
        "`cpu` 50 ms",
        "**2.50x** torchvision.v2",
        "8.00x torch",
        "Test CPU (AVX2), 7 cores, 2 threads",
    ):
        assert expected in tiles, tiles
    assert "2026-12-02 21:00" in tiles and "torch 2.14.1, triton 3.8.0" in tiles
    assert "1.80x" not in table and "CPU model not recorded" not in table  # the old run is not shown
    # A family the script has no entry for still gets its rows: every backend's time, fastest first.
    assert "`beta` 1 ms; `alpha` 2 ms" in next(line for line in lines if "bench_newfam" in line)
    # Every number in the table is in a CSV or is a ratio of two of them.
    csv_text = "".join(p.read_text() for p in results.glob("*.csv"))
    for number in re.findall(r"\d+\.\d+x", table):
        assert number in {"2.50x", "8.00x"}, number
    assert "2026-12-02 21:00" in csv_text
    report = (results / "REPORT.md").read_text()
    assert "2026-11-28 12:22" in report  # the old run stays traceable in the full report
    # Idempotent, and --check agrees.
    assert run_report(project).returncode == 0
    assert (project / "README.md").read_text() == text
    assert run_report(project, "--check").returncode == 0


def test_unrecorded_machine_is_labelled_while_nothing_better_exists(project):
    write_csv(
        project / "results" / "tiles.csv",
        [
            row("cpu", "0.5", case="tile_gather cpu", cpu=""),
            row("torch", "1.0", case="tile_gather cpu", cpu=""),
        ],
    )
    assert run_report(project).returncode == 0
    table = block((project / "README.md").read_text())
    assert "CPU model not recorded, 2 threads" in table and "**2.00x** torch" in table


def test_check_and_missing_markers(project):
    write_csv(project / "results" / "tiles.csv", [row("cpu", "0.05"), row("torch", "0.1")])
    result = run_report(project, "--check")
    assert result.returncode == 1 and "out of date" in result.stderr
    assert (project / "README.md").read_text() == README
    (project / "README.md").write_text("# no markers\n")
    result = run_report(project)
    assert result.returncode == 1 and "measured:begin" in result.stderr
    assert (project / "README.md").read_text() == "# no markers\n"


def test_runs_split_where_a_backend_repeats(project):
    write_csv(
        project / "results" / "tiles.csv",
        [
            row("cpu", "0.2", date="2026-12-01 10:00"),
            row("torch", "0.4", date="2026-12-01 10:00"),
            row("cpu", "0.1", date="2026-12-01 10:01"),
            row("torch", "0.4", date="2026-12-01 10:01"),
        ],
    )
    assert run_report(project).returncode == 0
    table = block((project / "README.md").read_text())
    assert "**4.00x** torch" in table and "2.00x" not in table


def test_headline_keeps_the_newest_run_per_case_machine_and_threads(project):
    """The README: one row per case, CPU model and thread count, its newest run even where the sizes changed;
    a run of an unknown CPU gives way to a newer run of the same case on a known one at any thread count.
    REPORT.md keeps every run."""
    one = {"threads": "1", "case": "tile_gather cpu 1 threads"}
    write_csv(
        project / "results" / "tiles.csv",
        [
            row(
                "cpu", "0.5", date="2026-11-28 12:22", case="tile_gather cpu", cpu=""
            ),  # 2 threads, unknown CPU
            row("torchvision.v2", "0.85", date="2026-11-28 12:22", case="tile_gather cpu", cpu=""),
            row("cpu", "0.2", date="2026-12-01 10:00", shape="64 imgs, bf16", **one),
            row("torchvision.v2", "0.3", date="2026-12-01 10:00", shape="64 imgs, bf16", **one),
            row("cpu", "0.1", date="2026-12-02 10:00", **one),
            row("torchvision.v2", "0.125", date="2026-12-02 10:00", **one),
        ],
    )
    assert run_report(project).returncode == 0
    table = block((project / "README.md").read_text())
    lines = [line for line in table.splitlines() if line.startswith("| `python")]
    assert len(lines) == 1, table
    assert "**1.25x** torchvision.v2" in lines[0] and "Test CPU (AVX2), 7 cores, 1 thread," in lines[0]
    for old in ("1.70x", "1.50x", "CPU model not recorded"):
        assert old not in table, old
    report = (project / "results" / "REPORT.md").read_text()
    for old in ("1.70x", "1.50x", "CPU model not recorded"):
        assert old in report, old


def test_e2e_headline_is_training_on_the_mix_and_generation_at_batch_1_and_16(project):
    """The end-to-end benchmark's README rows: the training step on the mix (ours against the original,
    not each part alone) and generation at batch 1 and 16; its sweeps stay in REPORT.md."""

    def e2e(case, backend, seconds):
        aspect = case.split()[-1] if "aspect" in case else "mix"
        shape = f"config=tiny B=8 tokens=3928 aspect={aspect}"  # the fields plots.py reads
        return row(backend, seconds, case=case, family="e2e", shape=shape)

    padded = "padded (left-pad, padded cache)"
    write_csv(
        project / "results" / "e2e.csv",
        [
            e2e("train cpu mix", "ours", "1.0"),
            e2e("train cpu mix", "original", "2.0"),
            e2e("train cpu mix", "skip only", "1.6"),
            e2e("train cpu aspect 2:1", "ours", "1.0"),
            e2e("train cpu aspect 2:1", "original", "3.0"),
            e2e("train cpu mix B=2", "ours", "1.0"),
            e2e("train cpu mix B=2", "original", "1.1"),
            e2e("generate prefill b=1", "ours (packed cache)", "1.0"),
            e2e("generate prefill b=1", padded, "1.3"),
            e2e("generate decode b=16", "ours (packed cache)", "1.0"),
            e2e("generate decode b=16", padded, "1.5"),
            e2e("generate decode b=4", "ours (packed cache)", "1.0"),
            e2e("generate decode b=4", padded, "1.4"),
        ],
    )
    assert run_report(project).returncode == 0
    table = block((project / "README.md").read_text())
    lines = [line for line in table.splitlines() if line.startswith("| `python")]
    assert len(lines) == 3, table
    assert "`ours` 1 s: **2.00x** original |" in next(line for line in lines if "train cpu mix:" in line)
    assert "**1.30x** padded" in table and "**1.50x** padded" in table
    rows = "\n".join(lines)
    for other in ("skip only", "aspect 2:1", "mix B=2", "b=4", "3.00x", "1.40x"):
        assert other not in rows, other
    report = (project / "results" / "REPORT.md").read_text()
    for other in ("**1.25x** original", "3.00x", "1.10x", "1.40x"):
        assert other in report, other


def attention_row(backend, seconds, rate, *, case, lmax, dtype="float32", **kw):
    shape = f"B=8 T=8192 Lmax={lmax} Hq=4 Hkv=1 D=64 {dtype} causal fwd+bwd"
    return row(backend, seconds, case=case, family="attention", shape=shape, rate=rate, unit="GFLOP/s", **kw)


def test_attention_sweep_stays_out_of_the_headline_and_its_figure_is_per_dtype(project):
    """bench_attention's sequence-length sweep: each point a run of REPORT.md, none in the README (its points
    are one case at several sizes); the figure draws each backend per dtype against Lmax, from the sweep only
    where one exists, so fp32 and bf16 rows (or the mix's single point) never join one line."""
    sys.path.insert(0, str(SCRIPT.parent))
    from plots import attention_panels

    mix = "cpu multimodal mix 300..3000"
    rows = [
        attention_row("sphinx_kernels(torch)", "1.0", "49", case=mix, lmax=2394),
        attention_row("padded_sdpa", "1.5", "32", case=mix, lmax=2394),
        attention_row(
            "sphinx_kernels(torch)", "1.1", "42", case=f"{mix} bfloat16", lmax=2394, dtype="bfloat16"
        ),
        attention_row("padded_sdpa", "1.7", "27", case=f"{mix} bfloat16", lmax=2394, dtype="bfloat16"),
    ]
    for lmax, ours, padded in ((4096, "13", "4.5"), (512, "2.5", "1.3"), (1024, "4.0", "2.9")):
        for backend, rate in (("sphinx_kernels(torch)", ours), ("padded_sdpa", padded)):
            rows.append(
                attention_row(backend, str(1 / float(rate)), rate, case="cpu seqlen sweep", lmax=lmax)
            )
    write_csv(project / "results" / "attention.csv", rows)
    assert run_report(project).returncode == 0
    table = block((project / "README.md").read_text())
    assert "seqlen sweep" not in table and table.count("multimodal mix") == 2, table
    report = (project / "results" / "REPORT.md").read_text()
    assert report.count("### attention: cpu seqlen sweep") == 3
    assert "attention_seqlen.png" in report and (project / "results" / "attention_seqlen.png").exists()

    with (project / "results" / "attention.csv").open() as f:
        written = [{**r, "device": "cpu"} for r in csv.DictReader(f)]
    panels = attention_panels(written)
    assert set(panels) == {("cpu", "fwd+bwd (GFLOP/s)", "float32"), ("cpu", "fwd+bwd (GFLOP/s)", "bfloat16")}
    sweep, fp32 = panels["cpu", "fwd+bwd (GFLOP/s)", "float32"]
    assert sweep and fp32["sphinx_kernels(torch)"] == [(512, 2.5), (1024, 4.0), (4096, 13.0)]
    assert fp32["padded_sdpa"] == [(512, 1.3), (1024, 2.9), (4096, 4.5)]
    sweep, bf16 = panels["cpu", "fwd+bwd (GFLOP/s)", "bfloat16"]
    assert not sweep and bf16 == {"sphinx_kernels(torch)": [(2394, 42.0)], "padded_sdpa": [(2394, 27.0)]}
