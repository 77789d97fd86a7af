"""Open-ended video QA data: question/answer pairs, the answer vocabulary, annotations.

A QA sample is a clip whose json holds ``"qa": [{"question": str, "answer": str}, ...]``
(or one ``question``/``answer`` pair at the top level). The pipeline's QA stage turns a
decoded clip into QA samples: in training one pair drawn per visit (or, with
``data.qa_pairs_per_visit: all``, every pair of the clip), in evaluation one
sample per pair, so every pair is visited exactly once across ranks (the loader visits
every clip exactly once). A pair with an empty question or no answer is skipped and
counted (``bad_qa``); a clip without a usable pair is skipped (``no_qa``); in training an
answer outside the vocabulary is skipped (``qa_answer_not_in_vocab``), in evaluation it
is kept and can never be predicted (counts as wrong).

The vocabulary is the K most frequent (normalised) training answers, ties broken by the
answer text, so it is the same whatever the shard order (:func:`build_vocab`).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from regionvlp.errors import UserError
from regionvlp.jsonio import json_loads
from regionvlp.limits import ANNOTATION_BYTES, VOCAB_BYTES, read_text


QUESTION_TYPES: tuple[str, ...] = ("what", "who", "how", "when", "where", "other")
VOCAB_FILE = "qa_vocab.json"  # beside config.yaml in a run dir and in an export


@dataclass(frozen=True)
class QAPair:
    question: str
    answer: str  # normalised (normalize_answer)
    qtype: str = ""  # a stored question type (MSRVTT-QA category_id), else "" (first-word rule)


def normalize_answer(answer: Any) -> str:
    """Lower case, single spaces; numbers as their text (``2`` -> ``"2"``)."""
    return " ".join(str(answer).lower().split())


def question_type(question: str) -> str:
    """The first word when it is what/who/how/when/where, else ``other`` (MSRVTT-QA)."""
    words = question.strip().lower().split()
    first = words[0].strip("?,.!'\"") if words else ""
    return first if first in QUESTION_TYPES[:-1] else "other"


def has_qa(meta: dict[str, Any]) -> bool:
    return "qa" in meta or "question" in meta


def qa_pairs(meta: dict[str, Any]) -> tuple[list[QAPair], list[str]]:
    """The sample's valid pairs and one problem string per bad pair (missing answer,
    empty question, not an object)."""
    raw: Any = meta.get("qa")
    if raw is None and "question" in meta:
        raw = [{"question": meta.get("question"), "answer": meta.get("answer")}]
    if raw is None:
        return [], []
    if not isinstance(raw, list):
        return [], ["json.qa is not a list"]
    pairs: list[QAPair] = []
    bad: list[str] = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            bad.append(f"qa[{i}] is not an object")
            continue
        question, answer = item.get("question"), item.get("answer")
        if not isinstance(question, str) or not question.strip():
            bad.append(f"qa[{i}] has an empty or missing question")
        elif answer is None or isinstance(answer, (dict, list)) or not normalize_answer(answer):
            bad.append(f"qa[{i}] has no answer")
        else:
            qtype = item.get("question_type")
            qtype = qtype if isinstance(qtype, str) and qtype in QUESTION_TYPES else ""
            pairs.append(QAPair(" ".join(question.split()), normalize_answer(answer), qtype))
    return pairs, bad


# ------------------------------------------------------------------- vocabulary
@dataclass
class QAVocab:
    """The K most frequent training answers, most frequent first (``answers[0]`` is
    the majority answer), with their training counts."""

    answers: list[str]
    counts: list[int]
    num_pairs: int = 0  # valid training pairs counted
    skipped: dict[str, int] = field(default_factory=dict)
    index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.index = {a: i for i, a in enumerate(self.answers)}

    @property
    def majority(self) -> str:
        return self.answers[0]

    def id_of(self, answer: str) -> int:
        """The answer's class id, -1 outside the vocabulary."""
        return self.index.get(answer, -1)

    def to_dict(self) -> dict[str, Any]:
        return {"answers": self.answers, "counts": self.counts, "num_pairs": self.num_pairs,
                "skipped": self.skipped}

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        tmp.replace(path)


def vocab_from_counts(counts: Counter, top: int, num_pairs: int, skipped: dict[str, int]) -> QAVocab:
    """The ``top`` most frequent answers; ties by answer text (deterministic)."""
    if top <= 0:
        raise UserError(f"qa vocab: --top must be > 0, got {top}")
    if not counts:
        raise UserError("qa vocab: the shards hold no valid question/answer pair (json 'qa' list or "
                        "'question'/'answer'); write them with `regionvlp shards write SRC OUT --qa FILE`")
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    return QAVocab([a for a, _ in ranked], [int(c) for _, c in ranked], num_pairs, dict(skipped))


def load_vocab(path: str | Path) -> QAVocab:
    """A vocab.json (``regionvlp qa vocab`` / a run's ``qa_vocab.json``), size-bounded and checked."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"QA vocabulary {path} not found; build one with `regionvlp qa vocab URLS --top K --out {path}` "
                        "or set qa.vocab=auto")
    try:
        data = json_loads(read_text(path, VOCAB_BYTES, "QA vocabulary"))
        answers, counts = list(data["answers"]), list(data.get("counts", [0] * len(data["answers"])))
        num_pairs, skipped = data.get("num_pairs", 0), dict(data.get("skipped", {}))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise UserError(f"QA vocabulary {path} is not a vocab file ({type(err).__name__}: {str(err)[:200]}); "
                        "rebuild it with `regionvlp qa vocab`") from None
    if not answers or not all(isinstance(a, str) for a in answers) or len(counts) != len(answers):
        raise UserError(f"QA vocabulary {path}: 'answers' must be a non-empty list of strings matching 'counts'")
    whole = [num_pairs, *counts, *skipped.values()]  # 1e999 parses as inf; true as 1: neither is a count
    if not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < 2**63 for c in whole):
        raise UserError(f"QA vocabulary {path}: 'counts', 'num_pairs' and 'skipped' must hold whole numbers >= 0; "
                        "rebuild it with `regionvlp qa vocab`")
    return QAVocab(answers, counts, num_pairs, {str(k): v for k, v in skipped.items()})


def count_answers(raw_samples: Iterable[dict[str, Any]], skipped: Counter) -> tuple[Counter, int]:
    """Answer counts over raw tar samples (only their json is parsed)."""
    counts: Counter = Counter()
    pairs_seen = 0
    for raw in raw_samples:
        try:
            meta = json_loads(raw["json"]) if "json" in raw else {}
        except (ValueError, UnicodeDecodeError):
            skipped["bad_json"] += 1
            continue
        if not isinstance(meta, dict) or not has_qa(meta):
            skipped["no_qa"] += 1
            continue
        pairs, bad = qa_pairs(meta)
        skipped["bad_qa"] += len(bad)
        counts.update(p.answer for p in pairs)
        pairs_seen += len(pairs)
    return counts, pairs_seen


# --------------------------------------------------------------- pipeline stage
def qa_samples(samples: Iterable[dict[str, Any]], *, training: bool, vocab: QAVocab | None, rng: random.Random,
               skip: Any, pairs_per_visit: str = "one") -> Iterator[dict[str, Any]]:
    """Decoded clips -> QA samples (``caption`` = the question, ``answer``, ``answer_id``,
    ``question_type``, ``qa_index``). ``skip(reason, sample, detail)`` counts a skip.
    Training yields one pair drawn per clip visit (``pairs_per_visit="one"``) or every
    pair of the clip in a shuffled order (``"all"``: an epoch over the clips is one over
    the pairs, as DemoVLP trains); evaluation always yields every pair once."""
    for s in samples:
        pairs, bad = qa_pairs(s["meta"])
        for detail in bad:
            skip("bad_qa", s, detail)
        if not pairs:
            if not bad:
                skip("no_qa", s, "the json has no 'qa' list and no 'question'/'answer'")
            continue
        chosen = list(enumerate(pairs))
        if training:
            if vocab is not None:
                kept = [(i, p) for i, p in chosen if vocab.id_of(p.answer) >= 0]
                for _ in range(len(chosen) - len(kept)):
                    skip("qa_answer_not_in_vocab", s, "")
                chosen = kept
            if not chosen:
                continue
            if pairs_per_visit == "all":
                rng.shuffle(chosen)
            else:
                chosen = [chosen[rng.randrange(len(chosen))]]
        for i, pair in chosen:
            yield {**s, "caption": pair.question, "question": pair.question, "answer": pair.answer,
                   "answer_id": vocab.id_of(pair.answer) if vocab is not None else -1,
                   "question_type": pair.qtype or question_type(pair.question), "qa_index": i}


# ------------------------------------------------------------------ annotations
ID_COLS = ("video_id", "video", "vid", "video_name", "clip_id", "id")


def id_candidates(value: Any) -> set[str]:
    """Names a video id may take: ``7`` -> {7, video7, vid7}; ``video7.mp4`` -> {video7.mp4, video7}."""
    text = str(value).strip()
    stem = Path(text).stem if text else text
    out = {text, stem}
    if text.isdigit():
        out |= {f"video{text}", f"vid{text}"}
    return {c for c in out if c}


def _annotation_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise UserError(f"--qa {path}: no such file")
    text = read_text(path, ANNOTATION_BYTES, "--qa", "utf-8-sig")  # refused past the budget: split it
    try:
        if text.lstrip().startswith("["):
            rows = json_loads(text)
        else:
            rows = [json_loads(line) for line in text.splitlines() if line.strip()]
    except ValueError as err:
        raise UserError(f"--qa {path}: not a JSON list or JSONL ({err}); use the MSRVTT-QA / MSVD-QA "
                        "annotation JSON or one {{video_id, question, answer}} object per line") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise UserError(f"--qa {path}: expected a list of objects with a video id, question and answer")
    return rows


def load_annotations(path: str | Path) -> tuple[dict[str, list[dict[str, str]]], dict[str, int]]:
    """``{video id: [{"question", "answer"}, ...]}`` in file order, and skip counts."""
    rows = _annotation_rows(Path(path))
    id_col = next((c for c in ID_COLS if any(c in r for r in rows[:100])), None)
    if id_col is None:
        raise UserError(f"--qa {path}: no video id field (looked for {', '.join(ID_COLS)})")
    by_video: dict[str, list[dict[str, str]]] = {}
    skipped: Counter = Counter()
    for row in rows:
        pairs, bad = qa_pairs({"question": row.get("question"), "answer": row.get("answer")})
        if bad or row.get(id_col) in (None, ""):
            skipped["bad_qa" if bad else "no_video_id"] += 1
            continue
        by_video.setdefault(str(row[id_col]).strip(), []).append(
            {"question": pairs[0].question, "answer": pairs[0].answer})
    return by_video, dict(skipped)


def join_annotations(clip_ids: dict[int, set[str]], by_video: dict[str, list[dict[str, str]]]
                     ) -> tuple[dict[int, list[dict[str, str]]], dict[str, int]]:
    """Clip index -> its pairs (a clip matches a video id by any :func:`id_candidates`);
    also the annotated video ids that matched no clip (id -> pairs). An id that names two
    clips under two naming schemes (``7`` -> ``video7`` and ``vid7``) is an error."""
    lookup: dict[str, int] = {}
    for index, names in clip_ids.items():
        for name in names:
            lookup.setdefault(name, index)
    joined: dict[int, list[dict[str, str]]] = {}
    unmatched: dict[str, int] = {}
    for vid, pairs in by_video.items():
        hits = {lookup[c]: c for c in sorted(id_candidates(vid)) if c in lookup}
        if len(hits) > 1:
            raise UserError(f"--qa: video id {vid} matches {len(hits)} clips under different naming schemes "
                            f"({' and '.join(sorted(hits.values()))}); keep the clips of one dataset only")
        if not hits:
            unmatched[vid] = len(pairs)
        else:
            joined.setdefault(next(iter(hits)), []).extend(pairs)
    return joined, unmatched


def vocab_path(cfg: Any) -> Path:
    """The run's vocabulary file: ``qa.vocab``, or ``run.out_dir/qa_vocab.json`` for ``auto``."""
    value = str(cfg.qa.vocab)
    return Path(cfg.run.out_dir) / VOCAB_FILE if value == "auto" else Path(value)


def loader_vocab(cfg: Any, training: bool) -> QAVocab | None:
    """The vocabulary a QA loader maps answers with: required to train, optional to
    evaluate (answers are then compared as text)."""
    path = vocab_path(cfg)
    if training or path.is_file():
        return load_vocab(path)
    return None
