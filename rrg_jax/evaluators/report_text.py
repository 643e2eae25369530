"""``report_text``: the natural-language scores of generated vs reference reports."""

from rrg_jax.evaluators import Predictions, register
from rrg_jax.metrics import text


@register("report_text")
def report_text(predictions: Predictions, config) -> dict[str, float]:
  """BLEU_1..4, METEOR, ROUGE_L, Cider (pycocoevalcap, no PTB tokenizer) and sacreBLEU (``metrics.text``)."""
  del config
  keys = [str(i) for i in range(len(predictions.references))]
  return text.compute_scores(dict(zip(keys, predictions.references)), dict(zip(keys, predictions.generated)))
