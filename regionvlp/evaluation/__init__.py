"""Evaluation: pure metrics (:mod:`.metrics`), embedding and gathering across ranks
(:mod:`.embed`), the ``protocol`` stamped on every result (:mod:`.protocol`), and evaluation runs of a model, run or export (:mod:`.run`)."""

from regionvlp.evaluation.embed import EvalEmbeddings, Tokenize, embed_local, gather_embeddings, merge_embeddings
from regionvlp.evaluation.metrics import dual_softmax, mc_accuracy, rank_metrics, retrieval_metrics, t2v_ranks, v2t_ranks
from regionvlp.evaluation.protocol import checkpoint_stamp, eval_protocol
from regionvlp.evaluation.run import evaluate_model, load_eval_model, loaded_weights, metrics_from_embeddings, run_eval

__all__ = [
    "EvalEmbeddings",
    "checkpoint_stamp",
    "eval_protocol",
    "loaded_weights",
    "Tokenize",
    "dual_softmax",
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
