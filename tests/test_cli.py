"""The `sphinx-x` demos (what `make demo` runs) and the data helpers they use."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from sphinx_x.cli import main
from sphinx_x.data import bundled_images, image_size, load_image

ROW = re.compile(r"^  (\w+)\s+([\d.]+) ms\s+max \|diff\| vs float64: (\S+)$")


def backend_rows(section: str) -> dict[str, float]:
    """``{backend: max |diff| vs float64}`` for the timed rows of one section of the demo's report."""
    return {m[1]: float(m[3]) for m in map(ROW.match, section.splitlines()) if m}


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_image_size_reads_the_header_as_decoding_would(tmp_path, mode):
    rng = np.random.default_rng()
    h, w = (int(n) for n in rng.integers(1, 97, size=2))
    path = tmp_path / f"odd_{mode}.png"
    pixels = rng.integers(0, 256, size=(h, w, len(mode)), dtype=np.uint8)
    Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode).save(path)
    assert image_size(path) == (h, w) == tuple(load_image(path).shape[:2])
    for bundled in bundled_images():
        assert image_size(bundled) == tuple(load_image(bundled).shape[:2])


def test_kernels_demo_runs_every_backend_here_against_float64(capsys):
    # Small enough for the Triton interpreter (tests set TRITON_INTERPRET=1, so triton runs too).
    seed = int(torch.randint(0, 2**31, ()).item())
    argv = "kernels --samples 5 --min-text 1 --max-text 40 --tokens-per-view 5 --budget 200 --heads 4"
    argv += f" --kv-heads 1 --model-dim 24 --ffn-dim 20 --experts 5 --top-k 2 --repeats 1 --seed {seed}"
    assert main(argv.split()) == 0
    report = capsys.readouterr().out
    head, attention = report.split("\nvarlen attention:")
    attention, moe = attention.split("\nMoE SwiGLU layer:")

    first_bin = [
        int(n) for n in re.search(r"first bin: \d+ samples, lengths \[([\d, ]+)\]", head)[1].split(",")
    ]
    assert 1 <= len(first_bin) and sum(first_bin) <= 200
    assert f"T {sum(first_bin)}," in attention and f"T {sum(first_bin)}," in moe
    rope_error = float(re.search(r"RoPE .*max \|diff\| vs float64 (\S+)", head)[1])
    assert rope_error < 1e-5
    decode_error = float(
        re.search(r"decoding: .*max \|diff\| vs the full pass's last rows (\S+)", attention)[1]
    )
    assert decode_error < 1e-5

    attention_rows, moe_rows = backend_rows(attention), backend_rows(moe)
    assert set(attention_rows) == {"triton", "torch"}, attention
    assert set(moe_rows) == {"triton", "cpu", "grouped_mm", "torch"}, moe
    # float32 against float64 with values of order 1: a wiring mistake (wrong positions, a dropped
    # gradient, crossed sequences) shows as an error of order 1.
    for section, rows in (("attention", attention_rows), ("moe", moe_rows)):
        for name, error in rows.items():
            assert error < 1e-5, (section, name, report)
    assert "padded SDPA" in attention and "load-balancing loss" in moe


def test_kernels_demo_rejects_bad_arguments():
    with pytest.raises(SystemExit, match="--min-text"):
        main("kernels --min-text 9 --max-text 3".split())
    with pytest.raises(
        ValueError, match="sequence 0 has"
    ):  # a sample longer than a bin is named, not dropped
        main("kernels --samples 2 --budget 100".split())


def test_tiles_demo_backends_agree_in_float32(capsys):
    assert main("tiles --repeats 1 --dtype float32".split()) == 0
    rows = re.findall(
        r"^  (\w+)\s+[\d.]+ ms .*max \|diff\| vs first: (\S+)\)$", capsys.readouterr().out, re.M
    )
    assert [name for name, _ in rows] == ["cpu", "torch"]
    assert all(float(error) < 1e-5 for _, error in rows), rows


# ------------------------------------------------------------------------ make-demo-data, train, eval, chat


def test_make_demo_data_train_eval_chat_from_the_command_line(tmp_path, capsys):
    import yaml

    from sphinx_x.model import SphinxX

    data, out = tmp_path / "demo", tmp_path / "run"
    sizes = "--train-images 12 --heldout-images 4 --train-text 4 --heldout-text 2"
    assert main(["make-demo-data", str(data), *sizes.split()]) == 0
    showcase = re.search(r"(\S+showcase_2\.png)\s+'(.+?)'", capsys.readouterr().out)
    config = tmp_path / "tiny.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": "tiny",
                "model_overrides": {"canvas": 112, "llm.dim": 64, "llm.n_heads": 2, "llm.n_kv_heads": 1},
                "data": str(data / "train.yaml"),
                "eval_data": str(data / "heldout.jsonl"),
                "eval_samples": 2,
                "eval_max_new_tokens": 4,
                "tokens_per_bin": 512,
                "num_workers": 1,  # images decoded in a DataLoader worker process
            }
        )
    )
    with pytest.raises(SystemExit, match=r"unknown key 'lrr'.*did you mean 'lr'.*valid keys: model, "):
        main(["train", "--config", str(config), "lrr=1e-3"])
    with pytest.raises(SystemExit, match="config key 'lr' must be float"):
        main(["train", "--config", str(config), "lr=fast"])

    argv = [
        "train",
        "--config",
        str(config),
        "--out",
        str(out),
        "--max-steps",
        "2",
        "--no-progress",
        "lr=2e-3",
    ]
    assert main(argv) == 0
    report = capsys.readouterr().out
    assert re.search(r"^loss: [\d.]+ .* -> [\d.]+", report, re.M), report
    assert re.search(r"throughput: \d+ tokens/s; skip tokens saved \d+ visual positions", report), report
    assert re.search(
        r"^data: 16 samples read; skipped 0 unreadable and 0 undecodable images; too long: ", report, re.M
    )
    for when in ("before", "after"):
        assert re.search(rf"held-out {when} training: accuracy [\d.]+% on \d+ held-out questions", report), (
            report
        )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(0 < r["fill"] <= 1 for r in rows)
    assert (out / "model" / "model.safetensors").is_file()

    # The run's folder holds its checkpoint (written at the last step): starting over into it is refused,
    # --resume continues from it (here one step further).
    with pytest.raises(SystemExit, match=r"already holds checkpoints .*step_00000002.*--resume"):
        main(argv[:6] + ["3", *argv[7:]])
    assert main(argv[:6] + ["3", *argv[7:], "--resume"]) == 0
    assert "held-out after training" in capsys.readouterr().out
    resumed = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == [1, 2, 3] and resumed[:2] == rows

    assert main(["eval", "--checkpoint", str(out), "--data", str(data / "heldout.jsonl"), "--limit", "2",
                 "--max-new-tokens", "4"]) == 0  # fmt: skip
    assert re.search(
        r"^accuracy [\d.]+% on \d+ held-out questions .*loss [\d.]+$", capsys.readouterr().out, re.M
    )

    image, question = showcase[1], showcase[2]
    assert main(["chat", "--checkpoint", str(out), "--image", image, question, "--max-new-tokens", "6"]) == 0
    answer = capsys.readouterr().out.splitlines()[-1]
    assert answer.startswith("A: ")
    # The streamed answer is what greedy generation gives for the same question.
    model = SphinxX.from_pretrained(out / "model")
    sample = {"image": image, "conversations": [{"from": "human", "value": question}]}
    assert answer[3:] == model.generate([sample], max_new_tokens=6)[0]
