"""Figures of the benchmark results (benchmarks/results/*.csv): ours beside each peer, one figure per idea.

    python benchmarks/plots.py [RESULTS_DIR] [OUT_DIR]

`render(results_dir, out_dir)` writes the PNGs and returns ``[(title, path), ...]`` for those whose rows
exist (benchmarks/report.py embeds them in REPORT.md). Each figure takes the newest row of every (machine,
case, backend) in its CSV (rows are appended in time order), one panel per machine: the device text and, for
CPU rows, the CPU model ("CPU model not recorded" for rows older than that column).
"""

from __future__ import annotations

import csv
import re
import sys
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

OURS_COLOUR, PEER_COLOUR, PART_COLOUR = "#d62728", "#7f7f7f", "#ff9896"
# Backends that are this project's own kernels (their bars are drawn in OURS_COLOUR).
_OURS = re.compile(r"^(ours|sphinx|cpu$|cuda$|triton|kernels only|skip only|packing only)")


def _is_ours(backend: str) -> bool:
    return bool(_OURS.match(backend))


# A peer keeps its colour in every panel of a figure (matplotlib's cycle would restart per panel).
_PEER_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
_peer_colours: dict[str, str] = {}


def _colour(backend: str) -> str:
    if _is_ours(backend):
        return OURS_COLOUR
    return _peer_colours.setdefault(backend, _PEER_PALETTE[len(_peer_colours) % len(_PEER_PALETTE)])


def _read(results_dir: Path, name: str) -> list[dict[str, str]]:
    path = results_dir / f"{name}.csv"
    if not path.exists():
        return []
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    latest: dict[tuple[str, str, str, str], dict[str, str]] = {}
    for r in rows:  # later rows replace earlier ones: the newest measurement of each configuration
        r["device"] = _machine(r)
        latest[(r["device"], r.get("case", ""), r.get("backend", ""), r.get("shape", ""))] = r
    return [r for r in latest.values() if _float(r.get("rate")) > 0]


def _machine(row: dict[str, str]) -> str:
    """A panel's machine: the GPU, or the CPU device text with its CPU model, so that a figure of an unknown
    CPU is never drawn in the panel of a known one (nor read as if it were)."""
    device = row.get("device", "")
    if row.get("gpu") or not device.startswith("cpu"):
        return device
    return f"{device}, {row.get('cpu') or 'CPU model not recorded'}"


def _float(value: str | None) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return float("nan")


def _fields(shape: str) -> dict[str, str]:
    """``key=value`` pairs of a shape string (``B=8 tokens=3123 aspect=2:1``)."""
    return dict(re.findall(r"(\w+)=(\S+)", shape))


def _by_device(rows: list[dict[str, str]]) -> dict[str, list[dict[str, str]]]:
    out: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        out.setdefault(r["device"], []).append(r)
    return out


def _figure(panels: int, width: float = 6.0, height: float = 3.6):
    """A figure of `panels` axes, at most 3 per row."""
    cols = min(panels, 3)
    rows = -(-panels // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[panels:]:
        ax.set_visible(False)
    return fig, flat[:panels]


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _bars(
    ax, groups: list[str], series: dict[str, list[float]], unit: str, *, ratio_to: str | None = None
) -> None:
    """Grouped bars: one group per entry of `groups`, one bar per series (ours in red, peers in grey);
    with `ratio_to`, each bar is labelled with its ratio to that series."""
    names = list(series)
    width = 0.8 / max(len(names), 1)
    for j, name in enumerate(names):
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(groups))]
        colour = OURS_COLOUR if name == names[0] and _is_ours(name) else PEER_COLOUR
        if _is_ours(name) and name != names[0]:
            colour = PART_COLOUR
        bars = ax.bar(xs, series[name], width, label=name, color=colour, edgecolor="black", linewidth=0.4)
        if ratio_to is not None and name != ratio_to:
            for bar, value, base in zip(bars, series[name], series[ratio_to], strict=True):
                if value == value and base == base and base > 0:
                    ax.annotate(f"{value / base:.2f}x", (bar.get_x() + bar.get_width() / 2, value),
                                ha="center", va="bottom", fontsize=7)  # fmt: skip
    ax.set_xticks(range(len(groups)), groups, rotation=30 if len(groups) > 4 else 0, ha="right" if len(groups) > 4 else "center", fontsize=8)  # fmt: skip
    ax.set_ylabel(unit)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)


# ----------------------------------------------------------------------------------------------- e2e
def _e2e_tokens(results: Path, path: Path) -> Path | None:
    rows = [r for r in _read(results, "e2e") if re.match(r"train \w+ mix", r["case"])]
    rows = [r for r in rows if r["backend"] in ("ours", "original")]
    devices = _by_device(rows)
    if not devices:
        return None
    fig, axes = _figure(len(devices))
    for ax, (device, group) in zip(axes, devices.items(), strict=True):
        rates = {}
        for backend, colour in (("ours", OURS_COLOUR), ("original", PEER_COLOUR)):
            pts = sorted(
                (int(_fields(r["shape"])["tokens"]), _float(r["rate"]))
                for r in group
                if r["backend"] == backend
            )
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], "o-", color=colour, label=backend)
            rates[backend] = dict(pts)
        # Each ratio is within one run; absolute rates of different runs move with the machine's load.
        for x, y in rates.get("ours", {}).items():
            if x in rates.get("original", {}):
                ax.annotate(f"{y / rates['original'][x]:.2f}x", (x, y), textcoords="offset points",
                            xytext=(0, 5), ha="center", fontsize=8)  # fmt: skip
        ax.set_xlabel("tokens per step (samples' positions, skip-token layout)")
        ax.set_ylabel("tokens/s")
        ax.set_title(device, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def _e2e_aspect(results: Path, path: Path) -> Path | None:
    rows = [r for r in _read(results, "e2e") if re.match(r"train \w+ aspect", r["case"])]
    devices = _by_device(rows)
    if not devices:
        return None
    fig, axes = _figure(len(devices), width=7.0)
    for ax, (device, group) in zip(axes, devices.items(), strict=True):
        aspects = list(dict.fromkeys(_fields(r["shape"])["aspect"] for r in group))
        rate = {(_fields(r["shape"])["aspect"], r["backend"]): _float(r["rate"]) for r in group}
        series = {b: [rate.get((a, b), float("nan")) for a in aspects] for b in ("ours", "original")}
        _bars(ax, aspects, series, "tokens/s", ratio_to="original")
        ax.set_xlabel("aspect ratio (width:height) of every image in the batch")
        ax.set_title(device, fontsize=9)
    return _save(fig, path)


def _e2e_parts(results: Path, path: Path) -> Path | None:
    rows = [r for r in _read(results, "e2e") if re.fullmatch(r"train \w+ mix", r["case"])]
    devices = _by_device(rows)
    if not devices:
        return None
    fig, axes = _figure(len(devices))
    for ax, (device, group) in zip(axes, devices.items(), strict=True):
        rate = {r["backend"]: _float(r["rate"]) for r in group}
        if "original" not in rate:
            continue
        names = list(rate)
        speedup = [rate[n] / rate["original"] for n in names]
        colours = [
            OURS_COLOUR if n == "ours" else PEER_COLOUR if n == "original" else PART_COLOUR for n in names
        ]
        bars = ax.bar(names, speedup, color=colours, edgecolor="black", linewidth=0.4)
        for bar, s in zip(bars, speedup, strict=True):
            ax.annotate(
                f"{s:.2f}x", (bar.get_x() + bar.get_width() / 2, s), ha="center", va="bottom", fontsize=8
            )
        ax.axhline(1.0, color="black", linewidth=0.6)
        ax.set_ylabel("training-step speed-up over the original")
        ax.set_title(f"{device}\n{group[0]['shape']}", fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def _e2e_generate(results: Path, path: Path) -> Path | None:
    rows = [r for r in _read(results, "e2e") if r["case"].startswith("generate")]
    devices = _by_device(rows)
    if not devices:
        return None
    fig, axes = _figure(len(devices))
    for ax, (device, group) in zip(axes, devices.items(), strict=True):
        cases = list(dict.fromkeys(r["case"].removeprefix("generate ") for r in group))
        backends = list(dict.fromkeys(r["backend"] for r in group))
        rate = {(r["case"].removeprefix("generate "), r["backend"]): _float(r["rate"]) for r in group}
        series = {b: [rate.get((c, b), float("nan")) for c in cases] for b in backends}
        _bars(ax, cases, series, "tokens/s", ratio_to=next((b for b in backends if not _is_ours(b)), None))
        ax.set_yscale("log")
        ax.set_title(device, fontsize=9)
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------- kernels
_DTYPE = re.compile(r"\b(bfloat16|float16|float32|float64)\b")


def attention_panels(
    rows: list[dict[str, str]],
) -> dict[tuple[str, str, str], tuple[bool, dict[str, list[tuple[int, float]]]]]:
    """The attention figure's data: ``(machine, pass (unit), dtype) -> (sweep, backend -> [(Lmax, rate)])``,
    points sorted by Lmax. One panel per dtype (fp32, bf16 and fp16 rows of one backend are different
    workloads, never one line) and pass (``fwd``, ``fwd+bwd``, ``decode`` in GB/s). Where a panel has rows of a
    ``seqlen sweep`` case, only those (`sweep` True: each backend's points are one workload at growing Lmax,
    drawn as a line); else every row, drawn as separate points (different workloads)."""
    panels: dict[tuple[str, str, str], list[dict[str, str]]] = {}
    for r in rows:
        text = r["case"] + " " + r["shape"]
        what = "decode" if r["unit"] == "GB/s" else "fwd+bwd" if "fwd+bwd" in text else "fwd"
        found = _DTYPE.search(r["shape"])
        key = (r["device"], f"{what} ({r['unit']})", found.group(1) if found else "")
        panels.setdefault(key, []).append(r)
    out = {}
    for key, group in panels.items():
        sweep = [r for r in group if "seqlen sweep" in r["case"]]
        series: dict[str, list[tuple[int, float]]] = {}
        for r in sweep or group:
            lmax = int(_fields(r["shape"]).get("Lmax", 0))
            series.setdefault(r["backend"], []).append((lmax, _float(r["rate"])))
        out[key] = (bool(sweep), {backend: sorted(pts) for backend, pts in series.items()})
    return out


def _attention_seqlen(results: Path, path: Path) -> Path | None:
    panels = attention_panels(_read(results, "attention"))
    if not panels:
        return None
    fig, axes = _figure(len(panels), width=5.0)
    for ax, ((device, what, dtype), (sweep, series)) in zip(axes, panels.items(), strict=True):
        for backend, pts in series.items():
            ax.plot([x for x, _ in pts], [y for _, y in pts], "o-" if sweep else "o", label=backend,
                    color=_colour(backend))  # fmt: skip
        ax.set_xlabel("longest sequence (Lmax)" + ("" if sweep else "; no sweep measured: single workloads"))
        ax.set_ylabel(what.split("(")[-1].rstrip(")"))
        ax.set_title(f"{device}: {what.split(' (')[0]} {dtype}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def _family_bars(family: str) -> Callable[[Path, Path], Path | None]:
    def draw(results: Path, path: Path) -> Path | None:
        rows = _read(results, family)
        panels: dict[tuple[str, str], list[dict[str, str]]] = {}
        for r in rows:
            panels.setdefault((r["device"], r["case"]), []).append(r)
        if not panels:
            return None
        panels = dict(list(panels.items())[:6])
        fig, axes = _figure(len(panels), width=4.5)
        for ax, ((device, case), group) in zip(axes, panels.items(), strict=True):
            latest = {r["backend"]: r for r in group}
            names = sorted(latest, key=lambda n: not _is_ours(n))
            values = [_float(latest[n]["rate"]) for n in names]
            colours = [OURS_COLOUR if _is_ours(n) else PEER_COLOUR for n in names]
            ax.bar(names, values, color=colours, edgecolor="black", linewidth=0.4)
            ax.set_ylabel(latest[names[0]]["unit"])
            ax.set_title(f"{device}\n{case}", fontsize=8)
            ax.tick_params(axis="x", labelsize=7, rotation=30)
            ax.grid(axis="y", alpha=0.3)
        return _save(fig, path)

    return draw


FIGURES: list[tuple[str, str, Callable[[Path, Path], Path | None]]] = [
    ("End-to-end training step: ours vs the original, by tokens per step", "e2e_tokens.png", _e2e_tokens),
    ("End-to-end training step by aspect ratio (skip tokens matter from 2:1)", "e2e_aspect.png", _e2e_aspect),
    ("Where the end-to-end speed-up comes from (each part alone)", "e2e_parts.png", _e2e_parts),
    ("Generation: packed KV cache vs padded cache (prefill, decode)", "e2e_generate.png", _e2e_generate),
    ("Varlen attention: throughput vs sequence length", "attention_seqlen.png", _attention_seqlen),
    ("Skip-token tile gathering: backends vs peers", "tiles.png", _family_bars("tiles")),
    ("Grouped MoE: backends vs peers", "moe.png", _family_bars("moe")),
    ("Hugging Face transformers backend: fine-tune steps", "transformers.png", _family_bars("transformers")),
]


def render(results_dir: Path, out_dir: Path) -> list[tuple[str, Path]]:
    """Write every figure whose CSV rows exist in `results_dir` to `out_dir`; returns ``[(title, png)]``."""
    results_dir, out_dir = Path(results_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    made = []
    for title, name, draw in FIGURES:
        path = draw(results_dir, out_dir / name)
        if path is not None:
            made.append((title, path))
    return made


if __name__ == "__main__":
    here = Path(__file__).parent / "results"
    results = Path(sys.argv[1]) if len(sys.argv) > 1 else here
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else results
    for title, png in render(results, out):
        print(f"{png}  {title}")
