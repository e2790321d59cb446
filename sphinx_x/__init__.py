"""SPHINX-X on sphinx-kernels: the thin model, data pipeline and one-stage trainer that use the kernels.

import sphinx_x

model = sphinx_x.SphinxX(sphinx_x.get_config("tiny"))
loss = model.loss([{"image": "cat.jpg", "conversations": [...]}])
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public names and the module that defines each; imported on first use so that `sphinx_x.data` or the CLI do
# not pay for the model's imports.
_EXPORTS = {
    "SphinxXConfig": "sphinx_x.config",
    "VisionConfig": "sphinx_x.config",
    "get_config": "sphinx_x.config",
    "list_configs": "sphinx_x.config",
    "SphinxX": "sphinx_x.model",
    "SphinxBatch": "sphinx_x.batch",
    "SphinxOutput": "sphinx_x.batch",
    "load_tokenizer": "sphinx_x.tokenizer",
    "LLM": "sphinx_x.llm",
    "LLMConfig": "sphinx_x.llm",
}

__all__ = [
    "LLM",
    "LLMConfig",
    "SphinxBatch",
    "SphinxOutput",
    "SphinxX",
    "SphinxXConfig",
    "VisionConfig",
    "get_config",
    "list_configs",
    "load_tokenizer",
]

if TYPE_CHECKING:
    from sphinx_x.batch import SphinxBatch, SphinxOutput
    from sphinx_x.config import SphinxXConfig, VisionConfig, get_config, list_configs
    from sphinx_x.llm import LLM, LLMConfig
    from sphinx_x.model import SphinxX
    from sphinx_x.tokenizer import load_tokenizer


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sphinx_x' has no attribute {name!r}")
