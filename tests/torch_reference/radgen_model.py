"""The whole RadGen model in PyTorch, composed of the transformers modules and ``torch_reference/radgen.py``'s fusion
and classifier, with the public code's module tree and state_dict names (radgen_spec §3, §10.4):

* ``report_gen.swin`` (``transformers.SwinModel``, no pooler) — registered a second time as
  ``report_gen.image_encoder.backbone`` (the same module object, so a state_dict holds its tensors twice);
* ``report_gen.image_encoder.proj`` (Linear swin width → D): ``z_img = proj(mean_n F_n)`` (§3.2, the code's order);
* ``report_gen.bart_proj`` = Linear → LayerNorm(ε 1e-5) → exact GELU over the Swin tokens (``adapter_input =
  "swin"``, the code) or over the projected tokens ``proj(F_n)`` (``"projected"``, the spec's decision, §3.3);
* ``report_gen.bart`` (``transformers.BartForConditionalGeneration``): the encoder over the adapted tokens as
  ``inputs_embeds``, the decoder teacher-forced with a plain causal mask (§3.4), or ``generate`` (§3.5);
* ``clinical_bert`` (``transformers.BertModel``, with its unused pooler as in the code), ``fusion``,
  ``classifier``.

Built from a RadGen ``config.model`` (``configs/radgen.py``); eager attention. Test-only."""

from __future__ import annotations

import math
from typing import Any

import torch
import transformers
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from torch_reference import radgen


class ImageEncoder(nn.Module):
  """``report_gen.image_encoder``: ``backbone`` (the Swin, shared) and ``proj``."""

  def __init__(self, backbone: transformers.SwinModel, dim: int):
    super().__init__()
    self.backbone = backbone
    self.proj = nn.Linear(backbone.num_features, dim)


class ReportGenerator(nn.Module):
  """``report_gen``: Swin → adapter (``bart_proj``) → BART."""

  def __init__(self, swin: transformers.SwinModel, bart: transformers.BartForConditionalGeneration, dim: int,
               adapter_input: str):
    super().__init__()
    assert adapter_input in ("projected", "swin"), adapter_input
    self.adapter_input = adapter_input
    self.swin = swin
    self.image_encoder = ImageEncoder(swin, dim)
    width = bart.config.d_model
    self.bart_proj = nn.Sequential(nn.Linear(swin.num_features if adapter_input == "swin" else dim, width),
                                   nn.LayerNorm(width, eps=1e-5), nn.GELU())
    self.bart = bart

  def encode(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """pixel_values (B, 3, S, S) → z_img (B, D), the adapted tokens M (B, N, d) (the BART encoder's input)."""
    f = self.swin(pixel_values).last_hidden_state
    z_img = self.image_encoder.proj(f.mean(1))
    x = f if self.adapter_input == "swin" else self.image_encoder.proj(f)
    return z_img, self.bart_proj(x)


class RadGenTorch(nn.Module):
  """The public model's top level: ``report_gen``, ``clinical_bert``, ``fusion``, ``classifier``."""

  def __init__(self, model_config: Any, *, dropout: bool = True):
    """``model_config``: a RadGen ``config.model`` with the BART / BERT vocabulary sizes set. ``dropout=False``
    sets every dropout and drop-path rate to 0 (train-mode parity, §12.12)."""
    super().__init__()
    m = model_config

    def rate(p: float) -> float:
      return p if dropout else 0.0

    swin_config = transformers.SwinConfig(**{**dict(m.swin), "drop_path_rate": rate(m.swin.drop_path_rate)})
    bart_config = transformers.BartConfig(**{
        **dict(m.bart), "dropout": rate(m.bart.dropout), "attention_dropout": rate(m.bart.attention_dropout),
        "activation_dropout": rate(m.bart.activation_dropout), "activation_function": "gelu"})
    bert_config = transformers.BertConfig(**{
        **dict(m.bert), "hidden_dropout_prob": rate(m.bert.hidden_dropout_prob),
        "attention_probs_dropout_prob": rate(m.bert.attention_probs_dropout_prob)})
    for c in (swin_config, bart_config, bert_config):
      c._attn_implementation = "eager"
    self.report_gen = ReportGenerator(transformers.SwinModel(swin_config, add_pooling_layer=False),
                                      transformers.BartForConditionalGeneration(bart_config), m.fusion_dim,
                                      m.adapter_input)
    self.clinical_bert = transformers.BertModel(bert_config)
    self.fusion = radgen.CrossModalFusion(m.bert.hidden_size, m.fusion_dim, m.fusion_heads, m.fusion_ffn,
                                          rate(0.1), m.text_pool, m.gate, m.gate_mix)
    self.classifier = radgen.classifier(m.fusion_dim, m.classifier_hidden, m.num_classes,
                                        rate(m.classifier_dropout))

  def forward(self, pixel_values: torch.Tensor, decoder_input_ids: torch.Tensor, text_ids: torch.Tensor,
              text_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """pixel_values (B, 3, S, S), decoder inputs (B, T) (``targets[:, :-1]``), text ids / mask (B, T_t) →
    ``class_logits`` (B, C), ``report_logits`` (B, T, V), ``text_attention`` (B, heads, 1, T_t)."""
    z_img, m = self.report_gen.encode(pixel_values)
    bart = self.report_gen.bart
    enc = bart.model.encoder(inputs_embeds=m).last_hidden_state
    report = bart(encoder_outputs=BaseModelOutput(last_hidden_state=enc), decoder_input_ids=decoder_input_ids).logits
    h = self.clinical_bert(input_ids=text_ids, attention_mask=text_mask).last_hidden_state
    z, weights = self.fusion(z_img, h, text_mask)
    return {"class_logits": self.classifier(z), "report_logits": report, "text_attention": weights}

  @torch.no_grad()
  def generate(self, pixel_values: torch.Tensor, **generation: Any) -> torch.Tensor:
    """transformers ``generate`` of the report over the adapted tokens (B, N, d) → token ids (B, L), the decoder
    start token first."""
    _, m = self.report_gen.encode(pixel_values)
    return self.report_gen.bart.generate(inputs_embeds=m, attention_mask=torch.ones(m.shape[:2], dtype=torch.long),
                                         **generation)


def perturb(model: nn.Module, seed: int) -> nn.Module:
  """Redraws every parameter so that activations stay O(1) through the whole model (attention far from uniform, the
  image visibly steering the report) and a mix-up shows: matrices, convolution kernels, embedding tables and the
  relative-position tables (HF init: 0) N(0, 1/fan_in) with fan_in = the product of the trailing dimensions;
  1-D parameters (biases, LayerNorms) get N(0, 0.1²) added; BART's ``final_logits_bias`` buffer becomes
  N(0, 0.5²). Returns ``model``."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      if p.ndim == 1:
        p.add_(0.1 * torch.randn(p.shape, generator=generator))
      else:
        p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(p[0].numel()))
    bias = model.report_gen.bart.final_logits_bias
    bias.copy_(0.5 * torch.randn(bias.shape, generator=generator))
  return model
