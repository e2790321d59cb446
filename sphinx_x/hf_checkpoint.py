"""Hugging Face checkpoint I/O for `sphinx_x.llm`: config.json <-> `LLMConfig`, safetensors <-> `LLM`.

Everything that knows Hugging Face's names lives here, so `sphinx_x.llm` stays the model alone; its
`LLMConfig.from_hf_config` / `to_hf_config` and `LLM.from_hf` / `save_hf` are thin methods calling in
(they import this module lazily: it imports `sphinx_x.llm` at load, never the other way round).

Loading builds the model on the meta device and copies each checkpoint tensor into its parameter once,
memory-mapped, in the target dtype and device (no fp32 copy of a bf16 checkpoint is ever made). Every
checkpoint tensor has a `_Spec`, a (load, save) pair, so loading and saving share one name map per arch.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sphinx_x.llm import ARCHS, LLM, Attention, LLMConfig, MoE

# config.json "architectures" / "model_type" -> our arch name.
_HF_ARCHS = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "MixtralForCausalLM": "mixtral",
    "InternLM2ForCausalLM": "internlm2",
}
_HF_CLASS = {v: k for k, v in _HF_ARCHS.items()}


# ----------------------------------------------------------------------------------------------- config.json
def config_from_hf(cls: type[LLMConfig], hf: dict[str, Any]) -> LLMConfig:
    """`LLMConfig.from_hf_config`: `cls` built from a Hugging Face ``config.json`` dict."""
    arch = _arch_of(hf)
    get = hf.get
    n_heads = get("num_attention_heads")
    dim = get("hidden_size")
    head_dim = get("head_dim") or (dim // n_heads if dim and n_heads else None)
    rope = get("rope_parameters") or {}
    theta = get("rope_theta", rope.get("rope_theta", 10000.0))
    scaling = get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
        scaling = rope
    max_pos = int(get("max_position_embeddings", 4096))
    kind = scaling.get("rope_type", scaling.get("type")) if scaling else None
    # Dynamic NTK scaling changes nothing below max_position_embeddings (InternLM2-7B ships it), and
    # max_seq_len stops us there; any other scaling changes every position: refuse it.
    if kind not in (None, "default", "dynamic"):
        raise ValueError(f"config.json: rope scaling {scaling!r} is not supported (only plain RoPE)")
    if arch == "llama" and (get("attention_bias") or get("mlp_bias")):
        raise ValueError("config.json: Llama attention_bias/mlp_bias (o_proj/MLP biases) are not supported")
    if arch == "internlm2" and get("bias", True):
        raise ValueError("config.json: InternLM2 with bias=true (wqkv/wo biases) is not supported")
    if get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act {get('hidden_act')!r} is not supported (SwiGLU with silu)")
    # Our attention has no sliding window: cap the length at the window so a longer sequence is an error
    # instead of silently attending further than the checkpoint did.
    window = get("sliding_window")
    if arch == "qwen2" and not get("use_sliding_window", False):
        window = None
    if window is not None:
        max_pos = min(max_pos, int(window))
    moe = arch == "mixtral"
    return cls(
        arch=arch,
        vocab_size=get("vocab_size"),
        dim=dim,
        n_layers=get("num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=get("num_key_value_heads") or n_heads,
        head_dim=head_dim,
        ffn_dim=get("intermediate_size"),
        norm_eps=float(get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta),
        max_seq_len=max_pos,
        tie_embeddings=bool(get("tie_word_embeddings", False)),
        attention_bias=arch == "qwen2",
        n_experts=int(get("num_local_experts", 0)) if moe else 0,
        top_k=int(get("num_experts_per_tok", 2)) if moe else 2,
        moe_ffn_dim=get("intermediate_size"),
    )


def config_to_hf(cfg: LLMConfig) -> dict[str, Any]:
    """`LLMConfig.to_hf_config`: the ``config.json`` dict of `cfg`."""
    hf: dict[str, Any] = {
        "architectures": [_HF_CLASS[cfg.arch]],
        "model_type": cfg.arch,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.moe_ffn_dim if cfg.is_moe else cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings,
    }
    if cfg.arch in ("mistral", "mixtral"):
        hf["sliding_window"] = None
    if cfg.arch == "qwen2":
        hf["use_sliding_window"] = False
    if cfg.arch == "mixtral":
        hf["num_local_experts"] = cfg.n_experts
        hf["num_experts_per_tok"] = cfg.top_k
    if cfg.arch == "internlm2":
        hf["bias"] = False
        hf["rope_scaling"] = None
    return hf


def _arch_of(hf: dict[str, Any]) -> str:
    """Our arch for a config.json: by `architectures`, by `model_type` only when that list is absent."""
    names = list(hf.get("architectures") or [])
    for name in names:
        if name in _HF_ARCHS:
            return _HF_ARCHS[name]
    model_type = hf.get("model_type")
    if not names and model_type in ARCHS:
        return model_type
    if not names and model_type is None and "llm" in hf:
        raise ValueError(
            "config.json is a SphinxX folder's (written by SphinxX.save_pretrained), not a Hugging Face "
            "checkpoint: load it with SphinxX.from_pretrained"
        )
    raise ValueError(
        f"config.json: architecture {names or model_type!r} is not supported; supported: {sorted(_HF_ARCHS)}"
    )


# ----------------------------------------------------------------------------------------------- tensors
def load_hf(
    cls: type[LLM],
    path: str | Path,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> LLM:
    """`LLM.from_hf`: a `cls` loaded from the Hugging Face folder `path`."""
    from safetensors import safe_open

    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"path: no config.json in {path}")
    hf = json.loads(config_file.read_text())
    cfg = LLMConfig.from_hf_config(hf)
    if dtype is None:
        name = hf.get("torch_dtype") or hf.get("dtype") or "float32"
        dtype = getattr(torch, name) if isinstance(name, str) else torch.float32
    device = torch.device(device or "cpu")
    files = _safetensors_files(path)

    llm = cls(cfg, dtype=dtype, device="meta")
    llm.to_empty(device=device)
    if cfg.tie_embeddings:  # to_empty gives the two names separate storage
        llm.output.weight = llm.tok_embeddings.weight
    specs = _hf_specs(llm)
    seen: set[str] = set()
    unexpected: list[str] = []
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name.endswith("rotary_emb.inv_freq"):  # a buffer older conversions saved
                    _check_inv_freq(name, f.get_tensor(name), cfg)
                    continue
                if name not in specs:
                    # Tied checkpoints sometimes store the head anyway (a copy of the embedding).
                    head = "output.weight" if cfg.arch == "internlm2" else "lm_head.weight"
                    if not (cfg.tie_embeddings and name == head):
                        unexpected.append(name)
                    continue
                with torch.no_grad():
                    specs[name][0](f.get_tensor(name))
                seen.add(name)
    missing = sorted(set(specs) - seen)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not match a {cfg.arch} model of this config: "
            f"missing tensors {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected tensors {sorted(unexpected)[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    llm.hf_config = hf
    return llm


def save_hf(llm: LLM, path: str | Path, *, max_shard_bytes: int = 5 * 2**30) -> None:
    """`LLM.save_hf`: `llm` written as a Hugging Face folder at `path`."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf = dict(llm.hf_config or {})
    hf.update(llm.cfg.to_hf_config())
    dtype = llm.tok_embeddings.weight.dtype
    hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    hf.pop("dtype", None)
    (path / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    with torch.no_grad():
        for name, (_, get) in _hf_specs(llm).items():
            t = get().detach().contiguous().cpu()
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = t
            size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"), metadata=meta)
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / fname), metadata=meta)
        for name, t in shard.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


# Helpers of load_hf / save_hf: which files hold the tensors, and per arch a (load, save) `_Spec` per name.
def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [path / name for name in sorted(set(weight_map.values()))]
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    else:
        pickles = sorted(p.name for p in path.glob("*.bin"))
        hint = f" (found {pickles}: convert them to safetensors; pickles are never loaded)" if pickles else ""
        raise ValueError(f"path: no model.safetensors or model.safetensors.index.json in {path}{hint}")
    for f in files:
        if not f.is_file():
            raise ValueError(f"path: shard {f.name} listed in the index is missing from {path}")
    return files


def _check_inv_freq(name: str, t: torch.Tensor, cfg: LLMConfig) -> None:
    """Early Llama-2 conversions store RoPE's ``inv_freq``; we compute it from rope_theta, so check they agree."""
    D = cfg.head_dim
    expected = 1.0 / cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    if t.shape != expected.shape or not torch.allclose(t.double(), expected, rtol=1e-3, atol=0):
        raise ValueError(
            f"tensor {name}: RoPE frequencies that do not follow rope_theta={cfg.rope_theta}, head_dim={D} "
            "(a scaled RoPE is not supported)"
        )


_Spec = tuple[Callable[[torch.Tensor], None], Callable[[], torch.Tensor]]


def _copy_spec(name: str, target: torch.Tensor) -> _Spec:
    """A checkpoint tensor stored as-is in `target`: (load, save)."""

    def load(t: torch.Tensor) -> None:
        if t.shape != target.shape:
            raise ValueError(
                f"tensor {name}: shape {tuple(t.shape)}, the model expects {tuple(target.shape)}"
            )
        target.copy_(t)

    return load, lambda: target


def _expert_spec(name: str, target: torch.Tensor, e: int) -> _Spec:
    """One expert's HF Linear weight, the transpose of ``target[e]`` (kernel layout)."""

    def load(t: torch.Tensor) -> None:
        if t.shape != target.shape[1:][::-1]:
            raise ValueError(
                f"tensor {name}: shape {tuple(t.shape)}, the model expects {tuple(target.shape[1:][::-1])}"
            )
        target[e].copy_(t.T)

    return load, lambda: target[e].T


def _wqkv_spec(name: str, attn: Attention) -> _Spec:
    """InternLM2's fused ``wqkv``: rows grouped per kv head as ``[q_0 .. q_{G-1}, k, v]`` (each head_dim rows)."""
    Hkv, G, D = attn.n_kv_heads, attn.n_heads // attn.n_kv_heads, attn.head_dim
    dim = attn.wq.weight.shape[1]

    def load(t: torch.Tensor) -> None:
        if t.shape != ((G + 2) * Hkv * D, dim):
            raise ValueError(
                f"tensor {name}: shape {tuple(t.shape)}, the model expects {((G + 2) * Hkv * D, dim)}"
            )
        grouped = t.view(Hkv, G + 2, D, dim)
        # Copied into views of the targets: reshaping the strided slices first would make a temporary of
        # each in the checkpoint's dtype (fp32 for a bf16 model).
        attn.wq.weight.view(Hkv, G, D, dim).copy_(grouped[:, :G])
        attn.wk.weight.view(Hkv, D, dim).copy_(grouped[:, G])
        attn.wv.weight.view(Hkv, D, dim).copy_(grouped[:, G + 1])

    def save() -> torch.Tensor:
        q = attn.wq.weight.view(Hkv, G, D, dim)
        k = attn.wk.weight.view(Hkv, 1, D, dim)
        v = attn.wv.weight.view(Hkv, 1, D, dim)
        return torch.cat([q, k, v], dim=1).reshape(-1, dim)

    return load, save


def _hf_specs(llm: LLM) -> dict[str, _Spec]:
    """Every tensor of the HF checkpoint of `llm`'s arch, with how to load it into / read it from `llm`."""
    cfg = llm.cfg
    specs: dict[str, _Spec] = {}

    def add(name: str, target: torch.Tensor) -> None:
        specs[name] = _copy_spec(name, target)

    # The tensors every layout has, by their two names: InternLM2's and the Llama family's.
    internlm2 = cfg.arch == "internlm2"
    embed, head, attn_norm, ffn_norm = (
        ("model.tok_embeddings.weight", "output.weight", "attention_norm.weight", "ffn_norm.weight")
        if internlm2
        else (
            "model.embed_tokens.weight",
            "lm_head.weight",
            "input_layernorm.weight",
            "post_attention_layernorm.weight",
        )
    )
    add(embed, llm.tok_embeddings.weight)
    add("model.norm.weight", llm.norm.weight)
    if not cfg.tie_embeddings:
        add(head, llm.output.weight)
    for i, layer in enumerate(llm.layers):
        p = f"model.layers.{i}."
        add(p + attn_norm, layer.attention_norm.weight)
        add(p + ffn_norm, layer.ffn_norm.weight)
        if internlm2:
            specs[p + "attention.wqkv.weight"] = _wqkv_spec(p + "attention.wqkv.weight", layer.attention)
            add(p + "attention.wo.weight", layer.attention.wo.weight)
            for w in ("w1", "w2", "w3"):
                add(p + f"feed_forward.{w}.weight", getattr(layer.feed_forward, w).weight)
            continue
        attn = layer.attention
        for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
            lin = getattr(attn, ours)
            add(p + f"self_attn.{theirs}.weight", lin.weight)
            if lin.bias is not None:
                add(p + f"self_attn.{theirs}.bias", lin.bias)
        ff = layer.feed_forward
        if isinstance(ff, MoE):
            add(p + "block_sparse_moe.gate.weight", ff.gate.weight)
            for e in range(cfg.n_experts):
                for w in ("w1", "w2", "w3"):
                    name = p + f"block_sparse_moe.experts.{e}.{w}.weight"
                    specs[name] = _expert_spec(name, getattr(ff, w), e)
        else:
            for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                add(p + f"mlp.{theirs}.weight", getattr(ff, ours).weight)
    return specs


__all__ = ["config_from_hf", "config_to_hf", "load_hf", "save_hf"]
