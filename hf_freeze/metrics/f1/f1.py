"""F1 score, binary or macro-averaged (an `evaluate` metric shipped for offline use, no scikit-learn needed)."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "F1 = 2 * precision * recall / (precision + recall); `average='macro'` averages it over classes."
_KWARGS = """
Args:
    predictions (`list[int]`): predicted labels.
    references (`list[int]`): true labels.
    average (`str`, defaults to `"binary"`): `"binary"` scores `pos_label`; `"macro"` averages over all labels.
    pos_label (`int`, defaults to 1): the positive class for `"binary"`.
Returns:
    f1 (`float`): in [0, 1].
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, average="binary", pos_label=1):
        predictions, references = np.asarray(predictions), np.asarray(references)
        if average == "binary":
            return {"f1": _f1(predictions, references, pos_label)}
        if average == "macro":
            labels = np.union1d(predictions, references)
            return {"f1": float(np.mean([_f1(predictions, references, label) for label in labels]))}
        raise ValueError(f"`average` must be 'binary' or 'macro', got {average!r}.")


def _f1(predictions, references, label):
    true_positive = np.sum((predictions == label) & (references == label))
    predicted, actual = np.sum(predictions == label), np.sum(references == label)
    if predicted == 0 or actual == 0 or true_positive == 0:
        return 0.0
    precision, recall = true_positive / predicted, true_positive / actual
    return float(2 * precision * recall / (precision + recall))
