"""sphinx_x.train: schedule, config, data order, FSDP2 on gloo (2 ranks == 1 rank) and exact resume."""

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import assert_close_to_reference
from safetensors.torch import load_file

import sphinx_x.train as sxt
from sphinx_x.demo_data import make_demo_data

ROOT = Path(__file__).resolve().parents[1]
# A very small SPHINX-X (the tiny towers, a 64-wide 2-layer decoder, 56-pixel views): a step takes ~0.1 s.
SMALL_MODEL = {"canvas": 112, "llm.dim": 64, "llm.n_heads": 2, "llm.n_kv_heads": 1, "llm.ffn_dim": 96}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_data(
        tmp_path_factory.mktemp("demo"), train_images=14, heldout_images=3, train_text=6, heldout_text=2
    )


def _config(demo, out: Path, **changes) -> sxt.TrainConfig:
    base = dict(
        model="tiny",
        model_overrides=SMALL_MODEL,
        data=str(demo.train),
        tokens_per_bin=512,
        lr=3e-3,
        warmup_epochs=0.3,
        grad_clip=0.5,  # below the gradients' norm: every step clips, so the global norm must be right
        num_workers=0,
        out=str(out),
        log_every=100,
    )
    return sxt.TrainConfig(**{**base, **changes})


def _trained(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model" / "model.safetensors"))


def _metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


# -------------------------------------------------------------------------------------------- schedule


def test_schedule_is_linear_warmup_then_cosine_as_pytorch_schedulers(seed):
    gen = torch.Generator().manual_seed(seed)
    total = int(torch.randint(20, 200, (), generator=gen))
    warmup = int(torch.randint(1, total // 3, (), generator=gen))
    peak, floor = 1e-3, 1e-5
    # Reference: PyTorch's own LinearLR then CosineAnnealingLR on a dummy optimizer.
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=peak)
    lin = torch.optim.lr_scheduler.LinearLR(
        opt, start_factor=1 / warmup, end_factor=1.0, total_iters=warmup - 1
    )
    want = []
    for _ in range(warmup):
        want.append(opt.param_groups[0]["lr"])
        opt.step()
        lin.step()
    opt.param_groups[0]["lr"] = peak
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - warmup, eta_min=floor)
    for _ in range(total - warmup):
        want.append(opt.param_groups[0]["lr"])
        opt.step()
        cos.step()
    got = [sxt.learning_rate(s, total, warmup, peak, floor) for s in range(total)]
    assert got == pytest.approx(want, rel=1e-9, abs=1e-15)
    assert sxt.learning_rate(total, total, warmup, peak, floor) == pytest.approx(floor)


# ---------------------------------------------------------------------------------------------- config


def test_config_typo_names_the_key_and_the_valid_ones(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": "tiny", "learning_rate": 1e-3}))
    with pytest.raises(ValueError, match="unknown key 'learning_rate' in .*c.yaml.*valid keys: model, "):
        sxt.TrainConfig.load(path)
    with pytest.raises(ValueError, match="unknown key 'grad_acum'.*did you mean 'grad_accum'"):
        sxt.TrainConfig.load(None, ["grad_acum=2"])
    path.write_text(yaml.safe_dump({"model": "tiny", "lr": 1e-3, "model_overrides": {"canvas": 112}}))
    cfg = sxt.TrainConfig.load(path, ["lr=5e-4", "betas=[0.9, 0.99]", "model_overrides.llm.n_layers=3"])
    assert cfg.lr == 5e-4 and cfg.betas == (0.9, 0.99)
    assert cfg.model_overrides == {"canvas": 112, "llm.n_layers": 3}
    with pytest.raises(ValueError, match="grad_accum=0"):
        sxt.TrainConfig(grad_accum=0)
    with pytest.raises(ValueError, match="key=value"):
        sxt.TrainConfig.load(None, ["lr"])


# ------------------------------------------------------------------------------------------ data order


def test_a_step_takes_the_same_bins_for_any_ranks_x_accumulation(seed):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 400, (int(torch.randint(40, 200, (), generator=gen)),), generator=gen).tolist()
    plans = {
        (world, accum): sxt.DataPlan(lengths, 1000, seed=seed, world=world, accum=accum, window=64)
        for world, accum in ((1, 4), (2, 2), (4, 1))
    }
    steps = plans[1, 4].total_steps(2.5)
    assert steps == plans[4, 1].total_steps(2.5) > 0
    for step in range(steps):
        want = sorted(sorted(b) for b in plans[1, 4].step_bins(step, 0))
        for (world, _), plan in plans.items():
            got = [b for rank in range(world) for b in plan.step_bins(step, rank)]
            assert sorted(sorted(b) for b in got) == want
            assert sorted(sorted(b) for b in plan.all_step_bins(step)) == want
    # An epoch covers every sample at most once; consecutive epochs differ.
    epoch0 = [
        i for s in range(plans[2, 2].steps_in_epoch(0)) for b in plans[2, 2].all_step_bins(s) for i in b
    ]
    assert len(epoch0) == len(set(epoch0))
    assert plans[2, 2].locate(plans[2, 2].steps_in_epoch(0)) == (1, 0)


# ---------------------------------------------------------------------------------------- distributed


def test_two_gloo_ranks_match_one_rank_on_the_same_global_batch(demo, tmp_path, seed):
    """2 ranks (torchrun, FSDP2 over gloo, one bin each per step) against 1 rank accumulating the same
    two bins: the same losses, gradient norms and final weights within fp32's own error.

    Judged by the project's accuracy rule against a float64 run: summation order (the gradient reduction
    across ranks, the global norm summed over shards) is the only thing the two fp32 runs may differ in, so
    the 2-rank run's error against float64 must stay within twice the 1-rank fp32 run's (plus 2 ulp). A
    wrong data split, a missing gradient average or a norm over one shard only is off by O(1)."""
    steps = 3
    cfg = dict(max_steps=steps, seed=seed % 1000)
    sxt.train(_config(demo, tmp_path / "fp64", grad_accum=2, precision="fp64", **cfg), progress=False)
    ref32 = sxt.train(_config(demo, tmp_path / "fp32", grad_accum=2, **cfg), progress=False)
    assert ref32.steps == steps and ref32.stats["bad_images"] == 0

    config = _config(demo, tmp_path / "ranks2", **cfg)
    config_file = tmp_path / "ranks2.yaml"
    config_file.write_text(yaml.safe_dump({**dataclasses.asdict(config), "betas": list(config.betas)}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "sphinx_x.cli", "train", "--config", str(config_file), "--no-progress"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    rows64, rows32, rows2 = (_metrics(tmp_path / d) for d in ("fp64", "fp32", "ranks2"))
    for key in ("loss", "grad_norm"):
        ref = torch.tensor([r[key] for r in rows64], dtype=torch.float64)
        low = torch.tensor([r[key] for r in rows32], dtype=torch.float32)
        got = torch.tensor([r[key] for r in rows2], dtype=torch.float32)
        assert_close_to_reference(got, ref, low, name=key)
    assert [r["tokens"] for r in rows2] == [r["tokens"] for r in rows32]

    w64, w32, w2 = _trained(tmp_path / "fp64"), _trained(tmp_path / "fp32"), _trained(tmp_path / "ranks2")
    assert w2.keys() == w32.keys()
    for name in w32:
        assert w2[name].dtype == torch.float32
        assert_close_to_reference(w2[name], w64[name], w32[name], name=name)
    # Training moved the weights far more than the tolerance: the comparison has teeth.
    initial = sxt._build_model(_config(demo, tmp_path / "x", **cfg), torch.device("cpu")).state_dict()
    moved = max((w32[k] - initial[k]).abs().max().item() for k in w32 if "llm.layers" in k)
    assert moved > 1e-3


# -------------------------------------------------------------------------------------------- resume


def test_stopped_and_resumed_run_equals_the_uninterrupted_one_bitwise(demo, tmp_path, seed, monkeypatch):
    cfg = dict(max_steps=5, save_every=2, seed=seed % 1000)
    full = sxt.train(_config(demo, tmp_path / "full", **cfg), progress=False)

    part = _config(demo, tmp_path / "part", **cfg)
    first = sxt.train(part, stop_at=3, progress=False)
    assert first.steps == 3 and first.model_dir is None
    assert [p.name for p in sxt.checkpoints(tmp_path / "part" / "checkpoints")] == [
        "step_00000002",
        "step_00000003",
    ]

    with pytest.raises(ValueError, match="already holds checkpoints .*step_00000003.*resume"):
        sxt.train(part, progress=False)  # starting over into a run's folder would mix two runs

    # A kill in the middle of writing the next checkpoint: the last good one stays, the torn one is ignored.
    import torch.distributed.checkpoint as dcp

    real_save = dcp.save

    def torn_save(state, *, checkpoint_id, **kwargs):
        Path(checkpoint_id, "partial").write_bytes(b"\0" * 10)
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(dcp, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        sxt.train(part, resume=True, progress=False)
    monkeypatch.setattr(dcp, "save", real_save)
    assert (tmp_path / "part" / "checkpoints" / ".tmp-step_00000004").is_dir()
    assert sxt.checkpoints(tmp_path / "part" / "checkpoints")[-1].name == "step_00000003"

    resumed = sxt.train(part, resume=True, progress=False)
    assert resumed.losses == full.losses and len(full.losses) == 5
    a, b = _trained(tmp_path / "full"), _trained(tmp_path / "part")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    strip = lambda rows: [
        {k: v for k, v in r.items() if k not in ("seconds", "tokens_per_s", "images_per_s")} for r in rows
    ]  # noqa: E731
    assert strip(_metrics(tmp_path / "part")) == strip(_metrics(tmp_path / "full"))
    assert len(sxt.checkpoints(tmp_path / "part" / "checkpoints")) == 2  # keep_checkpoints


def test_bad_images_during_training_are_skipped_and_counted(demo, tmp_path, seed):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(demo.root, data)
    victims = sorted((data / "images").glob("train_*.png"))[:2]
    for path in victims:
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) * 3 // 4])  # the header reads, the pixels do not
    result = sxt.train(
        _config(demo, tmp_path / "run", data=str(data / "train.yaml"), max_steps=4, seed=seed % 1000),
        progress=False,
    )
    assert result.steps == 4 and all(math.isfinite(x) for x in result.losses)
    seen = sum(r["bad_images"] for r in _metrics(tmp_path / "run"))
    assert result.stats["bad_images"] == seen and seen <= 2
    with pytest.raises(ValueError, match="image .*train_"):
        sxt.train(
            _config(
                demo, tmp_path / "strict", data=str(data / "train.yaml"), on_bad_image="error", max_steps=8
            ),
            progress=False,
        )


def test_answer_matching_rules():
    assert sxt.answer_matches(" Red.", "red") and not sxt.answer_matches("red square", "red")
    assert sxt.answer_matches("[0.10, 0.20, 0.50, 0.60]", "[0.12, 0.20, 0.50, 0.62]")
    assert not sxt.answer_matches("[0.60, 0.20, 0.90, 0.60]", "[0.10, 0.20, 0.50, 0.60]")
    assert not sxt.answer_matches("somewhere", "[0.10, 0.20, 0.50, 0.60]")


def test_every_bundled_config_loads_and_names_a_preset():
    from sphinx_x.config import get_config, list_configs

    files = sorted((ROOT / "configs").glob("*.yaml"))
    assert {sxt.TrainConfig.load(f).model for f in files} >= {"tiny", "tiny-moe"} | set(list_configs()) - {
        "tiny"
    }
    for f in files:
        cfg = sxt.TrainConfig.load(f)
        get_config(cfg.model, **cfg.model_overrides)  # validates every override against the preset


def test_moe_training_adds_the_balance_loss_and_logs_expert_load(demo, tmp_path, seed):
    cfg = _config(
        demo, tmp_path / "moe", model="tiny-moe", max_steps=2, aux_loss_weight=0.05, seed=seed % 1000
    )
    cfg.model_overrides = {**SMALL_MODEL, "llm.moe_ffn_dim": 32}
    result = sxt.train(cfg, progress=False)
    rows = _metrics(tmp_path / "moe")
    assert result.steps == 2 and all(
        0 < r["aux_loss"] < 4 for r in rows
    )  # Switch loss: 1 when balanced, <= E
    # Every (token, slot) pair lands on some expert: the loads are shares of the mean, so >= 1.
    assert all(r["expert_max_load_text"] >= 1 for r in rows)
    assert all(r["expert_max_load_image"] >= 1 or r["images_per_s"] == 0 for r in rows)  # a text-only bin: 0


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).parent.parent / "configs").glob("*.yaml")), ids=lambda p: p.name
)
def test_shipped_configs_load(path):
    """Every YAML under configs/ holds only TrainConfig keys and names a preset whose overrides apply (a typo
    in a shipped config would otherwise surface only when a user launches it)."""
    import sphinx_x

    cfg = sxt.TrainConfig.load(path)
    model = sphinx_x.get_config(cfg.model, **cfg.model_overrides)
    assert model.llm.n_layers >= 1 and cfg.tokens_per_bin >= 1
