"""The one-stage multi-turn chat template of SPHINX-X (REFERENCE.md) and its tokenisation with labels.

Text of a conversation with turns ``Q1, A1, Q2, A2``::

    {SYSTEM}\\n\\n### Human: Q1\\n### Assistant: A1\\n### Human: Q2\\n### Assistant: A2\\n###

Only the assistant replies and their closing ``\\n###`` are supervised; generation stops at ``\\n###``.
The text is cut into pieces at the supervision boundaries; the space after ``Assistant:`` starts the reply's
piece (``" A1\\n###"``) so that a byte-level BPE sees the reply's first word with its leading space, as it
would in running text, and a generation prompt ends exactly at ``Assistant:``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = [
    "IGNORE_INDEX",
    "SEPARATOR",
    "SYSTEM",
    "format_conversation",
    "strip_reply",
    "tokenize_conversation",
]

SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions."
)
SEPARATOR = "\n###"
IGNORE_INDEX = -100  # label of a token that is not learned (torch cross_entropy's default ignore_index)

_ROLES = {"human": "Human", "gpt": "Assistant"}


def _clean(value: str) -> str:
    # LLaVA-style data marks the image with "<image>" (often "<image>\n" first): the image has its own place
    # after BOS here, so the marker is dropped wherever it is.
    for marker in ("<image>\n", "\n<image>", "<image>"):
        value = value.replace(marker, "")
    return value.strip()


def _check(conversations: Any, name: str) -> list[tuple[str, str]]:
    if isinstance(conversations, (str, bytes)) or not isinstance(conversations, Sequence):
        raise TypeError(f"{name} must be a list of {{'from': 'human'|'gpt', 'value': str}} turns")
    if len(conversations) == 0:
        raise ValueError(f"{name} is empty: a conversation needs at least one human turn")
    turns = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ValueError(f"{name}[{i}] must be a dict with keys 'from' and 'value', got {turn!r:.80}")
        role, value = turn["from"], turn["value"]
        if role not in _ROLES:
            raise ValueError(f"{name}[{i}]['from'] must be 'human' or 'gpt', got {role!r}")
        if not isinstance(value, str):
            raise TypeError(f"{name}[{i}]['value'] must be a str, got {type(value).__name__}")
        expected = "human" if i % 2 == 0 else "gpt"
        if role != expected:
            raise ValueError(
                f"{name}[{i}] is a {role!r} turn where a {expected!r} turn belongs: turns must alternate "
                "human, gpt, human, ... starting with human"
            )
        turns.append((role, _clean(value)))
    return turns


def format_conversation(
    conversations: Sequence[dict[str, str]], add_generation_prompt: bool = False
) -> list[tuple[str, bool]]:
    """Cut a conversation's template text into ``(text, supervised)`` pieces, in order.

    Args:
        conversations: ``[{"from": "human" | "gpt", "value": str}, ...]``, alternating, human first.
        add_generation_prompt: the conversation ends with a human turn whose answer is to be generated: the
            text then ends with ``"### Assistant:"``. Otherwise it must hold at least one assistant reply.

    Returns:
        pieces whose concatenation is the template text; ``supervised`` marks ``" reply\\n###"`` pieces.
    """
    turns = _check(conversations, "conversations")
    if add_generation_prompt and turns[-1][0] != "human":
        raise ValueError("conversations must end with a human turn to generate its answer")
    if not add_generation_prompt and not any(role == "gpt" for role, _ in turns):
        raise ValueError(
            "conversations has no assistant ('gpt') turn: nothing to learn from (for generation pass "
            "add_generation_prompt=True)"
        )
    pieces: list[tuple[str, bool]] = []
    prompt = SYSTEM + "\n\n###"
    for role, value in turns:
        if role == "human":
            prompt += f" Human: {value}{SEPARATOR} Assistant:"
        else:
            pieces += [(prompt, False), (f" {value}{SEPARATOR}", True)]
            prompt = ""
    if prompt and add_generation_prompt:
        pieces.append((prompt, False))
    # A trailing human turn without reply is dropped in training: nothing after it is supervised.
    return pieces


def tokenize_conversation(
    tokenizer: Any, conversations: Sequence[dict[str, str]], add_generation_prompt: bool = False
) -> tuple[list[int], list[int]]:
    """Token ids of the conversation's template text (no BOS: the model puts BOS and the image first) and
    their labels: the id itself on supervised pieces, `IGNORE_INDEX` (-100) elsewhere.

    `tokenizer`: a Hugging Face tokenizer; every piece is encoded on its own (``add_special_tokens=False``), so
    a label span never depends on how a BPE would merge across the boundary.
    """
    ids: list[int] = []
    labels: list[int] = []
    for text, supervised in format_conversation(conversations, add_generation_prompt):
        piece = tokenizer.encode(text, add_special_tokens=False)
        ids += piece
        labels += piece if supervised else [IGNORE_INDEX] * len(piece)
    return ids, labels


def strip_reply(text: str) -> str:
    """A generated reply's text: cut at the first `SEPARATOR`, the template's leading space removed."""
    cut = text.find(SEPARATOR)
    if cut >= 0:
        text = text[:cut]
    return text[1:] if text.startswith(" ") else text
