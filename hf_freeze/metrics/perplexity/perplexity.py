"""Perplexity from per-token negative log-likelihoods (an `evaluate` metric shipped for offline use).

Unlike the Hub's `perplexity` metric, it does not run a model: give it the NLL of every predicted token (the
causal-LM recipe computes them from the logits it already has), and it returns exp(mean NLL).
"""

import math

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Perplexity = exp(mean negative log-likelihood per token)."
_KWARGS = """
Args:
    predictions (`list[float]`): negative log-likelihood of each predicted token (natural log).
Returns:
    perplexity (`float`), mean_nll (`float`).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("float64")}),
        )

    def _compute(self, predictions):
        mean_nll = float(np.mean(predictions)) if len(predictions) else float("nan")
        return {"perplexity": math.exp(mean_nll) if mean_nll == mean_nll else float("nan"), "mean_nll": mean_nll}
