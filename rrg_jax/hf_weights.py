"""Reading a local Hugging Face model folder (``config.json`` + weights) into the Flax BERT / GPT-2 modules.

Nothing is ever downloaded: every function takes a path to a folder that already exists (the output of
``save_pretrained`` or a copy of a hub snapshot). Weights are read from ``model.safetensors`` (or a sharded
``model.safetensors.index.json``) with the ``safetensors`` library's numpy backend — no pickle involved — and only
when there is no safetensors file from ``pytorch_model.bin`` through ``rrg_jax.convert.load_state_dict``
(``torch.load(weights_only=True)``, which refuses pickles that would run code).

Key handling before ``convert.state_dict_to_variables`` (which lists every missing / unexpected / mis-shaped key
in one ConversionError):
  * BERT: the ``bert.`` prefix of ``BertForX`` checkpoints is stripped and their task heads (``cls.*``,
    ``classifier.*`` …) dropped; old ``LayerNorm.gamma``/``beta`` spellings renamed; ``position_ids`` /
    ``token_type_ids`` buffers dropped.
  * GPT-2: the ``transformer.`` prefix stripped; ``lm_head.weight`` dropped (the head is tied to ``wte``); the
    ``attn.bias`` / ``attn.masked_bias`` buffers (and RGRG's ``attn.causal_mask`` / ``attn.mask_out_value``)
    dropped. The Conv1D weights ``c_attn``/``c_proj``/``c_fc`` are stored (in, out) like the Flax kernel, so they
    are transposed here once, to cancel the converter's Linear (out, in) → (in, out) transpose.
  * Swin: the ``swin.`` prefix of ``SwinForX`` checkpoints stripped, ``classifier.*`` / ``decoder.*`` heads and the
    unused ``embeddings.mask_token`` dropped; transformers 5.x in-memory names (``attention.q_proj`` …, what
    ``torch.save(model.state_dict())`` writes) renamed to the on-disk ones; ``relative_position_index`` buffers
    checked against the recomputed index, then dropped.
  * BART: the ``model.`` prefix of ``BartForConditionalGeneration`` checkpoints stripped (``BartModel`` keys have
    none); the tied copies of the word embeddings (``shared.weight``, ``encoder.embed_tokens.weight``,
    ``decoder.embed_tokens.weight``, ``lm_head.weight`` — a saved file may hold any subset) loaded once as
    ``shared`` (they must be equal); the ``final_logits_bias`` buffer goes to the ``constants`` collection (zeros
    when absent, as HF); fairseq's ``encoder.version`` / ``decoder.version`` dropped.
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from rrg_jax import convert
from rrg_jax.convert import ConversionError
from rrg_jax.layers.bart import BartConfig, BartForConditionalGeneration
from rrg_jax.layers.bert import BertConfig, BertModel
from rrg_jax.layers.gpt2 import GPT2Config, GPT2LMHeadModel
from rrg_jax.layers.linear import Linear, torch_kernel_init
from rrg_jax.layers.swin import SwinConfig, SwinModel, relative_position_index

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_BIN = "pytorch_model.bin"

_BERT_BUFFERS = re.compile(r"(^|\.)(position_ids|token_type_ids)$")
_GPT2_BUFFERS = re.compile(r"(^|\.)attn\.(bias|masked_bias|causal_mask|mask_out_value)$")
_GPT2_CONV1D = re.compile(r"(^|\.)(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
_PSA_KEYS = re.compile(r"(^|\.)attn\.(uk|uv)\.(weight|bias)$")


def _folder(folder: str | pathlib.Path) -> pathlib.Path:
  path = pathlib.Path(folder)
  if not path.is_dir():
    raise ConversionError(f"{path}: no such model folder (a local Hugging Face folder is needed; nothing is "
                          "downloaded).")
  return path


def read_config(folder: str | pathlib.Path) -> dict[str, Any]:
  """``folder/config.json`` as a dict; ConversionError if the folder or file is missing or not a JSON object."""
  path = _folder(folder) / "config.json"
  if not path.is_file():
    raise ConversionError(f"{path}: no config.json in the model folder.")
  try:
    config = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ConversionError(f"{path} is not readable JSON: {e}") from e
  if not isinstance(config, dict):
    raise ConversionError(f"{path} holds a {type(config).__name__}, not a JSON object.")
  return config


def _read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
  from safetensors import SafetensorError
  from safetensors.numpy import load_file

  try:
    return load_file(str(path))
  except (SafetensorError, OSError, ValueError, TypeError) as e:
    raise ConversionError(f"{path} is not a readable safetensors file (truncated or corrupt?): "
                          f"{type(e).__name__}: {e}") from e


def read_state_dict(folder: str | pathlib.Path) -> dict[str, np.ndarray]:
  """All weights of the folder as numpy arrays, keyed as in the torch state_dict.

  Order of preference: ``model.safetensors``, the shards of ``model.safetensors.index.json``,
  ``pytorch_model.bin`` (torch weights_only). ConversionError when none exists or a file is unreadable.
  """
  path = _folder(folder)
  if (path / SAFETENSORS).is_file():
    return _read_safetensors(path / SAFETENSORS)
  if (path / SAFETENSORS_INDEX).is_file():
    try:
      weight_map = json.loads((path / SAFETENSORS_INDEX).read_text())["weight_map"]
      shards = sorted(set(weight_map.values()))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
      raise ConversionError(f"{path / SAFETENSORS_INDEX} is not a safetensors index (no 'weight_map'): {e}") from e
    out: dict[str, np.ndarray] = {}
    for shard in shards:
      if not (path / shard).is_file():
        raise ConversionError(f"{path / SAFETENSORS_INDEX} names the shard {shard}, which is missing.")
      out.update(_read_safetensors(path / shard))
    return out
  if (path / PYTORCH_BIN).is_file():
    return convert.load_state_dict(path / PYTORCH_BIN)
  raise ConversionError(f"{path}: no {SAFETENSORS}, {SAFETENSORS_INDEX} or {PYTORCH_BIN}.")


def _config(cls, config: Mapping[str, Any], folder) -> Any:
  try:
    return cls.from_hf_config(config)
  except (ValueError, TypeError) as e:
    raise ConversionError(f"{folder}/config.json: {e}") from e


# --- BERT -----------------------------------------------------------------------------------------------------

def _bert_renames(state_dict: Mapping[str, np.ndarray]) -> dict[str, tuple[str, np.ndarray]]:
  """new key → (checkpoint key, value)."""
  if any(k.startswith("bert.") for k in state_dict):
    state_dict = {k: v for k, v in state_dict.items() if k.startswith("bert.")}
  out = {}
  for original, value in state_dict.items():
    if _BERT_BUFFERS.search(original):
      continue
    key = original[len("bert."):] if original.startswith("bert.") else original
    key = re.sub(r"\.LayerNorm\.gamma$", ".LayerNorm.weight", key)
    key = re.sub(r"\.LayerNorm\.beta$", ".LayerNorm.bias", key)
    out[key] = (original, value)
  return out


def bert_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """HF BERT keys → ``BertModel`` keys: ``bert.`` stripped (task heads dropped), buffers dropped,
  ``LayerNorm.gamma``/``beta`` → ``weight``/``bias``."""
  return {k: v for k, (_, v) in _bert_renames(state_dict).items()}


def _convert(renamed: Mapping[str, tuple[str, np.ndarray]], expected: Mapping[str, Any], source: str,
             original: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """``convert.state_dict_to_variables`` on the renamed keys; its error message names the checkpoint's own keys
  and shapes (before prefix stripping / Conv1D transposition)."""
  try:
    return convert.state_dict_to_variables({k: v for k, (_, v) in renamed.items()}, expected, source)
  except ConversionError as e:
    lines = []
    for line in str(e).splitlines():
      key = line.strip().split(" ", 1)[0]
      if line.startswith("    ") and key in renamed:
        orig_key, value = renamed[key]
        rest = line[4 + len(key):]
        new_shape, orig_shape = str(tuple(np.shape(value))), str(tuple(np.shape(original[orig_key])))
        if rest.startswith(" " + new_shape):
          rest = " " + orig_shape + rest[1 + len(new_shape):]
        line = "    " + orig_key + rest
      lines.append(line)
    raise ConversionError("\n".join(lines)) from None


def bert_expected(module: BertModel) -> dict[str, Any]:
  """Shapes/dtypes of ``module.init`` (no computation)."""
  ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  return jax.eval_shape(lambda i: module.init(jax.random.key(0), i), ids)


def bert_variables(state_dict: Mapping[str, np.ndarray], module: BertModel, source: str = "state_dict"
                   ) -> dict[str, Any]:
  """An HF BERT state_dict (numpy) → ``{"params": ...}`` for ``module``."""
  variables = _convert(_bert_renames(state_dict), bert_expected(module), source, state_dict)
  return {"params": variables["params"]}


def load_bert(folder: str | pathlib.Path, *, add_pooling_layer: bool | None = None, dtype: Any = jnp.float32
              ) -> tuple[BertModel, dict[str, Any]]:
  """Local HF BERT folder → (``BertModel``, variables). ``add_pooling_layer`` None: a pooler iff the weights have
  ``pooler.dense.weight``."""
  config = read_config(folder)
  state_dict = read_state_dict(folder)
  if add_pooling_layer is None:
    add_pooling_layer = "pooler.dense.weight" in bert_state_dict(state_dict)
  module = BertModel(_config(BertConfig, config, folder), add_pooling_layer=add_pooling_layer, dtype=dtype)
  return module, bert_variables(state_dict, module, str(folder))


# --- GPT-2 ----------------------------------------------------------------------------------------------------

def _gpt2_renames(state_dict: Mapping[str, np.ndarray]) -> dict[str, tuple[str, np.ndarray]]:
  """new key → (checkpoint key, value)."""
  out = {}
  for original, value in state_dict.items():
    if original == "lm_head.weight" or _GPT2_BUFFERS.search(original):
      continue
    key = original[len("transformer."):] if original.startswith("transformer.") else original
    if _GPT2_CONV1D.search(key):
      value = np.asarray(value).T
    out[key] = (original, value)
  return out


def gpt2_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """HF GPT-2 keys → ``GPT2LMHeadModel`` (Flax) keys: ``transformer.`` stripped, tied ``lm_head.weight`` and
  attention buffers dropped, Conv1D weights transposed (see the module docstring)."""
  return {k: v for k, (_, v) in _gpt2_renames(state_dict).items()}


def gpt2_expected(module: GPT2LMHeadModel) -> dict[str, Any]:
  """Shapes/dtypes of ``module.init`` (no computation)."""
  ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  return jax.eval_shape(lambda i: module.init(jax.random.key(0), i), ids)


def _without_psa(tree: Mapping[str, Any]) -> dict[str, Any]:
  return {k: ({kk: vv for kk, vv in v.items() if kk not in ("uk", "uv")} if k == "attn" else
              _without_psa(v) if isinstance(v, Mapping) else v) for k, v in tree.items()}


def _merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
  out = dict(a)
  for k, v in b.items():
    out[k] = _merge(out[k], v) if k in out and isinstance(v, Mapping) else v
  return out


def gpt2_variables(state_dict: Mapping[str, np.ndarray], module: GPT2LMHeadModel, source: str = "state_dict",
                   *, rng: jax.Array | None = None) -> dict[str, Any]:
  """An HF GPT-2 state_dict (numpy; ``transformer.`` prefix optional) → ``{"params": ...}`` for ``module``.

  With pseudo self-attention and a state_dict without any ``attn.uk``/``attn.uv`` key (a plain GPT-2): if ``rng``
  is given the uk/uv layers are initialised from it (torch-default Linear init, as CT-AGRG training starts),
  otherwise they are reported missing.
  """
  renamed = _gpt2_renames(state_dict)
  expected = gpt2_expected(module)
  fresh = module.pseudo_self_attention and rng is not None and not any(_PSA_KEYS.search(k) for k in renamed)
  if not fresh:
    return {"params": _convert(renamed, expected, source, state_dict)["params"]}
  params = _convert(renamed, {"params": _without_psa(expected["params"])}, source, state_dict)["params"]
  return {"params": _merge(params, init_pseudo_self_attention(module, rng))}


def init_pseudo_self_attention(module: GPT2LMHeadModel, rng: jax.Array) -> dict[str, Any]:
  """Fresh ``h_l/attn/{uk,uv}`` params (torch-default Linear init, ct_agrg_spec §10.5) for every layer."""
  c = module.config
  z = jnp.zeros((1, module.prefix_dim or c.n_embd), jnp.float32)
  linear = Linear(c.n_embd, kernel_init=torch_kernel_init)
  keys = jax.random.split(rng, 2 * c.n_layer)
  return {f"h_{l}": {"attn": {"uk": linear.init(keys[2 * l], z)["params"],
                              "uv": linear.init(keys[2 * l + 1], z)["params"]}} for l in range(c.n_layer)}


def load_gpt2(folder: str | pathlib.Path, *, pseudo_self_attention: bool = False, position_table: str = "wpe",
              mask_mode: str = "hf", prefix_dim: int | None = None, dtype: Any = jnp.float32,
              rng: jax.Array | None = None) -> tuple[GPT2LMHeadModel, dict[str, Any]]:
  """Local HF GPT-2 folder (``GPT2LMHeadModel`` or ``GPT2Model`` weights) → (``GPT2LMHeadModel``, variables).

  ``pseudo_self_attention``/``position_table``/``mask_mode``/``prefix_dim``: the module attributes
  (``rrg_jax.layers.gpt2``);
  ``rng``: initialise uk/uv when the checkpoint has none (see ``gpt2_variables``).
  """
  config = read_config(folder)
  state_dict = read_state_dict(folder)
  module = GPT2LMHeadModel(_config(GPT2Config, config, folder), pseudo_self_attention=pseudo_self_attention,
                           position_table=position_table, mask_mode=mask_mode, prefix_dim=prefix_dim,
                           dtype=dtype)
  return module, gpt2_variables(state_dict, module, str(folder), rng=rng)


# --- Swin -----------------------------------------------------------------------------------------------------

_SWIN_INDEX = re.compile(r"\.attention\.(?:self|relative_position_bias)\.relative_position_index$")
_SWIN_DROPPED = re.compile(r"^(classifier\.|decoder\.|embeddings\.mask_token$)")
# transformers 5.x in-memory spelling → the on-disk spelling save_pretrained writes (= the Flax module names).
_SWIN_5X = ((re.compile(r"\.attention\.q_proj\."), ".attention.self.query."),
            (re.compile(r"\.attention\.k_proj\."), ".attention.self.key."),
            (re.compile(r"\.attention\.v_proj\."), ".attention.self.value."),
            (re.compile(r"\.attention\.o_proj\."), ".attention.output.dense."),
            (re.compile(r"\.attention\.relative_position_bias\.relative_position_bias_table$"),
             ".attention.self.relative_position_bias_table"),
            (re.compile(r"\.mlp\.fc1\."), ".intermediate.dense."),
            (re.compile(r"\.mlp\.fc2\."), ".output.dense."))
_SWIN_5X_KEY = re.compile(r"\.(attention\.(q_proj|k_proj|v_proj|o_proj|relative_position_bias)|mlp\.fc[12])\.")
_SWIN_CLASSIC_KEY = re.compile(r"\.(attention\.(self|output)|intermediate\.dense|blocks\.\d+\.output\.dense)\.")


def _swin_renames(state_dict: Mapping[str, np.ndarray]
                  ) -> tuple[dict[str, tuple[str, np.ndarray]], dict[str, np.ndarray]]:
  """(new key → (checkpoint key, value), relative_position_index buffers by checkpoint key)."""
  if any(k.startswith("swin.") for k in state_dict):
    state_dict = {k: v for k, v in state_dict.items() if k.startswith("swin.")}
  new = sorted(k for k in state_dict if _SWIN_5X_KEY.search(k))
  classic = sorted(k for k in state_dict if _SWIN_CLASSIC_KEY.search(k) and not _SWIN_INDEX.search(k))
  if new and classic:
    raise ConversionError(f"The Swin state_dict mixes the transformers 5.x in-memory key spelling ({new[0]}, …) "
                          f"with the on-disk one ({classic[0]}, …); a checkpoint uses one of them.")
  out, buffers = {}, {}
  for original, value in state_dict.items():
    key = original[len("swin."):] if original.startswith("swin.") else original
    if _SWIN_INDEX.search(key):
      buffers[original] = value
      continue
    if _SWIN_DROPPED.search(key):
      continue
    for pattern, repl in _SWIN_5X:
      key = pattern.sub(repl, key)
    out[key] = (original, value)
  return out, buffers


def swin_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """HF Swin keys → ``SwinModel`` (Flax) keys: ``swin.`` stripped (heads and mask token dropped), 5.x in-memory
  names renamed to the on-disk ones, ``relative_position_index`` buffers dropped."""
  return {k: v for k, (_, v) in _swin_renames(state_dict)[0].items()}


def swin_expected(module: SwinModel) -> dict[str, Any]:
  """Shapes/dtypes of ``module.init`` at the config's image size (no computation)."""
  c = module.config
  pixels = jax.ShapeDtypeStruct((1, *c.image_size, c.num_channels), jnp.float32)
  return jax.eval_shape(lambda x: module.init(jax.random.key(0), x), pixels)


def swin_variables(state_dict: Mapping[str, np.ndarray], module: SwinModel, source: str = "state_dict"
                   ) -> dict[str, Any]:
  """An HF Swin state_dict (numpy; ``swin.`` prefix optional, either key spelling) → ``{"params": ...}``.

  A ``relative_position_index`` buffer in the file (older transformers saved it) must equal the index this port
  recomputes for ``window_size`` (else ConversionError naming the keys); it is not loaded.
  """
  renamed, buffers = _swin_renames(state_dict)
  want = relative_position_index(module.config.window_size)
  wrong = [f"{k} {tuple(np.shape(v))}" for k, v in buffers.items()
           if np.size(v) != want.size or not np.array_equal(np.asarray(v).reshape(-1), want.reshape(-1))]
  if wrong:
    raise ConversionError(f"{source}: relative_position_index buffers differ from the index of window_size="
                          f"{module.config.window_size} ({want.shape}): " + ", ".join(wrong))
  try:
    expected = swin_expected(module)
  except ValueError as e:
    raise ConversionError(f"{source}: {e}") from e
  return {"params": _convert(renamed, expected, source, state_dict)["params"]}


def load_swin(folder: str | pathlib.Path, *, add_pooling_layer: bool | None = None, dtype: Any = jnp.float32
              ) -> tuple[SwinModel, dict[str, Any]]:
  """Local HF Swin folder (``SwinModel`` / ``SwinForImageClassification`` / … weights) → (``SwinModel``,
  variables). ``add_pooling_layer`` None: True (HF ``SwinModel``'s default; the pooler has no parameters)."""
  config = read_config(folder)
  state_dict = read_state_dict(folder)
  module = SwinModel(_config(SwinConfig, config, folder), add_pooling_layer=(
      True if add_pooling_layer is None else add_pooling_layer), dtype=dtype)
  return module, swin_variables(state_dict, module, str(folder))


# --- BART -----------------------------------------------------------------------------------------------------

# Tied copies of the word embeddings, in order of preference (a saved file may hold any subset of them).
_BART_EMBEDDINGS = ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight")
_BART_DROPPED = re.compile(r"^(encoder|decoder)\.version$")
_BART_BIAS = "final_logits_bias"


def _bart_renames(state_dict: Mapping[str, np.ndarray]
                  ) -> tuple[dict[str, tuple[str, np.ndarray]], tuple[str, np.ndarray] | None]:
  """(params: new key → (checkpoint key, value), the ``final_logits_bias`` (checkpoint key, value) or None).

  ConversionError when two tied embedding copies differ (an untied LM head is not supported)."""
  out: dict[str, tuple[str, np.ndarray]] = {}
  bias = None
  embeddings: dict[str, tuple[str, np.ndarray]] = {}
  for original, value in state_dict.items():
    key = original[len("model."):] if original.startswith("model.") else original
    if key == _BART_BIAS:
      bias = (original, value)
    elif key in _BART_EMBEDDINGS:
      embeddings[key] = (original, value)
    elif not _BART_DROPPED.search(key):
      out[key] = (original, value)
  copies = [embeddings[k] for k in _BART_EMBEDDINGS if k in embeddings]
  if copies:
    first_key, first = copies[0]
    for key, value in copies[1:]:
      if np.shape(value) != np.shape(first) or not np.array_equal(np.asarray(value), np.asarray(first)):
        raise ConversionError(f"{key} {tuple(np.shape(value))} differs from {first_key} {tuple(np.shape(first))}: "
                              "untied word embeddings / LM head are not supported (BART ties them).")
    out["shared.weight"] = (first_key, first)
  return out, bias


def bart_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """HF BART keys (``BartForConditionalGeneration`` or ``BartModel``) → ``BartForConditionalGeneration`` (Flax)
  keys: ``model.`` stripped, the tied embedding copies merged into ``shared.weight``, ``*.version`` dropped,
  ``final_logits_bias`` kept (it goes to the ``constants`` collection)."""
  renamed, bias = _bart_renames(state_dict)
  out = {k: v for k, (_, v) in renamed.items()}
  if bias is not None:
    out[_BART_BIAS] = bias[1]
  return out


def bart_expected(module: BartForConditionalGeneration) -> dict[str, Any]:
  """Shapes/dtypes of ``module.init`` (``params`` and ``constants``; no computation)."""
  ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  return jax.eval_shape(lambda i: module.init(jax.random.key(0), i, None, i), ids)


def bart_variables(state_dict: Mapping[str, np.ndarray], module: BartForConditionalGeneration,
                   source: str = "state_dict") -> dict[str, Any]:
  """An HF BART state_dict (numpy; ``model.`` prefix optional) → ``{"params": ..., "constants":
  {"final_logits_bias": (1, V)}}`` for ``module``; a missing ``final_logits_bias`` (``BartModel`` weights) is
  zeros, as HF initialises it."""
  renamed, bias = _bart_renames(state_dict)
  expected = bart_expected(module)
  params = _convert(renamed, expected, source, state_dict)["params"]
  want = expected["constants"][_BART_BIAS]
  if bias is None:
    value = np.zeros(want.shape, np.float32)
  else:
    value = np.asarray(bias[1], np.float32)
    if value.shape != tuple(want.shape):
      raise ConversionError(f"{source} does not match the Flax model:\n  1 mis-shaped:\n    {bias[0]} "
                            f"{value.shape} → constants/{_BART_BIAS}, expected {tuple(want.shape)}")
  return {"params": params, "constants": {_BART_BIAS: jnp.asarray(value)}}


def load_bart(folder: str | pathlib.Path, *, dtype: Any = jnp.float32
              ) -> tuple[BartForConditionalGeneration, dict[str, Any]]:
  """Local HF BART folder (``BartForConditionalGeneration`` or ``BartModel`` weights) →
  (``BartForConditionalGeneration``, ``{"params", "constants"}``)."""
  module = BartForConditionalGeneration(_config(BartConfig, read_config(folder), folder), dtype=dtype)
  return module, bart_variables(read_state_dict(folder), module, str(folder))
