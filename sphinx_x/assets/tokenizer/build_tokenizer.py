"""Build the tiny presets' bundled tokenizer: a 512-entry byte-level BPE (the `tokenizers` library).

Run from the repository root: ``python sphinx_x/assets/tokenizer/build_tokenizer.py``. Deterministic: the
corpus is the text below (the chat template and plain English about images), trained on one thread, so the
committed files are reproduced byte for byte. 512 entries (256 bytes, 2 specials, 254 merges) keep the tiny
model's embedding and LM head at 512 x d: byte-level means any text encodes, nothing is unknown.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ["RAYON_NUM_THREADS"] = "1"  # one thread: merge ties resolve in one fixed order

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

VOCAB_SIZE = 512
SPECIALS = ["<s>", "</s>"]

SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions."
)
SENTENCES = [
    "What is in the image? The image shows a small dog sitting on a green lawn next to a red ball.",
    "Describe the picture in detail. There are two people walking along the beach at sunset.",
    "How many cars are there? There are three cars parked on the street in front of the building.",
    "What color is the sky? The sky is blue with a few white clouds.",
    "Is there a cat in the photo? Yes, a black cat is sleeping on the sofa near the window.",
    "What is the man holding? The man is holding an umbrella because it is raining.",
    "Where was this photo taken? It looks like a city park in the morning, with trees and a bench.",
    "Read the text on the sign. The sign says: Stop, 25 miles per hour, no parking from 8 to 10.",
    "What time is shown on the clock? The clock shows a quarter past four.",
    "Please answer the question using a single word or phrase. Answer: yes, no, left, right, two, red.",
    "The chart shows that sales grew from 1,200 units in 2019 to 3,450 units in 2023.",
    "A woman wearing a yellow jacket rides a bicycle down a wide road between tall buildings.",
    "The kitchen has a white table, four chairs, a bowl of fruit, and a large window.",
    "Provide a short caption for this image. A panorama of snowy mountains above a quiet lake.",
]


def corpus() -> list[str]:
    turns = [f"{SYSTEM}\n\n### Human: {s.split('? ')[0]}?\n### Assistant: {s}\n###" for s in SENTENCES]
    return turns * 4 + SENTENCES


def build(out_dir: Path) -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.save(str(out_dir / "tokenizer.json"))
    # Written by hand, not by save_pretrained: the class name must load on transformers 4 and 5 alike.
    # "sphinx_x_bundled": sphinx_x loads it with `tokenizers` alone (transformers is not a runtime dependency).
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "sphinx_x_bundled": True,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


if __name__ == "__main__":
    build(Path(__file__).parent)
