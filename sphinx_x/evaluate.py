"""Held-out evaluation of a SPHINX-X model: greedy answer accuracy and per-token loss.

`sphinx_x.train.train` runs it before and after training when its config names ``eval_data``;
``sphinx-x eval`` runs it on a saved model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class EvalResult:
    """Answer accuracy on held-out conversations and their loss.

    Every assistant turn is one question, asked with the conversation's earlier turns (the reference
    answers) as history; an answer is right when it equals the reference (case, surrounding spaces and a final
    period ignored) or, for ``[x0, y0, x1, y1]`` boxes, overlaps it with IoU >= 0.5. ``chance`` is what always
    giving each question kind's most frequent reference answer scores (the bar for having learnt from the
    image, not only the answer prior).
    """

    accuracy: float
    loss: float
    questions: int
    per_kind: dict[str, list[int]]  # kind -> [right, asked]
    chance: float
    examples: list[dict]

    def summary(self) -> str:
        kinds = ", ".join(f"{k} {r}/{n}" for k, (r, n) in sorted(self.per_kind.items()))
        return (
            f"accuracy {self.accuracy:.1%} on {self.questions} held-out questions (most-frequent-answer baseline "
            f"{self.chance:.1%}; {kinds}), loss {self.loss:.4f}"
        )


def _normal(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".").split())


def answer_matches(answer: str, reference: str) -> bool:
    """Whether a generated `answer` counts as the `reference` answer (see `EvalResult`)."""
    from sphinx_x.demo_data import box_iou, parse_box

    ref_box = parse_box(reference)
    if ref_box is not None:
        got = parse_box(answer)
        return got is not None and box_iou(got, ref_box) >= 0.5
    return _normal(answer) == _normal(reference)


@torch.no_grad()
def evaluate(model, samples: list[dict], *, max_new_tokens: int = 32, batch_size: int = 32) -> EvalResult:
    """Accuracy (greedy answers) and mean per-token loss of `model` on `samples` (normalised samples, e.g.
    `sphinx_x.data.read_samples`); see `EvalResult`."""
    from sphinx_x.demo_data import chance_accuracy

    was_training = model.training
    model.eval()
    questions = []
    for s in samples:
        turns = s["conversations"]
        for k, turn in enumerate(turns):
            if turn["from"] == "gpt" and k > 0:
                prompt = {"image": s.get("image"), "conversations": turns[:k]}
                questions.append((prompt, turn["value"], turn.get("kind", "answer")))
    answers = []
    for i in range(0, len(questions), batch_size):
        chunk = questions[i : i + batch_size]
        answers += model.generate([q[0] for q in chunk], max_new_tokens=max_new_tokens)
    per_kind: dict[str, list[int]] = {}
    refs_by_kind: dict[str, list[str]] = {}
    examples = []
    for (prompt, ref, kind), got in zip(questions, answers, strict=True):
        right = answer_matches(got, ref)
        per_kind.setdefault(kind, [0, 0])
        per_kind[kind][0] += right
        per_kind[kind][1] += 1
        refs_by_kind.setdefault(kind, []).append(_normal(ref))
        if len(examples) < 8:
            examples.append(
                {"question": prompt["conversations"][-1]["value"], "reference": ref, "answer": got}
            )
    chance = chance_accuracy(refs_by_kind)
    n = len(questions)
    total_loss, total_tokens = 0.0, 0
    for i in range(0, len(samples), batch_size):
        output = model(model.prepare(samples[i : i + batch_size]), reduction="sum")
        total_loss += float(output.loss)
        total_tokens += int(output.num_supervised)
    model.train(was_training)
    return EvalResult(
        accuracy=sum(r for r, _ in per_kind.values()) / max(1, n),
        loss=total_loss / max(1, total_tokens),
        questions=n,
        per_kind=per_kind,
        chance=sum(chance[k] * per_kind[k][1] for k in per_kind) / max(1, n),
        examples=examples,
    )
