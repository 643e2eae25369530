"""``clinical_efficacy``: CheXpert observations found in the generated vs the reference reports."""

from rrg_jax.evaluators import Predictions, register
from rrg_jax.metrics import clinical


@register("clinical_efficacy")
def clinical_efficacy(predictions: Predictions, config) -> dict[str, float]:
  """CE_* precision / recall / F1 (micro, macro, example-based) of the 14 observations (``metrics.clinical``)."""
  del config
  return clinical.clinical_efficacy(list(predictions.generated), list(predictions.references))
