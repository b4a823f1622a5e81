"""Accuracy as an `evaluate` metric module, loaded offline by `evaluate.load(hf_dppf.recipes.metrics.ACCURACY)`."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Accuracy: the fraction of predicted labels that equal their reference label."
_INPUTS = """
Args:
    predictions (`list[int]`): the predicted labels.
    references (`list[int]`): the true labels, one per prediction.
    normalize (`bool`, defaults to `True`): return the fraction of correct predictions; `False`: their number.
    sample_weight (`list[float]`, *optional*): a weight per prediction.

Returns:
    accuracy (`float`): in [0, 1] when `normalize`, else the (weighted) count of correct predictions.

Example:
    >>> metric = evaluate.load(hf_dppf.recipes.metrics.ACCURACY)
    >>> metric.compute(predictions=[0, 1, 2, 1], references=[0, 1, 1, 1])
    {'accuracy': 0.75}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class Accuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, normalize: bool = True, sample_weight=None) -> dict[str, float]:
        correct = (np.asarray(predictions) == np.asarray(references)).astype(np.float64)
        weights = np.ones_like(correct) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        total = float((correct * weights).sum())
        return {"accuracy": total / float(weights.sum()) if normalize else total}
