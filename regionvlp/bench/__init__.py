"""``regionvlp bench …``: one module per benchmark, timing helpers in :mod:`regionvlp.bench.common`."""
