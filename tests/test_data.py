"""sphinx_x.data (reading, mixing, measuring, packing, decoding in workers) and the demo set's answers."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from sphinx_x import data as sxd
from sphinx_x.demo_data import COLOURS, box_iou, make_demo_data, parse_box


def _turns(*pairs):
    out = []
    for q, a in pairs:
        out += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return out


def _png(path: Path, h: int, w: int, rng) -> Path:
    pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    PIXELS[path.name] = pixels
    return path


PIXELS: dict[str, np.ndarray] = {}  # what _png wrote, by file name


def _text_length(sample, size):
    """A stand-in length function: characters of the turns, plus 10 per 32x32 block of the image."""
    n = sum(len(t["value"]) + 1 for t in sample["conversations"])
    return n + (0 if size is None else 10 * (-(-size[0] // 32)) * (-(-size[1] // 32)))


# ------------------------------------------------------------------------------------------------ images


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_exif_orientation_applied_and_header_size_agrees(tmp_path, seed, suffix, orientation):
    rng = np.random.default_rng(seed)
    h, w = (int(n) for n in rng.integers(3, 40, size=2))
    pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"photo{suffix}"
    Image.fromarray(pixels).save(path, exif=exif, **({"quality": 100} if suffix == ".jpg" else {}))
    # EXIF orientation -> the turn a viewer applies: 3 = 180 degrees, 6 = 90 clockwise, 8 = 90 counter-clockwise.
    want = {1: pixels, 3: np.rot90(pixels, 2), 6: np.rot90(pixels, -1), 8: np.rot90(pixels, 1)}[orientation]
    got = sxd.load_image(path)
    assert got.dtype == torch.uint8 and tuple(got.shape) == want.shape
    assert sxd.image_size(path) == want.shape[:2]
    if suffix == ".png":  # lossless: the very pixels
        assert np.array_equal(got.numpy(), want)


# ------------------------------------------------------------------------------------------------ reading


def test_read_jsonl_and_json_strip_markers_and_resolve_images(tmp_path):
    rows = [
        {"id": "a", "image": "img/x.png", "conversations": _turns(("<image>\nWhat is it?", "A cat."))},
        {"conversations": _turns(("Hi <image>", "Hello"), ("More?", "No."))},
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    for name in ("d.jsonl", "d.json"):
        samples = sxd.read_samples(tmp_path / name, root="/data")
        assert [s["image"] for s in samples] == [str(Path("/data/img/x.png")), None]
        assert samples[0]["conversations"][0]["value"] == "What is it?"
        assert samples[1]["conversations"][0]["value"] == "Hi"
        assert samples[0]["id"] == "a" and samples[1]["id"].startswith(str(tmp_path / name))
    assert sxd.read_samples(tmp_path / "d.jsonl")[0]["image"] == str(tmp_path / "img/x.png")
    # A JSON list names the file and the line of a syntax error, and the list index of a schema error.
    (tmp_path / "bad.json").write_text("[\n" + json.dumps(rows[0]) + ",\n{oops}\n]")
    with pytest.raises(ValueError, match="bad.json:3: malformed JSON"):
        sxd.read_samples(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text(json.dumps([rows[0], {"conversations": []}]))
    with pytest.raises(ValueError, match=r"bad.json\[1\]: 'conversations'"):
        sxd.read_samples(tmp_path / "bad.json")


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"conversations": [', "malformed JSON"),
        ('{"conversations": []}', "non-empty list"),
        ('{"conversations": [{"from": "bot", "value": "x"}]}', "conversations\\[0\\]"),
        ('{"conversations": [{"from": "gpt", "value": "x"}]}', "alternate"),
        ('{"conversations": [{"from": "human", "value": "x"}]}', "no 'gpt' turn"),
        (
            '{"image": 3, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}',
            "'image'",
        ),
    ],
)
def test_bad_jsonl_line_is_an_error_naming_file_and_line(tmp_path, line, message):
    good = json.dumps({"conversations": _turns(("q", "a"))})
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n{good}\n{line}\n{good}\n")
    with pytest.raises(ValueError, match=f"bad.jsonl:3: .*{message}"):
        sxd.read_samples(path)


def test_mix_takes_each_dataset_by_its_ratio(tmp_path, seed):
    rng = np.random.default_rng(seed)
    sizes = [int(n) for n in rng.integers(5, 30, size=3)]
    ratios = [0.5, 2.0, 1.3]
    for k, n in enumerate(sizes):
        rows = [{"id": f"{k}-{i}", "conversations": _turns((f"q{i}", f"a{i}"))} for i in range(n)]
        (tmp_path / f"d{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    meta = {"META": [{"path": f"d{k}.jsonl", "type": "text", "ratio": r} for k, r in enumerate(ratios)]}
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(meta))
    samples = sxd.load_mix(tmp_path / "mix.yaml", seed=seed)
    for k, (n, r) in enumerate(zip(sizes, ratios, strict=True)):
        ids = [s["id"] for s in samples if s["id"].startswith(f"{k}-")]
        assert len(ids) == int(r * n)
        if r >= 1:  # every sample at least int(r) times
            assert all(ids.count(f"{k}-{i}") >= int(r) for i in range(n))
        else:
            assert len(set(ids)) == len(ids)
    assert samples == sxd.load_mix(tmp_path / "mix.yaml", seed=seed)  # deterministic
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump([{"path": "d0.jsonl", "ration": 2}]))
    with pytest.raises(ValueError, match="ration.*valid: path, root, ratio"):
        sxd.load_mix(tmp_path / "typo.yaml")
    with pytest.raises(ValueError, match="ratio"):
        sxd.parse_mix([{"path": "d0.jsonl", "ratio": -1}])


def test_mix_resolves_image_paths_against_each_datasets_root(tmp_path):
    """``root`` (relative to the YAML file) is where a dataset's image paths start; without it, the dataset
    file's own folder."""
    (tmp_path / "anno").mkdir()
    row = {"image": "cat.png", "conversations": _turns(("<image>\nWhat?", "A cat."))}
    for name in ("a", "b"):
        (tmp_path / "anno" / f"{name}.jsonl").write_text(json.dumps(row) + "\n")
    mix = [{"path": "anno/a.jsonl", "root": "pixels/a"}, {"path": "anno/b.jsonl"}]
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(mix))
    samples = sxd.load_mix(tmp_path / "mix.yaml")
    assert [s["image"] for s in samples] == [
        str(tmp_path / "pixels/a/cat.png"),
        str(tmp_path / "anno/cat.png"),
    ]
    assert [s["dataset"] for s in samples] == [str(tmp_path / "anno/a.jsonl"), str(tmp_path / "anno/b.jsonl")]


# ---------------------------------------------------------------------------------------- measuring


def test_measure_skips_missing_images_and_cuts_long_samples_at_turns(tmp_path, seed, caplog):
    rng = np.random.default_rng(seed)
    img = _png(tmp_path / "ok.png", int(rng.integers(20, 70)), int(rng.integers(20, 70)), rng)
    long_turns = _turns(*[(f"question {i}", "x" * int(rng.integers(5, 30))) for i in range(6)])
    samples = [
        {"id": "ok", "image": str(img), "conversations": _turns(("q", "a"))},
        {"id": "missing", "image": str(tmp_path / "nope.png"), "conversations": _turns(("q", "a"))},
        {"id": "long", "image": None, "conversations": long_turns},
        {"id": "huge", "image": None, "conversations": _turns(("q" * 500, "a"))},
        {"id": "text", "image": None, "conversations": _turns(("q", "a"))},
    ]
    budget = 120
    with caplog.at_level("WARNING", logger="sphinx_x.data"):
        kept, lengths, stats = sxd.measure(samples, _text_length, budget)
    # Nothing is lost silently: each skipped, cut or dropped sample is a warning naming it.
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    for what, sample_id in (
        ("missing_images", "missing"),
        ("truncated", "long"),
        ("dropped_too_long", "huge"),
    ):
        assert any(m.startswith(f"{what}: sample {sample_id}:") for m in warned), warned
    assert [s["id"] for s in kept] == ["ok", "long", "text"]
    assert lengths == [_text_length(s, s["image_size"]) for s in kept] and max(lengths) <= budget
    assert kept[0]["image_size"] == sxd.image_size(img)
    # The cut keeps the longest prefix of whole exchanges that fits.
    cut = kept[1]["conversations"]
    assert cut == long_turns[: len(cut)] and len(cut) % 2 == 0
    assert _text_length({"conversations": long_turns[: len(cut) + 2]}, None) > budget
    assert (stats.missing_images, stats.truncated, stats.dropped_too_long, stats.samples) == (1, 1, 1, 5)
    assert any("missing" in e for e in stats.examples)

    kept, _, stats = sxd.measure(samples, _text_length, budget, too_long="drop")
    assert [s["id"] for s in kept] == ["ok", "text"] and stats.dropped_too_long == 2
    with pytest.raises(ValueError, match="sample missing: image .*nope.png"):
        sxd.measure(samples, _text_length, budget, on_bad_image="error")
    with pytest.raises(ValueError, match="too_long"):
        sxd.measure(samples, _text_length, budget, too_long="cut")


# ------------------------------------------------------------------------------------------------ packing


def test_plan_epoch_packs_every_sample_once_within_budget(seed):
    rng = np.random.default_rng(seed)
    lengths = [int(n) for n in rng.integers(1, 300, size=int(rng.integers(50, 400)))]
    budget, window = 1000, int(rng.integers(20, 120))
    bins = sxd.plan_epoch(lengths, budget, seed=seed, epoch=3, window=window)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= budget for b in bins)
    assert bins == sxd.plan_epoch(lengths, budget, seed=seed, epoch=3, window=window)
    assert bins != sxd.plan_epoch(lengths, budget, seed=seed, epoch=4, window=window)
    # First-fit decreasing inside each window: at most one bin per window is less than half full (two such
    # bins would have been merged), so the waste is bounded by the windows, not the data size.
    half_empty = sum(sum(lengths[i] for i in b) <= budget // 2 for b in bins)
    assert half_empty <= -(-len(lengths) // window)


def test_demo_data_packs_at_least_95_percent_full(tmp_path):
    """On the demo set, at the bin size and canvas `make demo` trains with (configs/demo.yaml)."""
    from sphinx_x.config import get_config
    from sphinx_x.model import SphinxX

    demo_cfg = yaml.safe_load((Path(__file__).parents[1] / "configs" / "demo.yaml").read_text())
    budget = demo_cfg["tokens_per_bin"]
    demo = make_demo_data(tmp_path, train_images=240, heldout_images=4, train_text=60, heldout_text=2)
    model = SphinxX(get_config(demo_cfg["model"], **demo_cfg["model_overrides"]))
    samples, lengths, stats = sxd.measure(sxd.load_mix(demo.train), model.sample_length, budget)
    assert len(samples) == 300 and stats.missing_images == stats.truncated == 0
    bins = sxd.plan_epoch(lengths, budget, seed=0, epoch=0)
    assert sxd.bin_fill(bins, lengths, budget) >= 0.95
    # The lengths are exact: what prepare lays out for the bin.
    first = [samples[i] for i in bins[0]]
    batch = model.prepare([{**s, "image": sxd.load_image(s["image"]) if s["image"] else None} for s in first])
    assert batch.num_tokens == sum(lengths[i] for i in bins[0])


# ------------------------------------------------------------------------------------------- the dataset


def test_packed_bins_decode_in_workers_and_report_bad_images(tmp_path, seed):
    rng = np.random.default_rng(seed)
    paths = [
        _png(tmp_path / f"{i}.png", int(rng.integers(5, 60)), int(rng.integers(5, 60)), rng) for i in range(5)
    ]
    corrupt = tmp_path / "corrupt.png"
    data = paths[0].read_bytes()
    corrupt.write_bytes(data[: len(data) * 3 // 4])  # header intact, pixel data cut
    samples = [
        {"id": f"s{i}", "image": str(p), "conversations": _turns(("q", "a"))} for i, p in enumerate(paths)
    ]
    samples.append({"id": "bad", "image": str(corrupt), "conversations": _turns(("q", "a"))})
    samples.append({"id": "text", "image": None, "conversations": _turns(("q", "a"))})
    samples, _, _ = sxd.measure(samples, _text_length, 10**6)
    assert len(samples) == 7  # the corrupt file's header still reads
    bins = [[0, 5, 6], [1, 2], [3, 4]]
    loader = torch.utils.data.DataLoader(sxd.PackedBins(samples, bins), batch_size=None, num_workers=2)
    items = list(loader)
    assert [[s["id"] for s in item["samples"]] for item in items] == [
        ["s0", "text"],
        ["s1", "s2"],
        ["s3", "s4"],
    ]
    assert [b[0] for b in items[0]["bad"]] == ["bad"]
    for item in items:
        for s in item["samples"]:
            if s["image"] is not None:  # the file's pixels, uint8 (H, W, 3), no normalisation yet
                assert s["image"].dtype == torch.uint8
                assert np.array_equal(s["image"].numpy(), PIXELS[f"{s['id'][1:]}.png"])
    with pytest.raises(ValueError, match="sample bad: image .*corrupt.png"):
        sxd.PackedBins(samples, bins, on_bad_image="error")[0]


# -------------------------------------------------------------------------------------------- demo set


def _colour_mask(pixels: np.ndarray, colour) -> np.ndarray:
    return np.abs(pixels.astype(int) - np.array(colour)).sum(-1) < 30


def test_demo_answers_follow_from_the_pixels(tmp_path):
    """Every image answer of the demo set is recomputed from the rendered pixels alone."""
    demo = make_demo_data(tmp_path, train_images=60, heldout_images=12, train_text=10, heldout_text=5)
    samples = sxd.load_mix(demo.train) + sxd.read_samples(demo.heldout)
    shapes_seen, kinds = set(), set()
    for s in samples:
        for turn in s["conversations"]:
            kinds.add(turn.get("kind"))
        if s["image"] is None:
            continue
        pixels = sxd.load_image(s["image"]).numpy()
        h, w = pixels.shape[:2]
        shapes_seen.add((w > h) - (w < h))
        masks = {name: _colour_mask(pixels, rgb) for name, rgb in COLOURS.items()}
        present = {name for name, m in masks.items() if m.sum() > 20}
        turns = s["conversations"]
        for q, a in zip(turns[::2], turns[1::2], strict=True):
            question, answer, kind = q["value"], a["value"], a["kind"]
            if kind == "count":
                assert answer == str(len(present)), (s["id"], question)
            elif kind == "exists":
                colour = question.split()[3]
                assert answer == ("yes" if colour in present else "no"), (s["id"], question)
            elif kind in ("side", "box", "shape"):
                colour = next(c for c in COLOURS if f" {c} " in question)
                ys, xs = np.nonzero(masks[colour])
                if kind == "side":
                    if "left" in question:
                        assert answer == ("left" if xs.mean() < w / 2 else "right"), (s["id"], question)
                    else:
                        assert answer == ("top" if ys.mean() < h / 2 else "bottom"), (s["id"], question)
                elif kind == "box":
                    box = [xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h]
                    assert box_iou(parse_box(answer), box) > 0.75, (s["id"], answer, box)
                else:  # filled fraction of the bounding box: circle pi/4, square 1, triangle 1/2
                    fill = masks[colour].sum() / ((np.ptp(xs) + 1) * (np.ptp(ys) + 1))
                    want = min(
                        (abs(fill - f), k) for k, f in (("circle", 0.785), ("square", 1.0), ("triangle", 0.5))
                    )
                    assert answer == want[1], (s["id"], question, fill)
            elif kind == "colour":
                assert answer in present, (s["id"], question)
    assert shapes_seen == {-1, 0, 1} and kinds >= {"count", "colour", "shape", "exists", "side", "box", "mix"}
    # Deterministic, and the held-out images are not training images.
    again = make_demo_data(
        tmp_path / "again", train_images=60, heldout_images=12, train_text=10, heldout_text=5
    )
    assert (tmp_path / "heldout.jsonl").read_text() == (again.root / "heldout.jsonl").read_text()
    train_images = {Path(s["image"]).name for s in sxd.load_mix(demo.train) if s["image"]}
    assert not train_images & {Path(s["image"]).name for s in sxd.read_samples(demo.heldout) if s["image"]}
    assert [Path(p).name for p, _, _ in demo.showcases] == [f"showcase_{i}.png" for i in range(3)]
