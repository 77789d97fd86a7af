"""Data: shard sources, streaming pipeline, decoding, captions and tokenizer.

The agreed API other parts import:

- :func:`build_loader` — a ``wds.WebLoader`` of collated batch dicts for training/eval;
- :func:`iter_samples` — decoded samples in one process (shards check, regions extract);
- :func:`load_tokenizer`, :func:`tokenize` — captions → ids + attention mask;
- :func:`epoch_size` — samples per epoch from config or ``sizes.json``.
"""

from regionvlp.data.pipeline import (
    SKIP_REASONS,
    SampleStream,
    SkipCounter,
    build_loader,
    collate,
    decode_sample,
    epoch_size,
    iter_samples,
)
from regionvlp.data.sources import parse_specs, register_webdataset_handlers
from regionvlp.data.text import load_tokenizer, sample_captions, tokenize


__all__ = [
    "SKIP_REASONS",
    "SampleStream",
    "SkipCounter",
    "build_loader",
    "collate",
    "decode_sample",
    "epoch_size",
    "iter_samples",
    "load_tokenizer",
    "parse_specs",
    "register_webdataset_handlers",
    "sample_captions",
    "tokenize",
]
