"""Open-ended video question answering on either pathway.

- :mod:`regionvlp.data.qa` — QA pairs in samples, question types, the answer vocabulary;
- :mod:`regionvlp.qa.vocab` — ``regionvlp qa vocab``: the vocabulary in one streaming pass;
- :mod:`regionvlp.qa.head` — the QA head (question tokens cross-attend to region tokens + [CLS]);
- :mod:`regionvlp.qa.metrics` — accuracy, majority baseline, accuracy by question type;
- :mod:`regionvlp.qa.evaluate` — QA evaluation of a model over val/test shards (any world size).

The QA model itself is :class:`regionvlp.model.QAModel` (the dual encoder + the head).
"""
