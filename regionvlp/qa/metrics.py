"""QA metrics as pure functions of predicted and reference answers (strings).

Accuracy is exact match of the normalised answer text; a reference answer outside the
vocabulary can never be predicted, so it counts as wrong. The majority baseline always
answers the most frequent training answer. By question type: the first word of the
question (what, who, how, when, where, other), as MSRVTT-QA / MSVD-QA papers report.
"""

from __future__ import annotations

from typing import Any, Sequence

from regionvlp.data.qa import QUESTION_TYPES, question_type


def accuracy(predictions: Sequence[str], answers: Sequence[str]) -> float:
    """Percentage of exact matches (0 for no questions)."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    if not answers:
        return 0.0
    return 100.0 * sum(p == a for p, a in zip(predictions, answers)) / len(answers)


def qa_metrics(predictions: Sequence[str], answers: Sequence[str], questions: Sequence[str],
               majority: str, types: Sequence[str] | None = None) -> dict[str, Any]:
    """``qa_accuracy``, ``qa_majority_accuracy``, ``qa_accuracy_<type>`` and
    ``qa_count_<type>`` for every question type, ``num_questions`` (percentages). A
    question's type is ``types[i]`` when given and not empty (a stored ``category_id``),
    else its first word."""
    out: dict[str, Any] = {
        "qa_accuracy": accuracy(predictions, answers),
        "qa_majority_accuracy": accuracy([majority] * len(answers), answers),
        "num_questions": len(answers),
    }
    given = list(types) if types is not None else [""] * len(questions)
    types = [t or question_type(q) for t, q in zip(given, questions)]
    for kind in QUESTION_TYPES:
        idx = [i for i, t in enumerate(types) if t == kind]
        out[f"qa_count_{kind}"] = len(idx)
        out[f"qa_accuracy_{kind}"] = accuracy([predictions[i] for i in idx], [answers[i] for i in idx]) if idx else None
    return out
