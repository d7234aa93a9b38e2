"""FibecFed in pure torch: Fisher difficulty, curriculum, layer selection, sparse update, aggregation.

Nothing here imports fedml or the rest of the package, so it can be tested and reused on its own.
"""
from .aggregate import PayloadError, check_payload, check_rows, payload_bytes, weighted_average
from .curriculum import curriculum_batches, curriculum_size, easiest_first, local_batches, local_step_count, pacing
from .fisher import (embedding_fisher_scores, logit_fisher_scores, lora_fisher_scores, per_sample_fisher_scores,
                     score_dataset)
from .layer_selection import (
    grad_sensitivity_layer_scores,
    perturbation_layer_scores,
    select_gal,
    weighted_mean_scores,
)
from .sparse import (
    SparseUpdate,
    squared_grad_hooks,
    momentum_update,
    neuron_scores,
    select_top_neurons,
)

__all__ = [
    "PayloadError", "check_payload", "check_rows", "payload_bytes", "weighted_average",
    "curriculum_batches", "curriculum_size", "easiest_first", "local_batches", "local_step_count", "pacing",
    "embedding_fisher_scores", "logit_fisher_scores", "lora_fisher_scores", "per_sample_fisher_scores", "score_dataset",
    "grad_sensitivity_layer_scores", "perturbation_layer_scores", "select_gal", "weighted_mean_scores",
    "SparseUpdate", "squared_grad_hooks", "momentum_update", "neuron_scores", "select_top_neurons",
]
