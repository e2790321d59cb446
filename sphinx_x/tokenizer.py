"""The tokenizer of a SPHINX-X model: the bundled 512-token byte-level BPE of the tiny presets, read with
`tokenizers` alone, or a Hugging Face tokenizer folder through `transformers`.

Kept apart from `sphinx_x.model` so that loading a tokenizer does not import torch or the kernels.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["BUNDLED_MARK", "BUNDLED_TOKENIZER", "BundledTokenizer", "load_tokenizer"]

BUNDLED_TOKENIZER = Path(__file__).parent / "assets" / "tokenizer"
# Key in the bundled tokenizer_config.json: load it with `tokenizers` alone (BundledTokenizer).
BUNDLED_MARK = "sphinx_x_bundled"


class BundledTokenizer:
    """The part of the Hugging Face tokenizer API the model uses, on a `tokenizers.Tokenizer` alone (the tiny
    presets need neither transformers nor a download). Folder: ``tokenizer.json`` + ``tokenizer_config.json``
    (``bos_token``, ``eos_token``), which `transformers.AutoTokenizer` reads too."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer

        self.path = Path(path)
        self._tok = Tokenizer.from_file(str(self.path / "tokenizer.json"))
        config = json.loads((self.path / "tokenizer_config.json").read_text())
        self.bos_token, self.eos_token = config.get("bos_token"), config.get("eos_token")
        self.bos_token_id = None if self.bos_token is None else self._tok.token_to_id(self.bos_token)
        self.eos_token_id = None if self.eos_token is None else self._tok.token_to_id(self.eos_token)

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_token_id, *ids] if add_special_tokens and self.bos_token_id is not None else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(self.path / name, path / name)


def load_tokenizer(path: str | Path | None = None) -> Any:
    """The tokenizer of a local folder: the bundled 512-token byte-level BPE of the tiny presets (path None,
    or a folder `save_pretrained` wrote from it) through `tokenizers` alone, else a Hugging Face tokenizer
    folder through `transformers.AutoTokenizer` (no remote code)."""
    path = Path(path) if path is not None else BUNDLED_TOKENIZER
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer folder {path} does not exist")
    config = path / "tokenizer_config.json"
    if config.is_file() and json.loads(config.read_text()).get(BUNDLED_MARK):
        return BundledTokenizer(path)
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise ImportError(
            f"loading the tokenizer folder {path} needs transformers (pip install transformers)"
        ) from exc
    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
