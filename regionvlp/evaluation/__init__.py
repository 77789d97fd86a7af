"""Evaluation: pure metrics (:mod:`.metrics`), embedding and gathering across ranks
(:mod:`.embed`), and evaluation runs of a model, run or export (:mod:`.run`)."""

from regionvlp.evaluation.embed import EvalEmbeddings, Tokenize, embed_local, gather_embeddings, merge_embeddings
from regionvlp.evaluation.metrics import mc_accuracy, rank_metrics, retrieval_metrics, t2v_ranks, v2t_ranks
from regionvlp.evaluation.run import evaluate_model, load_eval_model, metrics_from_embeddings, run_eval

__all__ = [
    "EvalEmbeddings",
    "Tokenize",
    "embed_local",
    "evaluate_model",
    "gather_embeddings",
    "load_eval_model",
    "mc_accuracy",
    "merge_embeddings",
    "metrics_from_embeddings",
    "rank_metrics",
    "retrieval_metrics",
    "run_eval",
    "t2v_ranks",
    "v2t_ranks",
]
