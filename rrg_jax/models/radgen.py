"""RadGen (radgen_spec.md): image → generated report → text encoder → gated cross-modal fusion → class.

Composition only (the blocks: ``layers.swin``, ``layers.bart``, ``layers.bert``, ``alignment.fusion``,
``layers.classifier``; HF-semantics beam search from ``decoding``). Parameter tree (spec §10.4's port tree):
``image_encoder/…`` (HF ``SwinModel``), ``image_proj`` (Swin width → D), ``adapter_{dense,norm}`` (→ BART width),
``decoder/…`` (HF ``BartForConditionalGeneration``; its ``final_logits_bias`` buffer lives in ``batch_stats``, the
train state's non-trainable collection, and is never updated), ``text_encoder/…`` (HF ``BertModel`` without the
pooler), ``fusion/…``, ``classifier/…``.

Forward (§3.11), with ``F`` the Swin tokens (B, N, C_swin), ``P = F W_p + b_p`` (B, N, D) and ``z_img = mean_n P``:

* memory (§3.3): ``M = GELU(LN_a(X W_a + b_a))`` over the N tokens, ``X = P`` (``adapter_input = projected``) or
  ``F`` (``swin``, the public code); ``visual_memory = pooled`` uses the single token from ``z_img`` instead; the
  BART encoder runs over it as input embeddings (``use_encoder``), else the decoder reads ``M`` directly;
* report (§3.4): BART's teacher-forced decoder over the memory → logits (B, T, V);
* text (§3.6): the report *generated with the current parameters* (no gradient, deterministic: ``System.forward``)
  → text-encoder ids ``[CLS] words [SEP]`` → BERT → ``H`` (B, T_t, d) → fusion with ``z_img`` (§3.8) →
  classifier (§3.9) → class logits (B, C).
``report_branch = False`` (``wo_report_generation``, §9.2): no decoder and no text branch, ``z = z_img``.

Tokens, two backends (§2.3):

* word (``data.report_tokenizer = ""``, [decision]): the project's word tokenizer (id 0 = BOS = EOS = PAD, words
  1..K−1) for the decoder; the text encoder's vocabulary appends ``[CLS] = K`` and ``[SEP] = K + 1`` (pad 0).
  Targets ``[0, w1..wn, 0]`` (``data.max_seq_length`` = 1 + the decoder length): the decoder reads
  ``targets[:, :-1]`` and predicts ``targets[:, 1:]``; the generated words become text-encoder ids on device, so
  the train step is one program.
* hf (``data.report_tokenizer`` = a BART BPE folder, ``data.text_tokenizer`` = a BERT WordPiece folder): targets
  ``<s> w.. </s>`` truncated keeping the specials, padded with ``<pad>`` (``data.max_seq_length`` = 64 = the
  decoder length); the decoder reads ``shift_right(targets)`` (start ``</s>``) and predicts ``targets``. The text
  the text encoder reads is made on the host between two compiled programs (``round_trip``: generate → BART decode
  → BERT ``[CLS] … [SEP]`` padded to ``data.text_max_tokens``), exact because the ids carry no gradient; in
  evaluation ``generate`` does the same. ``train.generation.retokenize = wrong_vocab`` (``radgen_code``) decodes the
  BART ids with the BERT tokenizer as the public code does (§3.6).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from rrg_jax import convert, decoding, hf_weights, losses, models, sharding
from rrg_jax.alignment.fusion import CrossModalFusion, pool_text
from rrg_jax.layers.bart import BartConfig, BartForConditionalGeneration
from rrg_jax.layers.bert import BertConfig, BertModel
from rrg_jax.layers.classifier import ClassifierHead
from rrg_jax.layers.densenet import DenseNet
from rrg_jax.layers.linear import Linear, torch_kernel_init
from rrg_jax.layers.swin import SwinConfig, SwinModel
from rrg_jax.convert import ConversionError
from rrg_jax.models.system import Field, System, module_kwargs

VISUAL_MEMORIES = ("patch", "pooled")
ADAPTER_INPUTS = ("projected", "swin")
RETOKENIZE = ("text", "wrong_vocab")  # §3.6: how generated ids become text-encoder ids (hf backend)
ARCHS = ("radgen", "image_only", "text_only", "early_fusion", "late_fusion")  # the last four: §9.1's baselines
IMAGE_BACKBONES = ("swin", "densenet121")
TEXT_SOURCES = ("generated", "ground_truth")
NON_TRAINABLE = "batch_stats"  # the train state's non-trainable collection (BART's final_logits_bias)


class RadGen(nn.Module):
  """The RadGen model. Attributes are the ``config.model`` fields (``configs/radgen.py``); ``dtype`` is the compute
  dtype name ("float32" | "bfloat16"; params, LayerNorm statistics, softmax and losses stay float32)."""
  swin: SwinConfig
  bart: BartConfig | None
  bert: BertConfig | None
  num_classes: int = 3
  fusion_dim: int = 512
  fusion_heads: int = 8
  fusion_ffn: int = 2048
  fusion_dropout: float = 0.1
  fusion_mode: str = "cross_attention"
  text_pool: str = "masked_mean"
  gate: bool = True
  gate_mix: str = "fused"
  classifier_hidden: Sequence[int] = (256, 128)
  classifier_dropout: float = 0.3
  visual_memory: str = "patch"
  adapter_input: str = "projected"
  use_encoder: bool = True
  drop_path_on_mlp: bool = False
  dtype: str = "float32"

  @classmethod
  def from_config(cls, config: Any) -> nn.Module:
    """From ``config.model`` (``report_branch`` False drops BART and BERT); ``arch`` other than "radgen" builds
    the §9.1 baseline (``RadGenBaseline``)."""
    if config.get("arch", "radgen") != "radgen":
      return RadGenBaseline.from_config(config)
    kwargs = module_kwargs(cls, config)
    kwargs["swin"] = SwinConfig(**dict(config.swin))
    branch = bool(config.get("report_branch", True))
    kwargs["bart"] = BartConfig(**dict(config.bart)) if branch else None
    kwargs["bert"] = BertConfig(**dict(config.bert)) if branch else None
    return cls(**kwargs)

  def setup(self):
    for value, choices, what in ((self.visual_memory, VISUAL_MEMORIES, "visual_memory"),
                                 (self.adapter_input, ADAPTER_INPUTS, "adapter_input")):
      if value not in choices:
        raise ValueError(f"config.model.{what}={value!r}; choose one of {choices}.")
    dtype = jnp.dtype(self.dtype)
    self.image_encoder = SwinModel(self.swin, add_pooling_layer=False, dtype=dtype,
                                   drop_path_on_mlp=self.drop_path_on_mlp)
    self.image_proj = Linear(self.fusion_dim, kernel_init=torch_kernel_init, dtype=dtype)
    if self.bart is not None:
      self.adapter_dense = Linear(self.bart.d_model, kernel_init=torch_kernel_init, dtype=dtype)
      self.adapter_norm = nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, dtype=dtype, param_dtype=jnp.float32)
      self.decoder = BartForConditionalGeneration(self.bart, dtype, constants_collection=NON_TRAINABLE)
      self.text_encoder = BertModel(self.bert, add_pooling_layer=False, dtype=dtype)
      self.fusion = CrossModalFusion(self.fusion_dim, self.fusion_heads, self.fusion_ffn, self.fusion_mode,
                                     self.text_pool, self.gate, self.gate_mix, self.fusion_dropout,
                                     self.fusion_dropout, dtype=dtype)
    self.classifier = ClassifierHead(tuple(self.classifier_hidden), self.num_classes, self.classifier_dropout,
                                     dtype=dtype)

  # --- image → z_img and the decoder memory --------------------------------------------------------------------

  def encode(self, images: jax.Array, *, deterministic: bool = True) -> dict[str, jax.Array]:
    """images (B, 1, S, S, 3) → ``z_img`` (B, D) and, with the report branch, ``memory`` (B, N', d): the BART
    encoder's output over the adapted tokens (N' = N, or 1 with ``visual_memory = pooled``)."""
    if images.ndim != 5 or images.shape[1] != 1:
      raise ValueError(f"RadGen reads one view: images (B, 1, S, S, 3), got {images.shape}.")
    f = self.image_encoder(images[:, 0], deterministic=deterministic)["last_hidden_state"]
    p = self.image_proj(f)
    z_img = jnp.mean(p.astype(jnp.float32), axis=1)
    out = {"z_img": z_img}
    if self.bart is None:
      return out
    x = p if self.adapter_input == "projected" else f
    if self.visual_memory == "pooled":  # one token: the mean (z_img itself for the projected tokens)
      x = jnp.mean(x.astype(jnp.float32), axis=1, keepdims=True).astype(x.dtype)
    m = nn.gelu(self.adapter_norm(self.adapter_dense(x)), approximate=False)
    out["memory"] = self.decoder.encode(inputs_embeds=m, deterministic=deterministic) if self.use_encoder else m
    return out

  # --- report decoder ----------------------------------------------------------------------------------------

  def report_logits(self, decoder_inputs: jax.Array, memory: jax.Array, *, deterministic: bool = True
                    ) -> jax.Array:
    """Teacher-forced decoder: ids (B, T) over memory (B, N', d) → logits (B, T, V) float32 (causal mask only:
    the loss ignores pad positions, so their keys cannot reach a counted position)."""
    return self.decoder.decode(decoder_inputs, memory, deterministic=deterministic)["logits"]

  def init_cache(self, memory: jax.Array, max_len: int):
    return self.decoder.init_cache(memory, None, max_len)

  def decode_step(self, cache, token: jax.Array, deterministic: bool = True):
    return self.decoder.decode_step(cache, token, deterministic=deterministic)

  # --- text → fusion → class -----------------------------------------------------------------------------------

  def classify(self, z_img: jax.Array, text_ids: jax.Array | None, text_mask: jax.Array | None, *,
               deterministic: bool = True) -> dict[str, jax.Array]:
    """z_img (B, D), text ids / mask (B, T_t) → ``class_logits`` (B, C) float32 and, with the fusion's
    cross-attention, ``text_attention`` (B, heads, 1, T_t)."""
    out = {}
    z = z_img
    if self.bert is not None:
      h = self.text_encoder(text_ids, text_mask, deterministic=deterministic)["last_hidden_state"]
      z, probs = self.fusion(z_img, h, text_mask, deterministic=deterministic)
      if probs is not None:
        out["text_attention"] = probs
    out["class_logits"] = self.classifier(z, deterministic=deterministic).astype(jnp.float32)
    return out

  def __call__(self, images: jax.Array, decoder_inputs: jax.Array, text_ids: jax.Array, text_mask: jax.Array, *,
               train: bool = False) -> dict[str, jax.Array]:
    """Training forward (§3.11): images (B, 1, S, S, 3), the decoder's teacher-forced inputs (B, T'), the
    generated report's text ids / mask (B, T_t) → ``class_logits`` (B, C), ``report_logits`` (B, T', V) (absent
    without the report branch), ``text_attention``."""
    det = not train
    enc = self.encode(images, deterministic=det)
    out = self.classify(enc["z_img"], text_ids, text_mask, deterministic=det)
    if self.bart is not None:
      out["report_logits"] = self.report_logits(decoder_inputs, enc["memory"], deterministic=det)
    return out


class RadGenBaseline(nn.Module):
  """The outline's Table 1 baselines (§9.1), with RadGen's encoders, from ``config.model`` (``arch``):

  * ``image_only``: ``image_backbone = densenet121`` — DenseNet-121 features → ReLU → global average pool (1024)
    → Linear(→ C); ``swin`` — mean of the Swin tokens → Linear(→ 512) → GELU → Dropout → Linear(→ C);
  * ``text_only``: the text encoder's pooled states (``text_pool``) → Linear(→ 256) → GELU → Dropout → Linear(→ C);
  * ``early_fusion``: [Swin mean ; pooled text] → Linear(→ 512) → LN → GELU → Dropout → Linear(→ 256) → GELU →
    Dropout → Linear(→ C);
  * ``late_fusion``: the image head and the text head above, their logits averaged.
  Parameters: ``image_encoder`` (Swin or DenseNet-121), ``text_encoder`` (BERT, no pooler), ``image_head``,
  ``text_head``, ``fusion_head`` (``layers.classifier.ClassifierHead``). The text is the ground-truth report
  (``train.text_source = eval.text_source = ground_truth``)."""
  arch: str
  swin: SwinConfig | None
  bert: BertConfig | None
  num_classes: int = 3
  image_backbone: str = "swin"
  text_pool: str = "masked_mean"
  baseline_image_hidden: int = 512
  baseline_text_hidden: int = 256
  baseline_fusion_hidden: Sequence[int] = (512, 256)
  classifier_dropout: float = 0.3
  dtype: str = "float32"

  @classmethod
  def from_config(cls, config: Any) -> RadGenBaseline:
    kwargs = module_kwargs(cls, config)
    uses_image, uses_text = _baseline_branches(config.arch)
    kwargs["swin"] = SwinConfig(**dict(config.swin)) if uses_image else None
    kwargs["bert"] = BertConfig(**dict(config.bert)) if uses_text else None
    return cls(**kwargs)

  def setup(self):
    if self.arch not in ARCHS[1:] or self.image_backbone not in IMAGE_BACKBONES:
      raise ValueError(f"config.model.arch={self.arch!r} / image_backbone={self.image_backbone!r}; choose from "
                       f"{ARCHS} / {IMAGE_BACKBONES}.")
    if self.image_backbone == "densenet121" and self.arch != "image_only":
      raise ValueError("config.model.image_backbone='densenet121' is the image-only baseline's (§9.1).")
    dtype = jnp.dtype(self.dtype)
    head = functools.partial(ClassifierHead, num_classes=self.num_classes, dropout=self.classifier_dropout,
                             dtype=dtype)
    if self.swin is not None:
      self.image_encoder = (DenseNet(dtype=dtype) if self.image_backbone == "densenet121" else
                            SwinModel(self.swin, add_pooling_layer=False, dtype=dtype))
    if self.bert is not None:
      self.text_encoder = BertModel(self.bert, add_pooling_layer=False, dtype=dtype)
    if self.arch in ("image_only", "late_fusion"):
      hidden = () if self.image_backbone == "densenet121" else (self.baseline_image_hidden,)
      self.image_head = head(hidden, layer_norms=(False,) * len(hidden))
    if self.arch in ("text_only", "late_fusion"):
      self.text_head = head((self.baseline_text_hidden,), layer_norms=(False,))
    if self.arch == "early_fusion":
      hidden = tuple(self.baseline_fusion_hidden)
      self.fusion_head = head(hidden, layer_norms=(True,) + (False,) * (len(hidden) - 1))

  def encode(self, images: jax.Array, *, deterministic: bool = True) -> dict[str, jax.Array]:
    """images (B, 1, S, S, 3) → ``z_img`` (B, C_img): the mean Swin token, or DenseNet-121's pooled features; an
    empty dict for the text-only baseline."""
    if self.swin is None:
      return {}
    if self.image_backbone == "densenet121":
      f = self.image_encoder(images[:, 0], not deterministic)
      return {"z_img": jnp.mean(f.astype(jnp.float32), axis=(1, 2))}
    f = self.image_encoder(images[:, 0], deterministic=deterministic)["last_hidden_state"]
    return {"z_img": jnp.mean(f.astype(jnp.float32), axis=1)}

  def classify(self, z_img: jax.Array | None, text_ids: jax.Array | None, text_mask: jax.Array | None, *,
               deterministic: bool = True) -> dict[str, jax.Array]:
    """→ ``class_logits`` (B, C) float32."""
    t = None
    if self.bert is not None:
      h = self.text_encoder(text_ids, text_mask, deterministic=deterministic)["last_hidden_state"]
      t = pool_text(h, text_mask, self.text_pool)
    if self.arch == "image_only":
      logits = self.image_head(z_img, deterministic=deterministic)
    elif self.arch == "text_only":
      logits = self.text_head(t, deterministic=deterministic)
    elif self.arch == "early_fusion":
      logits = self.fusion_head(jnp.concatenate([z_img, t], axis=-1), deterministic=deterministic)
    else:
      logits = (self.image_head(z_img, deterministic=deterministic)
                + self.text_head(t, deterministic=deterministic)) / 2
    return {"class_logits": logits}

  def __call__(self, images: jax.Array, decoder_inputs: jax.Array, text_ids: jax.Array | None,
               text_mask: jax.Array | None, *, train: bool = False) -> dict[str, jax.Array]:
    del decoder_inputs  # no report branch
    return self.classify(self.encode(images, deterministic=not train).get("z_img"), text_ids, text_mask,
                         deterministic=not train)


def _baseline_branches(arch: str) -> tuple[bool, bool]:
  """(image branch, text branch) of a §9.1 baseline."""
  return arch in ("image_only", "early_fusion", "late_fusion"), arch in ("text_only", "early_fusion", "late_fusion")


def text_encoder_ids(tokens: jax.Array, cls_id: int, sep_id: int, length: int) -> tuple[jax.Array, jax.Array]:
  """Generated decoder tokens (B, L) (the start token first, words, EOS = 0, pads 0) → the text encoder's ids
  ``[CLS] w1..wn [SEP] 0…`` (B, length) int32 and mask (B, length) int32: the words before the first 0 after the
  start token, at most ``length − 2`` of them (§3.6, word backend, on device)."""
  words = tokens[:, 1:]
  n = jnp.minimum(jnp.sum(jnp.cumprod(words != 0, axis=1), axis=1), length - 2)[:, None]  # (B, 1)
  j = jnp.arange(length)[None]
  word = jnp.take_along_axis(words, jnp.clip(j - 1, 0, words.shape[1] - 1).repeat(words.shape[0], 0), axis=1)
  ids = jnp.where(j == 0, cls_id, jnp.where(j <= n, word, jnp.where(j == n + 1, sep_id, 0)))
  return ids.astype(jnp.int32), (j <= n + 1).astype(jnp.int32)


class ReportTokens(NamedTuple):
  """The decoder's special ids: ``start`` (the decoder-start token), ``eos``, ``pad`` and ``forced_bos`` (the
  token forced at the first generated position, None for none)."""
  start: int
  eos: int
  pad: int
  forced_bos: int | None


WORD_TOKENS = ReportTokens(start=0, eos=0, pad=0, forced_bos=None)


def hf_report_tokens(tokenizer: Any) -> ReportTokens:
  """BART's (§2.3, §3.5): start = ``</s>`` (decoder_start_token_id 2), eos ``</s>``, pad ``<pad>``, forced BOS
  ``<s>``."""
  missing = [r for r in ("bos_id", "eos_id", "pad_id") if getattr(tokenizer, r) is None]
  if missing:
    raise ValueError(f"config.data.report_tokenizer {tokenizer.source}: no {', '.join(missing)} (RadGen's decoder "
                     "needs BART's <s>, </s> and <pad>).")
  return ReportTokens(start=tokenizer.eos_id, eos=tokenizer.eos_id, pad=tokenizer.pad_id,
                      forced_bos=tokenizer.bos_id)


def shift_right(labels: jax.Array, start: int) -> jax.Array:
  """HF BART ``shift_tokens_right``: labels (B, T) → decoder inputs ``[start, labels[:, :-1]]`` (B, T)."""
  return jnp.concatenate([jnp.full_like(labels[:, :1], start), labels[:, :-1]], axis=1)


def word_spans(text: str, offsets: Sequence[tuple[int, int]]) -> np.ndarray:
  """For each token's character span in ``text``, the index of the whitespace-separated word it falls in (−1 for
  special tokens, span (0, 0)): (n,) int32 — maps the text encoder's tokens onto ``text.split()``."""
  starts = [m.start() for m in re.finditer(r"\S+", text)]
  index = np.full((len(offsets),), -1, np.int32)
  for i, (a, b) in enumerate(offsets):
    if b > a:
      index[i] = int(np.searchsorted(starts, a, side="right")) - 1
  return index


def _leaf_pairs(a: Any, b: Any) -> list[tuple[tuple, Any, Any]]:
  """(path, leaf of a, leaf of b) for the paths both trees have."""
  flat_b = dict(jax.tree_util.tree_flatten_with_path(b)[0])
  return [(tuple(getattr(k, "key", k) for k in path), leaf, flat_b[path])
          for path, leaf in jax.tree_util.tree_flatten_with_path(a)[0] if path in flat_b]


def _place_rows(rows: np.ndarray, like: jax.Array) -> jax.Array:
  """This process's rows → an array laid out like ``like`` (a global batch array, or a local one)."""
  if isinstance(like.sharding, NamedSharding):
    return jax.make_array_from_process_local_data(NamedSharding(like.sharding.mesh, P(*like.sharding.spec[:1])),
                                                  rows)
  return jnp.asarray(rows)


# --- the public code's checkpoint (§10.4) ------------------------------------------------------------------------

SWIN_PREFIXES = ("report_gen.swin.", "report_gen.image_encoder.backbone.")  # one module, registered twice
BART_PREFIX = "report_gen.bart."
BERT_PREFIX = "clinical_bert."
BART_EMBEDDING = BART_PREFIX + "model.shared.weight"
BERT_EMBEDDING = BERT_PREFIX + "embeddings.word_embeddings.weight"
# The new layers' torch keys → this port's (then ``convert``'s naming rule: Linear weights transposed, 1-D LayerNorm
# ``weight`` → ``scale``); the classifier's Sequential indices and the packed attention projections are mapped in
# ``public_head_state_dict``.
_HEAD_RENAMES = ((r"^report_gen\.image_encoder\.proj\.", "image_proj."),
                 (r"^report_gen\.bart_proj\.0\.", "adapter_dense."),
                 (r"^report_gen\.bart_proj\.1\.", "adapter_norm."),
                 (r"^fusion\.(cross_attn|self_attn)\.out_proj\.", r"fusion.\1.out."),
                 (r"^fusion\.ffn\.0\.", "fusion.ffn_in."),
                 (r"^fusion\.ffn\.3\.", "fusion.ffn_out."),
                 (r"^fusion\.gate\.0\.", "fusion.gate."))
_IN_PROJ = re.compile(r"^(fusion\.(?:cross_attn|self_attn))\.in_proj_(weight|bias)$")
_CLASSIFIER = re.compile(r"^classifier\.(\d+)\.")


def public_head_state_dict(state_dict: Mapping[str, np.ndarray], num_hidden: int) -> dict[str, np.ndarray]:
  """The public code's keys of the layers around the backbones (``report_gen.image_encoder.proj``,
  ``report_gen.bart_proj.{0,1}``, ``fusion.*``, ``classifier.*``; §10.4) → this port's keys, in the naming rule of
  ``rrg_jax.convert``: ``image_proj``, ``adapter_dense``, ``adapter_norm``; ``fusion.{cross,self}_attn.in_proj_*``
  (3D, D) / (3D,) split into thirds ``query | key | value``, ``out_proj`` → ``out``, ``ffn.0`` / ``ffn.3`` →
  ``ffn_in`` / ``ffn_out``, ``gate.0`` → ``gate``; ``classifier.{4i}`` / ``{4i+1}`` → ``dense_i`` / ``norm_i``,
  ``classifier.{4·num_hidden}`` → ``out`` (any other index is kept, so that it is reported as unexpected). Keys
  with other prefixes pass unchanged."""
  classifier = {4 * i: f"dense_{i}" for i in range(num_hidden)}
  classifier.update({4 * i + 1: f"norm_{i}" for i in range(num_hidden)})
  classifier[4 * num_hidden] = "out"
  out = {}
  for key, value in state_dict.items():
    packed = _IN_PROJ.match(key)
    if packed:
      for name, part in zip(("query", "key", "value"), np.split(np.asarray(value), 3)):
        out[f"{packed.group(1)}.{name}.{packed.group(2)}"] = part
      continue
    for pattern, repl in _HEAD_RENAMES:
      key = re.sub(pattern, repl, key)
    key = _CLASSIFIER.sub(lambda m: f"classifier.{classifier.get(int(m.group(1)), m.group(1))}.", key)
    out[key] = value
  return out


def _public_swin(state_dict: Mapping[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
  """The Swin entries, prefix stripped: ``report_gen.swin.*`` and its copy ``report_gen.image_encoder.backbone.*``
  (either or both; both must hold the same keys and values, else ConversionError naming the differences)."""
  copies = [{k[len(p):]: v for k, v in state_dict.items() if k.startswith(p)} for p in SWIN_PREFIXES]
  first, second = copies
  if first and second:
    differ = sorted(set(first) ^ set(second)) + sorted(
        k for k in set(first) & set(second) if np.shape(first[k]) != np.shape(second[k])
        or not np.array_equal(np.asarray(first[k]), np.asarray(second[k])))
    if differ:
      raise ConversionError(f"{source}: {SWIN_PREFIXES[0]}* and {SWIN_PREFIXES[1]}* (one module registered twice) "
                            f"differ in {len(differ)} entries: " + ", ".join(differ[:5]))
  return first or second


# model.pretrained part → (its config.model key, its config class)
PRETRAINED = {"image_encoder": ("swin", SwinConfig), "decoder": ("bart", BartConfig),
              "text_encoder": ("bert", BertConfig)}


def _widths_from_pretrained(m: ml_collections.ConfigDict) -> None:
  """``model.{swin, bart, bert}`` from the ``config.json`` of each given ``model.pretrained`` folder (§10), so the
  modules are built as the weights were (vocabulary sizes and pad ids are the tokenizers', set afterwards)."""
  from rrg_jax import hf_weights  # pylint: disable=g-import-not-at-top

  for part, folder in m.get("pretrained", {}).items():
    if folder:
      key, cls = PRETRAINED[part]
      hf = dataclasses.asdict(cls.from_hf_config(hf_weights.read_config(folder)))
      m[key] = ml_collections.ConfigDict({k: hf[k] for k in m[key]})


def _hf_tokenizers(config: ml_collections.ConfigDict) -> tuple[Any, Any]:
  """The hf backend's tokenizers (§2.3): the decoder's BART BPE (``data.report_tokenizer``) and the text encoder's
  BERT WordPiece (``data.text_tokenizer``), from local files."""
  from input_pipeline import subword  # pylint: disable=g-import-not-at-top

  report = subword.load_tokenizer(config.data.report_tokenizer)
  if not isinstance(report, subword.SubwordTokenizer) or report.family != "bart":
    raise ValueError(f"config.data.report_tokenizer={config.data.report_tokenizer!r} is not a BART BPE tokenizer "
                     "(RadGen's decoder is BART).")
  if not config.data.get("text_tokenizer"):
    raise ValueError("config.data.report_tokenizer is set (hf backend): config.data.text_tokenizer must name the "
                     "text encoder's BERT WordPiece tokenizer folder (e.g. Bio_ClinicalBERT's vocab.txt).")
  text = subword.SubwordTokenizer.load(config.data.text_tokenizer)
  if text.family != "bert" or None in (text.cls_id, text.sep_id, text.pad_id):
    raise ValueError(f"config.data.text_tokenizer={config.data.text_tokenizer!r}: not a BERT WordPiece tokenizer "
                     "with [CLS], [SEP] and [PAD].")
  return report, text


def _class_weights(config: ml_collections.ConfigDict) -> np.ndarray:
  """``model.class_weights``: C numbers, or "auto" = max_k n_k / n_c over the train split's class counts (§4)."""
  w = config.model.class_weights
  if isinstance(w, str):
    if w != "auto":
      raise ValueError(f"config.model.class_weights={w!r}; give C numbers or 'auto'.")
    from input_pipeline import loader, sampling  # pylint: disable=g-import-not-at-top

    labels = [r.label for r in loader.load_records(config, "train")]
    counts = np.bincount(labels, minlength=int(config.model.num_classes))
    return np.asarray(sampling.class_weights_auto(counts), np.float32)
  w = np.asarray(w, np.float32)
  if w.shape != (int(config.model.num_classes),):
    raise ValueError(f"config.model.class_weights has {w.size} values, config.model.num_classes="
                     f"{config.model.num_classes}.")
  return w


@models.register("radgen")
class RadGenSystem(System):
  """RadGen (MICCAI 2024 outline): Swin → BART report; the generated report → BERT → gated fusion → class.

  On the system contract: a forward that first generates the report it classifies, the loss
  ``L_cls + λ·L_report`` (§4), beam-search reports with class probabilities."""
  module_class = RadGen
  forward_fields = ("images", "targets")
  report_outputs = ("probs",)
  torch_vocab_key = BART_EMBEDDING

  def __init__(self, config: ml_collections.ConfigDict):
    m = config.model
    _widths_from_pretrained(m)
    self.backend = "hf" if config.data.get("report_tokenizer") else "word"
    gen = config.train.generation
    self.retokenize = gen.get("retokenize", "text")
    if self.retokenize not in RETOKENIZE:
      raise ValueError(f"config.train.generation.retokenize={self.retokenize!r}; choose one of {RETOKENIZE}.")
    if self.retokenize == "wrong_vocab" and self.backend == "word":
      raise ValueError("config.train.generation.retokenize='wrong_vocab' (BART ids read as BERT ids, §3.6) needs the "
                       "hf backend: set config.data.report_tokenizer and config.data.text_tokenizer.")
    if self.backend == "hf":
      self.report_tokenizer, self.text_tokenizer = _hf_tokenizers(config)
      self.tokens = hf_report_tokens(self.report_tokenizer)
      m.bart.vocab_size, m.bart.pad_token_id = self.report_tokenizer.vocab_size, self.tokens.pad
      m.bert.vocab_size, m.bert.pad_token_id = self.text_tokenizer.vocab_size, self.text_tokenizer.pad_id
    else:
      self.tokens = WORD_TOKENS
      if int(m.vocab_size) > 0:  # one vocabulary + [CLS], [SEP] for the text encoder
        m.bart.vocab_size = int(m.vocab_size)
        m.bert.vocab_size = int(m.vocab_size) + 2
        m.bart.pad_token_id = 0
        m.bert.pad_token_id = 0
    super().__init__(config)
    self.class_weights = _class_weights(config)
    for where in ("train", "eval"):
      source = self._text_source(train=where == "train")
      if source not in TEXT_SOURCES:
        raise ValueError(f"config.{where}.text_source={source!r}; choose one of {TEXT_SOURCES}.")
    self.generator = self._report_generator()
    for where in ("train", "eval"):
      if (self.has_text and self._text_source(train=where == "train") == "generated" and not self.has_decoder
          and self.generator is None):
        raise ValueError(f"config.{where}.text_source='generated' needs the report decoder; config.model.arch="
                         f"{m.get('arch', 'radgen')!r} has none: use ground_truth, or name a trained RadGen in "
                         "config.model.report_generator (§9.1).")
    self._generate_tokens = jax.jit(self._beam_tokens, static_argnames=("num_beams", "deterministic"))

  def _report_generator(self) -> tuple[RadGenSystem, Any] | None:
    """A §9.1 text baseline's report source (``model.report_generator``: a trained RadGen's workdir or inference
    checkpoint): (its system, its variables), whose report tokenizer must be this run's; None when not set."""
    path = self.config.model.get("report_generator", "")
    if not path:
      return None
    if self.has_decoder:
      raise ValueError("config.model.report_generator is for the §9.1 text baselines; RadGen generates its own "
                       "reports.")
    from rrg_jax import checkpointing  # pylint: disable=g-import-not-at-top

    config, variables, tokenizer = checkpointing.load_inference(path)
    generator, variables = models.get_system(config), jax.device_put(variables)
    if not isinstance(generator, RadGenSystem) or not generator.has_decoder:
      raise ValueError(f"config.model.report_generator={path!r} is not a RadGen model with a report decoder.")
    same = (tokenizer == self.report_tokenizer if self.backend == "hf" else
            generator.backend == "word" and int(config.model.vocab_size) == int(self.config.model.vocab_size))
    if not same:
      raise ValueError(f"config.model.report_generator={path!r}: its report tokenizer is not this run's "
                       "(config.data.report_tokenizer / the word vocabulary); the text encoder would misread its "
                       "reports.")
    return generator, variables

  @property
  def has_decoder(self) -> bool:
    """The model generates reports (RadGen with its report branch)."""
    return getattr(self.module, "bart", None) is not None

  @property
  def has_text(self) -> bool:
    """The model reads a report through its text encoder."""
    return self.module.bert is not None

  def _text_source(self, *, train: bool) -> str:
    """``generated`` (the model's own report, §3.6) or ``ground_truth`` (the record's report): what the text
    encoder reads in training (``train.text_source``) or evaluation (``eval.text_source``)."""
    return (self.config.train if train else self.config.eval).get("text_source", "generated")

  @property
  def decoder_length(self) -> int:
    """T': the decoder's positions (word: ``data.max_seq_length`` − 1, the targets carrying the start token; hf:
    ``data.max_seq_length``, the start token prepended by ``shift_right``)."""
    t = int(self.config.data.max_seq_length)
    return t if self.backend == "hf" else t - 1

  # --- data ------------------------------------------------------------------------------------------------

  def batch_fields(self, train: bool = True) -> dict[str, Field]:
    """images (1, S, S, 3), targets / masks (T,), labels () int32 (the class id), sample_weight () (0 on padding
    rows); hf backend with a text branch, training: text_ids / text_mask (T_t,) int32 (``round_trip``)."""
    d = self.config.data
    s, t = int(d.image_size), int(d.max_seq_length)
    fields = {"images": Field((1, s, s, 3), jnp.float32), "targets": Field((t,), jnp.int32),
              "masks": Field((t,), jnp.float32), "labels": Field((), jnp.int32),
              "sample_weight": Field((), jnp.float32)}
    if train and self.round_trip_fields:
      fields.update({k: Field((self.text_length,), jnp.int32) for k in self.round_trip_fields})
    return fields

  @property
  def round_trip_fields(self) -> tuple[str, ...]:
    """hf backend, or a text baseline reading another model's reports: the text encoder's ids."""
    uses = self.has_text and (self.backend == "hf" or self.generator is not None)
    return ("text_ids", "text_mask") if uses else ()

  def round_trip(self, variables: Mapping[str, Any], batch: Mapping[str, jax.Array],
                 key: jax.Array | None = None) -> dict[str, np.ndarray]:
    """hf backend, training (§3.6): the report each study's text encoder reads — generated with the current
    parameters (``train.generation``; ``key`` draws its dropout when not deterministic), or the ground truth — as
    this process's ``text_ids`` / ``text_mask`` rows (``host_text_ids``)."""
    if self._text_source(train=True) == "ground_truth":
      tokens = batch["targets"]
    elif self.generator is not None:
      tokens = self._generated_by_generator(batch["images"])
    else:
      g = self.config.train.generation
      tokens = self._generate_tokens(variables, batch["images"], key, num_beams=int(g.num_beams),
                                     deterministic=bool(g.deterministic))
    rows = sharding.local_rows(tokens)
    if self.backend == "word":
      ids, mask = (np.asarray(x) for x in self._text(jnp.asarray(rows)))
    else:
      ids, mask, _ = self.host_text_ids(rows)
    return {"text_ids": ids, "text_mask": mask}

  def _generated_by_generator(self, images: jax.Array) -> jax.Array:
    """The §9.1 baselines' ``generated`` text: the reports of ``model.report_generator`` (its eval-mode beam search,
    its ``decode.beam_size``) with the start token first, (B, T')."""
    generator, variables = self.generator
    return generator._generate_tokens(variables, images, None, num_beams=int(generator.config.decode.beam_size),  # pylint: disable=protected-access
                                      deterministic=True)

  def host_text_ids(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """hf backend: decoder token rows (B, L) → text-encoder ``ids``, ``mask`` (B, T_t) int32 (``[CLS] wordpieces
    [SEP]``, truncated keeping the specials, padded) and, for ``retokenize = text``, ``words`` (B, T_t) int32: the
    index of the whitespace word of the decoded report each text token falls in (−1 for specials and padding; for
    the report-attention picture). ``text``: the report decoded with the decoder's tokenizer; ``wrong_vocab``:
    the BART ids decoded with the BERT tokenizer (ids ≥ its vocabulary and its specials vanish, the rest become
    unrelated word pieces), as the public code does (§3.6) — ``words`` is then None."""
    n = self.text_length
    ids = np.full((len(tokens), n), self.text_tokenizer.pad_id, np.int32)
    mask = np.zeros((len(tokens), n), np.int32)
    words = np.full((len(tokens), n), -1, np.int32)
    for b, row in enumerate(np.asarray(tokens).tolist()):
      decoder = self.report_tokenizer if self.retokenize == "text" else self.text_tokenizer
      text = decoder.decode(row)
      row_ids, offsets = self.text_tokenizer.encode_offsets(text, max_length=n)
      ids[b, :len(row_ids)], mask[b, :len(row_ids)] = row_ids, 1
      words[b, :len(row_ids)] = word_spans(text, offsets)
    return ids, mask, words if self.retokenize == "text" else None

  # --- model -----------------------------------------------------------------------------------------------

  @property
  def text_length(self) -> int:
    return int(self.config.data.text_max_tokens)

  def _init(self, key: jax.Array) -> dict[str, Any]:
    x = self.dummy_batch(1)
    ids = jnp.zeros((1, self.text_length), jnp.int32)
    params_key, dropout_key = jax.random.split(key)
    variables = self.module.init({"params": params_key, "dropout": dropout_key}, x["images"],
                                 jnp.zeros((1, self.decoder_length), jnp.int32), ids, jnp.ones_like(ids),
                                 train=False)
    return {"params": variables["params"], "batch_stats": variables.get(NON_TRAINABLE, {})}

  def _beam(self, variables: Any, memory: jax.Array, num_beams: int, key: jax.Array | None = None
            ) -> decoding.HFDecoded:
    """HF-semantics beam search (§3.5; word backend: start = BOS, forced EOS at the last step, no forced BOS);
    with ``key``, the decoder's dropout is on (a fresh draw per step: ``train.generation.deterministic = False``)."""
    d = self.config.decode

    def step(cache, tokens):
      if key is None:
        return self.module.apply(variables, cache, tokens, method="decode_step")
      rng = jax.random.fold_in(key, jnp.max(cache["index"]))
      return self.module.apply(variables, cache, tokens, False, method="decode_step", rngs={"dropout": rng})

    cache = self.module.apply(variables, memory, self.decoder_length, method="init_cache")
    r = self.tokens
    return decoding.hf_beam_search(
        step, cache, memory.shape[0], num_beams=num_beams, max_length=self.decoder_length, eos_token_id=r.eos,
        pad_token_id=r.pad, start_token_id=r.start, length_penalty=float(d.length_penalty), early_stopping=True,
        no_repeat_ngram_size=int(d.no_repeat_ngram_size), forced_bos_token_id=r.forced_bos,
        forced_eos_token_id=r.eos)

  def _beam_tokens(self, variables: Any, images: jax.Array, key: jax.Array | None, *, num_beams: int,
                   deterministic: bool) -> jax.Array:
    """The training generation (§3.6): images → beam-search tokens (B, T') with the given parameters, no
    gradient; eval mode, or (``deterministic`` False, the public code) dropout and drop path on — its own Swin pass
    and per-step decoder draws from ``key``."""
    frozen = jax.lax.stop_gradient(variables)
    if deterministic:
      memory = self.module.apply(frozen, images, method="encode")["memory"]
      return self._beam(frozen, memory, num_beams).tokens
    encode_key, decode_key = jax.random.split(key)
    memory = self.module.apply(frozen, images, deterministic=False, method="encode",
                               rngs={"dropout": encode_key})["memory"]
    return self._beam(frozen, memory, num_beams, decode_key).tokens

  def _text(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    k = int(self.config.model.vocab_size)
    return text_encoder_ids(tokens, k, k + 1, self.text_length)

  def report_io(self, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(decoder inputs (B, T'), the ids they predict (B, T'), their mask (B, T')): word — ``targets[:, :-1]``,
    ``targets[:, 1:]``, ``masks[:, 1:]``; hf — ``shift_right(targets)``, ``targets``, ``masks`` (§2.3)."""
    targets, masks = batch["targets"], batch["masks"]
    if self.backend == "hf":
      return shift_right(targets, self.tokens.start), targets, masks
    return targets[:, :-1], targets[:, 1:], masks[:, 1:]

  def forward(self, variables: Mapping[str, Any], batch: Mapping[str, Any], *, train: bool,
              rngs: Mapping[str, jax.Array] | None = None, mutable: Any = False):
    """The training forward over the text the text encoder reads (``train.text_source``): each study's report
    generated with the current parameters (no gradient, §3.6; deterministic unless ``train.generation.
    deterministic`` is False, then with its own dropout draws), or its ground-truth report. hf backend: that text
    is already in the batch (``round_trip``)."""
    images = batch["images"]
    ids = mask = None
    if self.round_trip_fields:
      ids, mask = batch["text_ids"], batch["text_mask"]
    elif self.has_text and self._text_source(train=True) == "ground_truth":
      ids, mask = self._text(batch["targets"])
    elif self.has_text:
      g = self.config.train.generation
      key = None if bool(g.deterministic) else jax.random.fold_in(rngs["dropout"], 1)
      ids, mask = self._text(self._beam_tokens(variables, images, key, num_beams=int(g.num_beams),
                                               deterministic=bool(g.deterministic)))
    decoder_inputs = self.report_io(batch)[0]
    return self.module.apply(variables, images, decoder_inputs, ids, mask, train=train, rngs=rngs,
                             mutable=mutable)

  def loss(self, outputs: Mapping[str, jax.Array], batch: Mapping[str, Any]
           ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``L_cls + λ L_report`` (§4): class-weighted CE over the real rows; token CE of the decoder's targets over the
    counted positions (``model.report_ignore_pad``: the real tokens, BOS-less targets incl. EOS (word) / the
    labels ``<s> … </s>`` (hf); else every position of every real row)."""
    m = self.config.model
    weight = batch["sample_weight"]
    cls = losses.weighted_cross_entropy(outputs["class_logits"], batch["labels"], self.class_weights, weight)
    parts = {"cls": cls}
    total = cls
    if "report_logits" in outputs:
      _, labels, real = self.report_io(batch)
      counted = real if bool(m.report_ignore_pad) else jnp.ones_like(real)
      report = losses.token_cross_entropy(outputs["report_logits"], labels, counted * weight[:, None])
      parts["report"] = report
      total = total + float(m.report_weight) * report
    return total, parts

  def load_pretrained(self, variables: dict[str, Any]) -> dict[str, Any]:
    """A fresh run's start (§10): the weights of each given ``model.pretrained.{image_encoder, decoder,
    text_encoder}`` folder (HF Swin / BART / BERT, safetensors or pytorch_model.bin; BERT's pooler dropped) in
    place of the random init. A part the model lacks, or weights of other shapes (e.g. a vocabulary other than the
    tokenizer's), is an error naming the folder."""
    variables = super().load_pretrained(variables)
    folders = {k: v for k, v in self.config.model.get("pretrained", {}).items() if v}
    if not folders:
      return variables
    params, stats = dict(variables["params"]), dict(variables["batch_stats"])
    for part, folder in folders.items():
      if part not in params:
        raise ValueError(f"config.model.pretrained.{part}={folder!r}: this model ({self.config.model.get('arch')}) "
                         f"has no {part}.")
      if part == "image_encoder":
        new = {"params": hf_weights.load_swin(folder, add_pooling_layer=False)[1]["params"]}
      elif part == "decoder":
        loaded = hf_weights.load_bart(folder)[1]
        new = {"params": loaded["params"], "batch_stats": loaded["constants"]}
      else:
        new = {"params": {k: v for k, v in hf_weights.load_bert(folder)[1]["params"].items() if k != "pooler"}}
      old = {"params": params[part], **({"batch_stats": stats[part]} if "batch_stats" in new else {})}
      differ = [f"{'/'.join(map(str, path))}: {np.shape(a)} vs {np.shape(b)}" for path, a, b in _leaf_pairs(old, new)
                if np.shape(a) != np.shape(b)]
      if differ or jax.tree.structure(old) != jax.tree.structure(new):
        raise ConversionError(f"{folder}: its {part} weights do not fit config.model ({len(differ)} shapes differ: "
                              + ", ".join(differ[:4]) + "); check the tokenizer's vocabulary and the widths.")
      params[part] = new["params"]
      if "batch_stats" in new:
        stats[part] = new["batch_stats"]
    return {"params": params, "batch_stats": stats}

  # --- checkpoint conversion (§10.4) -------------------------------------------------------------------------

  @classmethod
  def complete_config_from_torch(cls, config: ml_collections.ConfigDict, state_dict: Mapping[str, np.ndarray],
                                 source: str) -> None:
    """``model.bart.vocab_size`` / ``model.bert.vocab_size`` from the public code's embedding tables
    (``report_gen.bart.model.shared.weight``, ``clinical_bert.embeddings.word_embeddings.weight``). The word
    backend (no ``data.report_tokenizer``) needs text vocabulary = decoder vocabulary + 2; the public code's BPE /
    WordPiece pair (50265 / 28996) needs the hf backend: ConversionError saying so."""
    m = config.model
    if not m.get("report_branch", True):
      return
    sizes = {}
    for what, key in (("bart", BART_EMBEDDING), ("bert", BERT_EMBEDDING)):
      if key not in state_dict:
        raise ConversionError(f"{source} has no {key!r}: not a RadGen (public code) state_dict.")
      sizes[what] = int(np.shape(state_dict[key])[0])
    if not config.data.get("report_tokenizer") and sizes["bert"] != sizes["bart"] + 2:
      raise ConversionError(f"{source}: decoder vocabulary {sizes['bart']}, text-encoder vocabulary {sizes['bert']}: "
                            "not the word backend's (text = decoder + [CLS], [SEP]); the public code's BART BPE + "
                            "ClinicalBERT WordPiece checkpoint needs the hf tokenizer backend: pass "
                            "--config.data.report_tokenizer=BART_DIR --config.data.text_tokenizer=BERT_DIR.")
    m.bart.vocab_size, m.bert.vocab_size = sizes["bart"], sizes["bert"]

  def torch_to_variables(self, state_dict: Mapping[str, np.ndarray], source: str) -> dict[str, Any]:
    """The public code's ``model_state_dict`` (§10.4; or its gradients, same names) → ``{"params",
    "batch_stats"}``: ``report_gen.swin.*`` (= ``report_gen.image_encoder.backbone.*``; either spelling of
    ``hf_weights.swin_variables``) → ``image_encoder``, ``report_gen.bart.*`` → ``decoder`` (its
    ``final_logits_bias`` → ``batch_stats``; zeros when absent), ``clinical_bert.*`` (pooler ignored) →
    ``text_encoder``, the rest through ``public_head_state_dict``. One ConversionError lists every missing,
    unexpected and mis-shaped key of every part."""
    if not isinstance(self.module, RadGen):
      raise ConversionError(f"{source}: only RadGen's own layout converts (config.model.arch="
                            f"{self.config.model.arch!r} is a §9.1 baseline).")
    errors: list[str] = []

    def part(what: str, read) -> dict[str, Any]:
      """``read(source)``, its ConversionError collected."""
      try:
        return read(f"{source} [{what}]")
      except ConversionError as e:
        errors.append(str(e))
        return {}

    def under(prefix: str) -> dict[str, np.ndarray]:
      return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}

    head = {k: v for k, v in state_dict.items() if not k.startswith(SWIN_PREFIXES + (BART_PREFIX, BERT_PREFIX))}
    head_expected = {"params": {k: v for k, v in self.abstract_variables()["params"].items()
                                if k not in ("image_encoder", "decoder", "text_encoder")}}
    params = dict(part("image_proj, adapter, fusion, classifier", lambda src: convert.state_dict_to_variables(
        public_head_state_dict(head, len(self.module.classifier_hidden)), head_expected, src)).get("params", {}))
    params["image_encoder"] = part(f"{SWIN_PREFIXES[0]}*", lambda src: hf_weights.swin_variables(
        _public_swin(state_dict, src), SwinModel(self.module.swin, add_pooling_layer=False), src)).get("params")
    stats = {}
    if self.has_decoder:
      bart = part(f"{BART_PREFIX}*", lambda src: hf_weights.bart_variables(
          under(BART_PREFIX), BartForConditionalGeneration(self.module.bart), src))
      params["decoder"] = bart.get("params")
      bert = {k: v for k, v in under(BERT_PREFIX).items() if not k.startswith("pooler.")}  # unused (§3.7)
      params["text_encoder"] = part(f"{BERT_PREFIX}*", lambda src: hf_weights.bert_variables(
          bert, BertModel(self.module.bert, add_pooling_layer=False), src)).get("params")
      stats = {"decoder": bart.get("constants")}
    else:
      extra = sorted(k for k in state_dict if k.startswith((BART_PREFIX, BERT_PREFIX)))
      if extra:
        errors.append(f"{source}: {len(extra)} unexpected (config.model.report_branch is False): "
                      + ", ".join(extra[:5]) + (", …" if len(extra) > 5 else ""))
    if errors:
      raise ConversionError("\n".join(errors))
    return {"params": params, "batch_stats": stats}

  # --- decoding --------------------------------------------------------------------------------------------

  def generate(self, variables: Any, batch: Mapping[str, jax.Array], *, with_attention: bool = False
               ) -> dict[str, jax.Array]:
    """Eval mode (§8): image → beam-search report → text encoder → fusion → class probabilities. ``tokens``
    (B, T') are the generated ids after the start token, then EOS / padding (word: 0s; hf: ``</s>``, ``<pad>``s;
    T' the decoder length; a text baseline with ``model.report_generator``: that model's report);
    ``probs`` (B, C); with ``with_attention``, ``report_attention`` (B, T'): the fusion's
    cross-attention (head mean) on each whitespace word of the decoded report (hf: summed over its word pieces;
    absent with ``retokenize = wrong_vocab``, whose text is not the report)."""
    enc = self.module.apply(variables, batch["images"], method="encode")
    b = batch["images"].shape[0]
    source = self._text_source(train=False)
    generated = None
    scores, steps = jnp.zeros((b,)), jnp.zeros((), jnp.int32)
    if self.has_decoder:
      decoded = self._beam(variables, enc["memory"], int(self.config.decode.beam_size))
      generated, scores, steps = decoded.tokens, decoded.scores, decoded.steps
    elif self.generator is not None and source == "generated":  # a §9.1 baseline reading a RadGen's reports
      generated = self._generated_by_generator(batch["images"])
    if generated is None:
      tokens = jnp.zeros((b, self.decoder_length), jnp.int32)
    else:
      tokens = jnp.pad(generated[:, 1:], ((0, 0), (0, 1)), constant_values=self.tokens.pad)
    read = generated if generated is not None and source == "generated" else batch.get("targets")
    ids = mask = words = None
    if self.has_text and self.backend == "hf":
      host_ids, host_mask, host_words = self.host_text_ids(sharding.local_rows(jnp.asarray(read)))
      ids, mask = _place_rows(host_ids, tokens), _place_rows(host_mask, tokens)
      words = None if host_words is None else _place_rows(host_words, tokens)
    elif self.has_text:
      ids, mask = self._text(read)
    out = self.module.apply(variables, enc.get("z_img"), ids, mask, method="classify")
    result = {"tokens": tokens, "scores": scores, "steps": steps,
              "probs": jax.nn.softmax(out["class_logits"], axis=-1)}
    if with_attention and "text_attention" in out and (self.backend == "word" or words is not None):
      att = jnp.mean(out["text_attention"][:, :, 0], axis=1)  # (B, T_t)
      n = tokens.shape[1]
      if self.backend == "word":  # [CLS] w1..wn [SEP]: word i sits at text position i + 1
        att = att[:, 1:1 + n]
        result["report_attention"] = jnp.pad(att, ((0, 0), (0, n - att.shape[1])))
      else:
        result["report_attention"] = jnp.einsum("bt,btw->bw", att, jax.nn.one_hot(words, n, dtype=att.dtype))
    return result
