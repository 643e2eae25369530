"""The system contract: what a registered report-generation system declares; all that ``train``, ``evaluate``,
``generate`` and ``convert`` read.

A system is a ``System`` subclass registered under its ``config.model.name`` (``models.register``) with a config
file ``configs/<name>.py`` (``get_config(preset)``). ``System(config)`` builds ``module_class.from_config(
config.model)``; a subclass's ``__init__`` may first fill derived keys of ``config`` in place (e.g. a text
encoder's vocabulary size read from its tokenizer file) — ``train`` writes the config after building the system. What a new system implements — everything else has a default here:

=========================  ================================================================================
``module_class``           the Flax module; ``__call__(**forward_fields, train=...)`` is the training forward
``forward_fields``         the batch fields the training forward takes, as keyword arguments of those names
``loss(outputs, batch)``   → ``(total, {part: scalar})``, float32 (outputs are cast to float32 before)
``batch_fields(train)``    name → ``Field(shape, dtype)`` of the fields that enter the jitted step, for training
                           (``train=True``) or evaluation batches (default: the image-report batch of
                           ``input_pipeline.loader``); every other batch key is host-only
``round_trip_fields``,     batch fields that depend on the current parameters through host code (e.g. a report
``round_trip(...)``        generated on device, re-tokenised on the host): the train loop runs ``round_trip``
                           between two compiled programs and adds its fields to the batch (default: none)
``after_stage(workdir)``   a staged run's hand-over to the next stage (config values, e.g. thresholds)
``decode_reports(...)``    token outputs → report texts (generated, reference); default: the tokenizer's decode
``generate(...)``          decoding (``EncoderDecoderSystem``: ``module.encode(*encode_fields)`` → cache → step
                           beam search) and the report extras (``report_outputs``: e.g. class probabilities, VDM)
``torch_vocab_key``,       the checkpoint converter: the key whose first dimension is the vocabulary, regex
``torch_key_renames``,     renames from the original state_dict to the Flax naming rule of ``rrg_jax.convert``,
``torch_dropped_keys``     regexes of original keys with no counterpart (dead modules)
``pretrained_backbone_``   the torchvision backbone kind that ``config.model.pretrained_backbone`` names
``kind``, ``_at``          (``load_pretrained``; nothing is downloaded) and where it sits in the parameter tree
=========================  ================================================================================

Configuration, not code, decides the rest for every system: parameter groups, learning rates, schedules and
frozen epochs (``config.optim``, ``rrg_jax.optim``), staged initialisation (``config.train.init_from``), the
evaluators (``config.eval.evaluators``, ``rrg_jax.evaluators``) and the model-selection score
(``config.train.selection``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np


@dataclasses.dataclass(frozen=True)
class Field:
  """One batch field that enters the jitted step: per-example ``shape`` (the batch dimension excluded), ``dtype``."""
  shape: tuple[int, ...]
  dtype: Any


class BatchFieldError(KeyError):
  """A batch lacks a field the system declares, or has it with the wrong shape or dtype."""

  def __str__(self) -> str:
    return str(self.args[0])


def module_kwargs(module_cls: type, model_config: Mapping[str, Any]) -> dict[str, Any]:
  """The ``config.model`` entries that are fields of the Flax module ``module_cls`` (lists become tuples: JSON
  configs read back from checkpoints have lists); other keys (``name``, ``pretrained_backbone``, ...) are not."""
  fields = {f.name for f in dataclasses.fields(module_cls)} - {"parent", "name"}
  return {k: tuple(v) if isinstance(v, list) else v for k, v in model_config.items() if k in fields}


class System:
  """Base of every registered system; see the module docstring for the contract."""
  name: ClassVar[str] = ""                       # set by ``models.register``
  module_class: ClassVar[type]
  forward_fields: ClassVar[tuple[str, ...]] = ("images", "targets")
  report_outputs: ClassVar[tuple[str, ...]] = ()
  torch_vocab_key: ClassVar[str] = ""
  torch_key_renames: ClassVar[tuple[tuple[str, str], ...]] = ()
  torch_dropped_keys: ClassVar[tuple[str, ...]] = ()
  pretrained_backbone_kind: ClassVar[str] = ""   # convert.BACKBONE_KINDS: "densenet" | "resnet"
  pretrained_backbone_at: ClassVar[tuple[str, ...]] = ("visual_extractor", "model")  # its parameter path

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.module = self.module_class.from_config(config.model)

  # --- data ---------------------------------------------------------------------------------------------------

  def batch_fields(self, train: bool = True) -> dict[str, Field]:
    """The image-report batch of ``input_pipeline.loader``: images (V, S, S, 3), targets / masks (T,). ``train``:
    the fields of training batches (True) or of evaluation batches (False; training-only features absent)."""
    del train
    d = self.config.data
    s, t = int(d.image_size), int(d.max_seq_length)
    return {"images": Field((int(d.num_views), s, s, 3), jnp.float32), "targets": Field((t,), jnp.int32),
            "masks": Field((t,), jnp.float32)}

  def dummy_batch(self, batch_size: int = 1) -> dict[str, jax.Array]:
    """Zeros of every declared field, batch ``batch_size`` (what ``init`` traces)."""
    return {k: jnp.zeros((batch_size,) + f.shape, f.dtype) for k, f in self.batch_fields().items()}

  def random_batch(self, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A random host batch of every declared training field (benchmarks, tests): reports of random length
    4..T (BOS and EOS = 0 at their ends, random ids between, zero-padded) with their ``masks``; ``images`` N(0, 1);
    ``labels`` (when declared) ~30% positive with class 0 always positive (every example has a finding), or a uniform
    class id when declared per example as a scalar; ``sample_weight`` (when declared) 1; any
    other float field N(0, 1), any other field 0 or 1 (valid for every vocabulary, mask and flag)."""
    rng = np.random.default_rng(seed)
    fields = self.batch_fields()
    t = fields["targets"].shape[0]
    lengths = rng.integers(4, t + 1, size=batch_size)
    targets = rng.integers(1, int(self.config.model.vocab_size), size=(batch_size, t)).astype(np.int32)
    masks = (np.arange(t)[None] < lengths[:, None]).astype(np.float32)
    targets[:, 0] = 0
    targets[np.arange(batch_size), lengths - 1] = 0
    batch = {"targets": np.where(masks > 0, targets, 0).astype(np.int32), "masks": masks,
             "images": rng.normal(size=(batch_size,) + fields["images"].shape).astype(np.float32)}
    if "labels" in fields and fields["labels"].shape:  # multi-hot findings
      labels = (rng.random((batch_size,) + fields["labels"].shape) < 0.3).astype(np.float32)
      labels[:, 0] = 1.0
      batch["labels"] = labels
    elif "labels" in fields:  # one class id per example
      batch["labels"] = rng.integers(0, int(self.config.model.num_classes), batch_size).astype(np.int32)
    if "sample_weight" in fields:  # every row real
      batch["sample_weight"] = np.ones((batch_size,), np.float32)
    for name, field in fields.items():
      if name in batch:
        continue
      shape = (batch_size,) + field.shape
      if np.issubdtype(np.dtype(field.dtype), np.floating):
        batch[name] = rng.normal(size=shape).astype(field.dtype)
      else:
        batch[name] = (rng.random(shape) < 0.7).astype(field.dtype)
    return {name: batch[name] for name in fields}

  def device_batch(self, batch: Mapping[str, Any], train: bool = True) -> dict[str, Any]:
    """The declared fields (``batch_fields(train)``) of a host batch (host-only keys such as ``ids`` dropped, and
    the ``round_trip_fields`` of training batches, which ``round_trip`` adds later), checked per field."""
    out = {}
    for name, field in self.batch_fields(train).items():
      if train and name in self.round_trip_fields:
        continue
      if name not in batch:
        raise BatchFieldError(f"the {self.name} batch lacks field {name!r} (it has {sorted(batch)}).")
      x = batch[name]
      if tuple(np.shape(x)[1:]) != field.shape:
        raise BatchFieldError(f"batch field {name!r} has per-example shape {tuple(np.shape(x)[1:])}, the {self.name} "
                              f"config expects {field.shape}.")
      out[name] = x
    return out

  @property
  def round_trip_fields(self) -> tuple[str, ...]:
    """The training batch fields that ``round_trip`` computes (declared in ``batch_fields``); none by default."""
    return ()

  def round_trip(self, variables: Mapping[str, Any], batch: Mapping[str, jax.Array],
                 key: jax.Array | None = None) -> dict[str, np.ndarray]:
    """The ``round_trip_fields`` of a global training ``batch`` under the current ``variables`` (compiled
    programs and host code; no gradient flows through them; ``key``: this step's random key for any draw): this
    process's rows as numpy arrays, which the train loop places with ``loader.to_global_batch`` and adds to the
    batch before the train step."""
    del variables, batch, key
    return {}

  # --- model --------------------------------------------------------------------------------------------------

  def init(self, key: jax.Array) -> dict[str, Any]:
    """``module.init`` on the dummy batch (train=False) → ``{'params', 'batch_stats'}``, as one jitted program
    (run eagerly, every layer's ops would compile one by one: 52 s instead of 19 s for the tiny Align2Gen)."""
    return jax.jit(self._init)(key)

  def _init(self, key: jax.Array) -> dict[str, Any]:
    x = self.dummy_batch(1)
    params_key, dropout_key = jax.random.split(key)
    variables = self.module.init({"params": params_key, "dropout": dropout_key},
                                 **{k: x[k] for k in self.forward_fields}, train=False)
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}

  def abstract_variables(self) -> dict[str, Any]:
    """Shapes and dtypes of ``init`` (no computation)."""
    return jax.eval_shape(self.init, jax.random.key(0))

  def forward(self, variables: Mapping[str, Any], batch: Mapping[str, Any], *, train: bool,
              rngs: Mapping[str, jax.Array] | None = None, mutable: Any = False):
    """The training forward ``module(**{k: batch[k] for k in forward_fields}, train=train)`` (Flax ``apply``
    semantics)."""
    return self.module.apply(variables, **{k: batch[k] for k in self.forward_fields}, train=train, rngs=rngs,
                             mutable=mutable)

  def loss(self, outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array]
           ) -> tuple[jax.Array, dict[str, jax.Array]]:
    raise NotImplementedError(f"{type(self).__name__}.loss")

  def load_pretrained(self, variables: dict[str, Any]) -> dict[str, Any]:
    """``variables`` with ``config.model.pretrained_backbone`` (a local torchvision file of kind
    ``pretrained_backbone_kind``) copied into the backbone at ``pretrained_backbone_at``; unchanged when either is
    empty."""
    from rrg_jax import convert  # pylint: disable=g-import-not-at-top

    path = self.config.model.get("pretrained_backbone", "")
    if not path or not self.pretrained_backbone_kind:
      return variables
    return convert.load_torchvision_backbone(path, variables, kind=self.pretrained_backbone_kind,
                                             at=self.pretrained_backbone_at)

  # --- decoding -----------------------------------------------------------------------------------------------

  def generate(self, variables: Any, batch: Mapping[str, jax.Array], *, with_attention: bool = False
               ) -> dict[str, jax.Array]:
    """Eval-mode reports for the device fields of ``batch`` → ``tokens`` (B, T) int32 (text =
    ``tokenizer.decode``), ``scores`` (B,), ``steps`` () and the ``report_outputs`` (per-report arrays)."""
    raise NotImplementedError(f"{type(self).__name__}.generate")

  def decode_reports(self, tokenizer: Any, outputs: Mapping[str, np.ndarray], batch: Mapping[str, np.ndarray]
                     ) -> tuple[list[str], list[str]]:
    """Host arrays of ``generate``'s ``outputs`` and of the batch → (generated reports, reference reports), one per
    row: ``tokenizer.decode`` of ``outputs["tokens"]`` and of ``batch["targets"][:, 1:]`` (the start token
    dropped; "" without targets, e.g. in ``generate``). A system whose reports are assembled from several decoded
    pieces (CT-AGRG) overrides it."""
    generated = tokenizer.decode_batch(np.asarray(outputs["tokens"]).tolist())
    if "targets" not in batch:
      return generated, [""] * len(generated)
    return generated, tokenizer.decode_batch(np.asarray(batch["targets"])[:, 1:].tolist())

  def after_stage(self, workdir: Any) -> dict[str, Any]:
    """Once this system's stage of a staged run (``eval.protocol = "stages"``) has finished in ``workdir``: config
    values (dotted key → value) that the later stages take, e.g. decision thresholds chosen on validation; none by
    default."""
    del workdir
    return {}

  # --- checkpoint conversion ----------------------------------------------------------------------------------

  def rename_torch_keys(self, state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The original state_dict without the ``torch_dropped_keys``, its keys rewritten by ``torch_key_renames``
    (regex, replacement), in order."""
    out = {}
    for key, value in state_dict.items():
      if any(re.search(p, key) for p in self.torch_dropped_keys):
        continue
      for pattern, repl in self.torch_key_renames:
        key = re.sub(pattern, repl, key)
      out[key] = value
    return out

  @classmethod
  def torch_vocab_size(cls, state_dict: Mapping[str, np.ndarray], source: str) -> int:
    """The output vocabulary size of an original state_dict (``ConversionError`` if it is not this system's)."""
    from rrg_jax import convert  # pylint: disable=g-import-not-at-top

    if cls.torch_vocab_key not in state_dict:
      raise convert.ConversionError(f"{source} has no {cls.torch_vocab_key!r}: not a {cls.name} state_dict.")
    return int(state_dict[cls.torch_vocab_key].shape[0])

  @classmethod
  def complete_config_from_torch(cls, config: ml_collections.ConfigDict, state_dict: Mapping[str, np.ndarray],
                                 source: str) -> None:
    """Fills, in place, the config keys an original state_dict determines beyond the output vocabulary
    (``convert`` calls it before building the system); none by default."""

  def torch_to_variables(self, state_dict: Mapping[str, np.ndarray], source: str) -> dict[str, Any]:
    """An original state_dict → this system's variables; one ``ConversionError`` lists every missing,
    unexpected and mis-shaped key."""
    from rrg_jax import convert  # pylint: disable=g-import-not-at-top

    return convert.state_dict_to_variables(self.rename_torch_keys(state_dict), self.abstract_variables(), source)


class EncoderDecoderSystem(System):
  """Systems whose module is an ``layers.encoder_decoder.EncoderDecoderModel`` (R2Gen's memory-driven transformer
  decoder): reports by ``decoding`` beam search / greedy over the module's encode → cache → step API.
  ``module.encode(*batch[encode_fields])`` gives the decoder memory (and its key mask, see ``EncoderDecoderModel``)."""
  torch_vocab_key: ClassVar[str] = "encoder_decoder.logit.weight"
  encode_fields: ClassVar[tuple[str, ...]] = ("images",)

  def word_attention_layer(self) -> int:
    """The decoder layer whose cross-attention the word heatmaps show (default: the last)."""
    return int(self.config.model.num_layers) - 1

  def generate(self, variables: Any, batch: Mapping[str, jax.Array], *, with_attention: bool = False
               ) -> dict[str, jax.Array]:
    """``decoding.encode_and_decode`` with ``config.decode`` (method, beam size, KV cache) up to
    ``config.data.max_seq_length`` tokens; ``with_attention`` adds ``word_attention`` (B, T, N')."""
    from rrg_jax import decoding  # pylint: disable=g-import-not-at-top

    d = self.config.decode
    if d.method not in decoding.METHODS:
      raise ValueError(f"config.decode.method={d.method!r}; choose one of {decoding.METHODS}.")
    return decoding.encode_and_decode(
        self.module, variables, tuple(batch[k] for k in self.encode_fields), method=str(d.method), beam_size=int(d.beam_size),
        max_len=int(self.config.data.max_seq_length), cached=bool(d.cached), extras=tuple(self.report_outputs),
        attention_layer=self.word_attention_layer() if with_attention else None)
