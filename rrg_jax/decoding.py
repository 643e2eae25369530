"""Beam search and greedy decoding of the official code (reference spec §9), jit-compiled with static shapes.

The search is model-agnostic: it drives a *step function*

    step_fn(state, tokens (N,) int32) -> (logprobs (N, K) float32, new_state)

that feeds one token per row and returns the log-probabilities of the next token. Every leaf of ``state`` has
the leading dimension ``N`` (``B`` for the first call, ``B * beam_size`` afterwards: rows ``b * beam_size + j``).
Two flavours share the one loop (``encoder_decoder_step_fns``):

* full prefix (the original algorithm): the state holds the prefix buffer and the decoder is re-run over the whole
  buffer every step (causal, so positions after the current one do not influence it);
* cached incremental: the state is the model's KV / relational-memory cache, advanced one token per step.

Algorithm (spec §9). Step 0 feeds BOS (0) to the un-repeated batch; the best ``beam_size`` tokens of the
flattened candidates ``beam_sum[b, j] + logp[b, j, w]`` over (beam × K) are chosen with ``jax.lax.top_k``
(sorted descending, the lowest flat index first among equal values, like ``torch.topk``). A beam whose new token
is 0, or every beam at ``t == max_len - 1``, is recorded as a finished hypothesis with score ``p = beam_sum`` and
then penalised by −1000 (it stays in the beam). The output is the finished hypothesis with the highest ``p``
(the first recorded among equal scores), padded with 0 to ``max_len``; a first token 0 is an empty report.
Greedy decoding is the same loop with ``beam_size = 1`` (top-1 = argmax, first index among ties).

Early exit. The loop stops once, for every image, a hypothesis is recorded and its best score ``p*`` satisfies
``p* >= max_j beam_sum[b, j]``. This cannot change the result: log-probabilities are ``<= 0`` (``log_softmax``
computes ``x - max - log(Σ exp(x - max))`` with ``Σ >= 1``), so every later candidate of image ``b`` scores at most
the ``beam_sum`` of the beam it extends (float rounding is monotone, ``fl(s + l) <= s`` for ``l <= 0``), hence at
most ``p*``, and a later hypothesis with an equal score loses to the earlier one. In particular the loop stops
once every beam of every image has finished (a penalised beam has ``beam_sum <= p - 1000 < p``), and already
when an image's best beam ends. The step function must therefore return log-probabilities (``<= 0``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

StepFn = Callable[[Any, jax.Array], tuple[jax.Array, Any]]
EOS = 0
FINISHED_PENALTY = 1000.0
METHODS = ("beam", "greedy")


class Decoded(NamedTuple):
  """``tokens`` (B, max_len) int32 zero padded after the final token; ``scores`` (B,) summed log-prob of the
  chosen hypothesis; ``steps`` () int32 decoder steps run (≤ max_len; fewer after an early exit)."""
  tokens: jax.Array
  scores: jax.Array
  steps: jax.Array


@dataclasses.dataclass(frozen=True)
class _Carry:
  """Loop state: step ``t``; per beam ``seqs`` (B, W, L) int32, ``beam_sum`` (B, W), last ``tokens`` (B, W);
  the best finished hypothesis per image ``best_tokens`` (B, L), ``best_score`` (B,), ``has_best`` (B,)."""
  t: jax.Array
  seqs: jax.Array
  beam_sum: jax.Array
  tokens: jax.Array
  best_tokens: jax.Array
  best_score: jax.Array
  has_best: jax.Array


jax.tree_util.register_dataclass(_Carry, data_fields=[f.name for f in dataclasses.fields(_Carry)],
                                 meta_fields=[])


def _select(carry: _Carry, logp: jax.Array, t: jax.Array, beam_size: int, max_len: int
            ) -> tuple[_Carry, jax.Array]:
  """One beam step at position ``t``: logp (B, W_in, K) for the current beams → (new carry with ``beam_size``
  beams, parent beam index (B, beam_size))."""
  b, w_in, k = logp.shape
  cand = (carry.beam_sum[:, :, None] + logp).reshape(b, w_in * k)
  vals, flat = jax.lax.top_k(cand, beam_size)
  parent, tok = flat // k, (flat % k).astype(jnp.int32)
  seqs = jnp.take_along_axis(carry.seqs, parent[:, :, None], axis=1)
  seqs = jnp.where(jnp.arange(max_len)[None, None, :] == t, tok[:, :, None], seqs)
  ended = (tok == EOS) | (t == max_len - 1)
  # Finished hypotheses of this step, in beam order; strictly better than the best so far replaces it.
  masked = jnp.where(ended, vals, -jnp.inf)
  j = jnp.argmax(masked, axis=1)
  new_score = jnp.take_along_axis(vals, j[:, None], axis=1)[:, 0]
  any_ended = jnp.any(ended, axis=1)
  better = any_ended & (~carry.has_best | (new_score > carry.best_score))
  new_tokens = jnp.take_along_axis(seqs, j[:, None, None], axis=1)[:, 0]
  carry = _Carry(
      t=carry.t, seqs=seqs, beam_sum=jnp.where(ended, vals - FINISHED_PENALTY, vals), tokens=tok,
      best_tokens=jnp.where(better[:, None], new_tokens, carry.best_tokens),
      best_score=jnp.where(better, new_score, carry.best_score), has_best=carry.has_best | any_ended)
  return carry, parent


def _reorder(state: Any, parent: jax.Array) -> Any:
  """Rows ``b * W + j`` of every state leaf (B·W, ...) ← rows ``b * W + parent[b, j]``."""
  b, w = parent.shape

  def gather(x):
    x = x.reshape((b, w) + x.shape[1:])
    idx = parent.reshape((b, w) + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1).reshape((b * w,) + x.shape[2:])

  return jax.tree.map(gather, state)


def _finished(carry: _Carry) -> jax.Array:
  """True when no later hypothesis can beat the recorded best of any image (see the module docstring)."""
  return jnp.all(carry.has_best & (carry.best_score >= jnp.max(carry.beam_sum, axis=1)))


def beam_search(step_fn: StepFn, init_state: Any, batch_size: int, *, beam_size: int, max_len: int,
                early_exit: bool = True) -> Decoded:
  """Spec §9 beam search of ``batch_size`` images; ``init_state`` leaves have leading dim B.
  ``early_exit=False`` runs all ``max_len`` steps like the original (same result; for tests and timing)."""
  if beam_size < 1 or max_len < 1:
    raise ValueError(f"beam_size ({beam_size}) and max_len ({max_len}) must be >= 1.")
  b = batch_size
  logp, state = step_fn(init_state, jnp.zeros((b,), jnp.int32))
  if logp.shape[-1] < beam_size:
    raise ValueError(f"Vocabulary size {logp.shape[-1]} < beam_size {beam_size}.")
  carry = _Carry(t=jnp.zeros((), jnp.int32), seqs=jnp.zeros((b, 1, max_len), jnp.int32),
                 beam_sum=jnp.zeros((b, 1), jnp.float32), tokens=jnp.zeros((b, 1), jnp.int32),
                 best_tokens=jnp.zeros((b, max_len), jnp.int32), best_score=jnp.full((b,), -jnp.inf, jnp.float32),
                 has_best=jnp.zeros((b,), bool))
  carry, _ = _select(carry, logp.astype(jnp.float32)[:, None], jnp.int32(0), beam_size, max_len)
  carry = dataclasses.replace(carry, t=jnp.ones((), jnp.int32))
  state = jax.tree.map(lambda x: jnp.repeat(x, beam_size, axis=0), state)

  def cond(loop):
    carry, _ = loop
    going = carry.t < max_len
    return going & ~_finished(carry) if early_exit else going

  def body(loop):
    carry, state = loop
    logp, state = step_fn(state, carry.tokens.reshape(-1))
    logp = logp.astype(jnp.float32).reshape(b, beam_size, -1)
    carry, parent = _select(carry, logp, carry.t, beam_size, max_len)
    return dataclasses.replace(carry, t=carry.t + 1), _reorder(state, parent)

  carry, _ = jax.lax.while_loop(cond, body, (carry, state))
  return Decoded(carry.best_tokens, carry.best_score, carry.t)


def greedy(step_fn: StepFn, init_state: Any, batch_size: int, *, max_len: int, early_exit: bool = True
           ) -> Decoded:
  """Argmax decoding (first index among ties) until token 0 or ``max_len`` tokens: the beam loop with one
  beam."""
  return beam_search(step_fn, init_state, batch_size, beam_size=1, max_len=max_len, early_exit=early_exit)


# --- models with an R2Gen encoder-decoder (layers.encoder_decoder.EncoderDecoderModel) ---------------------

def encoder_decoder_step_fns(model: nn.Module, variables: Any, memory: jax.Array, max_len: int, *, cached: bool
                     ) -> tuple[StepFn, Any]:
  """(step_fn, init_state) for the decoder of ``model`` given the encoder memory (B, N, D).

  Cached: state ``{"memory", "cache"}`` with ``model.init_decode_cache(memory, max_len)`` advanced by
  ``model.decode_step``. Full prefix: state ``{"memory", "seq" (B, max_len) prefix buffer, "pos" (B,)}``;
  ``model.decode_full(memory, seq)`` is re-run over the whole buffer (causal) and the log-probs at ``pos`` used.
  """
  b = memory.shape[0]
  if cached:
    def cached_step(state, tokens):
      logp, cache, _ = model.apply(variables, state["memory"], state["cache"], tokens, method="decode_step")
      return logp, {"memory": state["memory"], "cache": cache}

    cache = model.apply(variables, memory, max_len, method="init_decode_cache")
    return cached_step, {"memory": memory, "cache": cache}

  def full_step(state, tokens):
    pos = state["pos"]
    seq = jnp.where(jnp.arange(max_len)[None] == pos[:, None], tokens[:, None], state["seq"])
    logp, _ = model.apply(variables, state["memory"], seq, method="decode_full")
    logp = jnp.take_along_axis(logp, pos[:, None, None], axis=1)[:, 0]
    return logp, {"memory": state["memory"], "seq": seq, "pos": pos + 1}

  return full_step, {"memory": memory, "seq": jnp.zeros((b, max_len), jnp.int32),
                     "pos": jnp.zeros((b,), jnp.int32)}


def word_attention(model: nn.Module, variables: Any, memory: jax.Array, tokens: jax.Array, layer: int
                   ) -> jax.Array:
  """Cross-attention that produced each generated word: tokens (B, T) → (B, T, N) head-mean attention of decoder
  layer ``layer`` at the step that emitted ``tokens[:, i]`` (teacher-forced on ``[BOS] + tokens[:, :-1]``)."""
  seq = jnp.concatenate([jnp.zeros_like(tokens[:, :1]), tokens[:, :-1]], axis=1)
  _, attns = model.apply(variables, memory, seq, method="decode_full")
  return jnp.mean(attns[layer].astype(jnp.float32), axis=1)


@functools.partial(jax.jit, static_argnames=("model", "method", "beam_size", "max_len", "cached", "extras",
                                             "attention_layer"))
def encode_and_decode(model: nn.Module, variables: Any, images: jax.Array, *, method: str, beam_size: int,
                      max_len: int, cached: bool, extras: tuple[str, ...] = (), attention_layer: int | None = None
                      ) -> dict[str, jax.Array]:
  """Encodes images (B, V, H, W, 3) once (``model.encode``, eval mode) and decodes (one jitted program) →

  ``tokens`` (B, max_len) int32 (text = ``tokenizer.decode``), ``scores`` (B,) summed log-probs, ``steps`` ()
  decoder steps run, the ``extras`` entries of the encoder's outputs (e.g. ``probs`` (B, C), ``vdm`` (B, N)) and,
  with ``attention_layer``, ``word_attention`` (B, max_len, N') of that decoder layer (see ``word_attention``).
  ``method``: "beam" | "greedy"; ``cached``: KV cache or full-prefix recompute (identical tokens).
  """
  enc = model.apply(variables, images, method="encode")
  step_fn, state = encoder_decoder_step_fns(model, variables, enc["memory"], max_len, cached=cached)
  if method == "beam":
    dec = beam_search(step_fn, state, images.shape[0], beam_size=beam_size, max_len=max_len)
  else:
    dec = greedy(step_fn, state, images.shape[0], max_len=max_len)
  out = {"tokens": dec.tokens, "scores": dec.scores, "steps": dec.steps, **{k: enc[k] for k in extras}}
  if attention_layer is not None:
    out["word_attention"] = word_attention(model, variables, enc["memory"], dec.tokens, attention_layer)
  return out
