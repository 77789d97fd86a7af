"""The answer vocabulary in one streaming pass over shards: ``regionvlp qa vocab``."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from regionvlp.config import default_config
from regionvlp.data.qa import VOCAB_FILE, QAVocab, count_answers, load_vocab, vocab_from_counts
from regionvlp.data.reader import ReadOptions, tar_samples
from regionvlp.data.skips import SkipCounter
from regionvlp.data.sources import parse_specs
from regionvlp.errors import UserError


def build_vocab(urls: Sequence[str], top: int, cfg: Any = None) -> QAVocab:
    """One streaming pass over ``urls`` (json members only are parsed)."""
    cfg = cfg if cfg is not None else default_config()
    shards = parse_specs(list(urls), allow_pipe=bool(cfg.data.allow_pipe))
    counter = SkipCounter()
    skipped: Counter = Counter()
    raw = tar_samples(shards.urls, counter, ReadOptions.of(cfg))
    counts, pairs = count_answers(raw, skipped)
    skipped.update(counter.skipped)
    return vocab_from_counts(counts, top, pairs, {k: v for k, v in skipped.items() if v})


def vocab_command(urls: Sequence[str], top: int, out: str | Path) -> dict[str, Any]:
    """``regionvlp qa vocab URLS --top K --out vocab.json``: the JSON summary."""
    vocab = build_vocab(urls, top)
    vocab.save(out)
    total = sum(vocab.counts)
    return {"out": str(out), "answers": len(vocab.answers), "top": top, "pairs": vocab.num_pairs,
            "coverage": total / vocab.num_pairs if vocab.num_pairs else 0.0, "majority": vocab.majority,
            "majority_frac": vocab.counts[0] / vocab.num_pairs if vocab.num_pairs else 0.0,
            "skipped": vocab.skipped}


def prepare_run_vocab(cfg: Any, run_dir: str | Path) -> QAVocab:
    """Rank 0 at the start of a QA run: ``run_dir/qa_vocab.json`` is kept when it exists
    (resume), else copied from ``qa.vocab`` or built from ``data.train`` (top
    ``qa.num_answers``). The export carries this file."""
    target = Path(run_dir) / VOCAB_FILE
    source = str(cfg.qa.vocab)
    if source != "auto" and Path(source).resolve() != target.resolve():
        vocab = load_vocab(source)
        if len(vocab.answers) > int(cfg.qa.num_answers):
            raise UserError(f"qa.vocab {source} has {len(vocab.answers)} answers, more than "
                            f"qa.num_answers={cfg.qa.num_answers}; rebuild it with --top {cfg.qa.num_answers}")
        vocab.save(target)
        return vocab
    if target.is_file():
        return load_vocab(target)
    vocab = build_vocab(list(cfg.data.train.urls), int(cfg.qa.num_answers), cfg)
    vocab.save(target)
    return vocab
