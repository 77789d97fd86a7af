"""Data: shard sources, streaming pipeline, decoding, captions and tokenizer.

The streaming pipeline in parts: :mod:`~regionvlp.data.reader` (tar stream → raw
samples, the resume cursor), :mod:`~regionvlp.data.samples` (raw sample → decoded
sample), :mod:`~regionvlp.data.skips` (skip reasons and counts),
:mod:`~regionvlp.data.loader` (worker dataset, batches, the DataLoader factory) and
:mod:`~regionvlp.data.inspect` (``regionvlp data inspect``).

The agreed API other parts import:

- :func:`build_loader` — a ``wds.WebLoader`` of collated batch dicts for training/eval;
- :func:`iter_samples` — decoded samples in one process (shards check, regions extract);
- :func:`load_tokenizer`, :func:`tokenize` — captions → ids + attention mask;
- :func:`epoch_size` — samples per epoch from config or ``sizes.json``.
"""

from regionvlp.data.loader import build_loader, collate, epoch_size
from regionvlp.data.samples import SampleStream, decode_sample, iter_samples
from regionvlp.data.skips import SKIP_REASONS, SkipCounter
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
