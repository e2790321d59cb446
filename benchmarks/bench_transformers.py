"""A few fine-tuning steps of a tiny Mixtral through transformers: tokens/s per implementation.

    python benchmarks/bench_transformers.py [--steps 8] [--batch 4] [--seq 256] [--packed] [--compile]
                                            [--compile-backend inductor] [--no-write]

Implementations, measured in one run on the same model and data: attn/experts = "sphinx"/"sphinx" (ours),
"eager"/"eager" (transformers' reference loops) and "sdpa"/"grouped_mm" (transformers' fastest built-ins).
A padded batch (lengths drawn from 25%..100% of --seq) is the default; --packed uses
DataCollatorWithFlattening (one row, no padding) for every implementation that supports it.

--compile runs each model under ``torch.compile`` (--compile-backend, default inductor; "eager" is not
compared, its loops are not meant to compile) and first counts, per implementation, the graphs and graph
breaks dynamo produced over two steps on two batches of the same shape with different padding (a break or a
graph per layer, or a recompile for a new mask, shows there); the note column of each row carries them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from harness import Row, environment, print_table, round_robin_medians, write_rows  # noqa: E402

IMPLEMENTATIONS = [("eager", "eager"), ("sdpa", "grouped_mm"), ("sphinx", "sphinx")]


def build_model(device: str, dtype: torch.dtype, layers: int, hidden: int):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=1024,
        hidden_size=hidden,
        intermediate_size=hidden * 7 // 2,  # Mixtral's 14336 / 4096
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 256),
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=4096,
    )
    return MixtralForCausalLM(config).to(device=device, dtype=dtype)


def make_batch(batch: int, seq: int, packed: bool, device: str, seed: int = 1):
    from transformers import DataCollatorWithFlattening

    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(seq // 4, seq + 1, (batch,), generator=gen).tolist()
    seqs = [torch.randint(1, 1024, (n,), generator=gen) for n in lengths]
    if packed:
        out = DataCollatorWithFlattening(return_tensors="pt")([{"input_ids": s.tolist()} for s in seqs])
    else:
        ids = torch.zeros(batch, seq, dtype=torch.long)
        mask = torch.zeros(batch, seq, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)], mask[i, : len(s)] = s, 1
        labels = ids.masked_fill(mask == 0, -100)
        out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return {k: v.to(device) for k, v in out.items()}, sum(lengths)


def make_step(model, batch, call=None):
    """One optimizer step; `call` runs the forward (the compiled model under --compile)."""
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    call = call if call is not None else model

    def step():
        optim.zero_grad(set_to_none=True)
        call(**batch).loss.backward()
        optim.step()

    return step


def compile_and_count(model, batches, backend: str):
    """Compile `model`, run forward + backward on each batch; returns ``(compiled, graphs, breaks)``: the
    graphs dynamo captured and the graph breaks it took (one model, one shape: 1 and 0 at best)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend=backend)
    model.train()
    for b in batches:
        compiled(**b).loss.backward()
    model.zero_grad(set_to_none=True)
    graphs = counters["stats"]["unique_graphs"]
    breaks = sum(counters["graph_break"].values())
    return compiled, graphs, breaks


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=8, help="timed steps per implementation (median)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--packed", action="store_true")
    parser.add_argument("--compile", action="store_true", help="time the models under torch.compile")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument(
        "--no-write", action="store_true", help="do not append rows to benchmarks/results/transformers.csv"
    )
    args = parser.parse_args()

    import sphinx_kernels.integrations.transformers  # noqa: F401  registers "sphinx"

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    batch, tokens = make_batch(args.batch, args.seq, args.packed, device)
    shape = (
        f"Mixtral {args.layers}L d{args.hidden} E8 top2, batch {args.batch} x <= {args.seq} "
        f"({'packed' if args.packed else 'padded'}), {tokens} real tokens, {dtype}"
    )
    steps, notes = {}, {}
    case = f"fine-tune step {device}"
    if args.compile:
        case += f" compiled ({args.compile_backend})"
        # A second batch of the same shape with other lengths: a mask-dependent recompile would show.
        other, _ = make_batch(args.batch, args.seq, args.packed, device, seed=2)
    for attn, experts in IMPLEMENTATIONS:
        if args.compile and attn == "eager":
            continue
        model = build_model(device, dtype, args.layers, args.hidden)
        model.set_attn_implementation(attn)
        model.set_experts_implementation(experts)
        name, call = f"{attn}+{experts}", None
        if args.compile:
            call, graphs, breaks = compile_and_count(model, [batch, other], args.compile_backend)
            notes[name] = f"dynamo graphs {graphs}, graph breaks {breaks} (2 steps, 2 masks)"
            print(f"{name}: {notes[name]}")
        steps[name] = make_step(model, batch, call)
    rows = [
        Row(
            "transformers",
            case,
            name,
            shape,
            seconds,
            tokens / seconds,
            "tokens/s",
            note=notes.get(name, ""),
            env=environment(device),
        )
        for name, seconds in round_robin_medians(steps, args.steps, device).items()
    ]
    if not args.compile:
        print_table(rows, baseline="eager+eager")
    print_table(rows, baseline="sdpa+grouped_mm")
    if not args.no_write:
        print(f"\nrows appended to {write_rows(rows, 'transformers')}")


if __name__ == "__main__":
    main()
