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
import numpy as np

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

def encoder_decoder_step_fns(model: nn.Module, variables: Any, memory: jax.Array, max_len: int, *, cached: bool,
                             memory_mask: jax.Array | None = None) -> tuple[StepFn, Any]:
  """(step_fn, init_state) for the decoder of ``model`` given the encoder memory (B, N, D) and its key mask
  (B, N) bool (None: every token visible).

  Cached: state ``{"memory", "cache"}`` with ``model.init_decode_cache(memory, max_len)`` advanced by
  ``model.decode_step``. Full prefix: state ``{"memory", "seq" (B, max_len) prefix buffer, "pos" (B,)}``;
  ``model.decode_full(memory, seq)`` is re-run over the whole buffer (causal) and the log-probs at ``pos`` used.
  """
  b = memory.shape[0]
  if cached:
    def cached_step(state, tokens):
      logp, cache, _ = model.apply(variables, state["memory"], state["cache"], tokens, method="decode_step")
      return logp, {"memory": state["memory"], "cache": cache}

    cache = model.apply(variables, memory, max_len, memory_mask, method="init_decode_cache")
    return cached_step, {"memory": memory, "cache": cache}

  def full_step(state, tokens):
    pos = state["pos"]
    seq = jnp.where(jnp.arange(max_len)[None] == pos[:, None], tokens[:, None], state["seq"])
    logp, _ = model.apply(variables, state["memory"], seq, src_mask=state.get("memory_mask"), method="decode_full")
    logp = jnp.take_along_axis(logp, pos[:, None, None], axis=1)[:, 0]
    return logp, {**state, "seq": seq, "pos": pos + 1}

  state = {"memory": memory, "seq": jnp.zeros((b, max_len), jnp.int32), "pos": jnp.zeros((b,), jnp.int32)}
  if memory_mask is not None:
    state["memory_mask"] = memory_mask
  return full_step, state


def word_attention(model: nn.Module, variables: Any, memory: jax.Array, tokens: jax.Array, layer: int,
                   memory_mask: jax.Array | None = None) -> jax.Array:
  """Cross-attention that produced each generated word: tokens (B, T) → (B, T, N) head-mean attention of decoder
  layer ``layer`` at the step that emitted ``tokens[:, i]`` (teacher-forced on ``[BOS] + tokens[:, :-1]``)."""
  seq = jnp.concatenate([jnp.zeros_like(tokens[:, :1]), tokens[:, :-1]], axis=1)
  _, attns = model.apply(variables, memory, seq, src_mask=memory_mask, method="decode_full")
  return jnp.mean(attns[layer].astype(jnp.float32), axis=1)


@functools.partial(jax.jit, static_argnames=("model", "method", "beam_size", "max_len", "cached", "extras",
                                             "attention_layer"))
def encode_and_decode(model: nn.Module, variables: Any, inputs: tuple[jax.Array, ...], *, method: str,
                      beam_size: int, max_len: int, cached: bool, extras: tuple[str, ...] = (),
                      attention_layer: int | None = None) -> dict[str, jax.Array]:
  """Encodes once (``model.encode(*inputs)``, eval mode; ``inputs`` the system's ``encode_fields``, first the
  images (B, V, H, W, 3)) and decodes (one jitted program) →

  ``tokens`` (B, max_len) int32 (text = ``tokenizer.decode``), ``scores`` (B,) summed log-probs, ``steps`` ()
  decoder steps run, the ``extras`` entries of the encoder's outputs (e.g. ``probs`` (B, C), ``vdm`` (B, N)) and,
  with ``attention_layer``, ``word_attention`` (B, max_len, N') of that decoder layer (see ``word_attention``).
  ``method``: "beam" | "greedy"; ``cached``: KV cache or full-prefix recompute (identical tokens).
  """
  enc = model.apply(variables, *inputs, method="encode")
  batch_size = inputs[0].shape[0]
  memory_mask = enc.get("memory_mask")
  step_fn, state = encoder_decoder_step_fns(model, variables, enc["memory"], max_len, cached=cached,
                                            memory_mask=memory_mask)
  if method == "beam":
    dec = beam_search(step_fn, state, batch_size, beam_size=beam_size, max_len=max_len)
  else:
    dec = greedy(step_fn, state, batch_size, max_len=max_len)
  out = {"tokens": dec.tokens, "scores": dec.scores, "steps": dec.steps, **{k: enc[k] for k in extras}}
  if attention_layer is not None:
    out["word_attention"] = word_attention(model, variables, enc["memory"], dec.tokens, attention_layer,
                                           memory_mask)
  return out


# =============================================================================================================
# HF-semantics generation: transformers 5.23.0 `generate` (greedy `_sample`, vectorised `_beam_search`)
# =============================================================================================================
#
# Interface. The same step-function protocol as above, except that the step function returns the *logits*
# (N, V) (float32) of the next token: beam search applies ``log_softmax`` then the processors (HF order), greedy
# applies the processors to the raw logits and takes the argmax (first index among ties), as HF does. A function
# returning log-probabilities also works (log_softmax is idempotent up to rounding). The sequence starts from a
# ``prompt`` (B, L0) — ``[decoder_start_token_id]`` for an encoder-decoder, the (left-padded) prompt for a
# decoder-only model — and ``max_length`` counts it (HF's ``max_length``). The first ``step_fn`` call feeds
# ``prompt[:, -1]`` to ``init_state`` (leading dim B; everything before that token already processed); beam search
# first repeats the state ``num_beams`` times (rows ``b * num_beams + k``, as HF expands its inputs) and reorders
# it by a gather every step.
# One ``jax.lax.while_loop``, static shapes (sequences are (B, K, max_length) buffers), jit-compatible.
#
# Beam search, step at current length c (transformers 5.23.0 `GenerationMixin._beam_search`):
#   1. ``s = processors(log_softmax(logits))`` (N, V); candidates ``running_score[k] + s[k, w]`` over K·V; at the
#      first step only beam 0 is live (the others start at −1e9). Keep the top ``max(2, 1 + n_eos)·K`` (sorted).
#   2. A candidate "hits" when its token is an EOS or c + 1 ≥ max_length (the stopping criteria).
#   3. Running beams: the top K of ``cand + hit·(−1e9)`` (a hit never runs on, except when nothing else is left).
#   4. Finished beams: a hit of rank < K is a hypothesis with score ``cand / ℓ^length_penalty``,
#      ℓ = c + 1 − L0 = the number of generated tokens, EOS included (decoder start / prompt excluded); −1e9 is added
#      when the image is already closed (early_stopping=True and K hypotheses held, or the heuristic below said
#      no improvement is possible) and to every non-hit; the best K of (held ∪ new) by score are kept.
#   5. Heuristic (every early_stopping value): an image stays open while
#      ``running_score[0] / ℓ*^length_penalty > worst held score`` (or fewer than K held), with ℓ* = c + 1 − L0,
#      except early_stopping="never" with length_penalty > 0: ℓ* = max_length − L0.
#   6. Stop when no image is open, or (early_stopping=True) every image holds K hypotheses, or every candidate
#      hit (max_length). There is no separate finalisation: at the last step every top-K candidate hits and is
#      scored with ℓ = max_length − L0. Output: the best held hypothesis (its EOS included), its score (HF's
#      ``sequences_scores``) and its length; the buffer is filled with ``pad_token_id`` after it.
# Beam search with ``scorer="v4"``: RGRG's loop over the 4.x ``BeamSearchScorer`` (4.36.0–4.57.x, no
# ``decoder_prompt_len``), step at current length c — step 1 and the processors as above (top (1 + n_eos)·K, ≥ 2K), then
#   2'. the candidates are scanned in rank order: a non-EOS one becomes the next running beam until K are filled
#      (so the running beams are the first K non-EOS candidates, max length is no "hit"); an EOS candidate of rank
#      < K, while the image is not done, is added (``BeamHypotheses.add``) as a hypothesis with score
#      ``cand / ℓ^length_penalty``, ℓ = c + 1 = the whole sequence with the prompt / BOS and the EOS (one more than
#      5.23 for a one-token start); EOS candidates of rank ≥ K are dropped.
#   3'. add: while fewer than K are held it enters; then only if strictly better than the worst held one, which
#      leaves (the earliest added among equal worst scores); the list keeps the insertion order.
#   4'. done (per image, never undone; a done image adds nothing more) once K are held and (early_stopping=True)
#      always, (False) ``worst held ≥ cand[0] / (c + 1)^α`` with cand[0] the best *raw* candidate of the step, EOS
#      candidates included, ("never") the same with ``max_length^α`` when α > 0.
#   5'. stop when every image is done or c + 1 = max_length; then an image not done adds its K running beams, in
#      beam order, with score ``running_score / max_length^α`` (their length: no EOS). Output: the best held
#      hypothesis, the latest added among equal scores (``sorted(...).pop()``), with its EOS (as 4.x ``finalize``
#      appends it) unless it ran to max_length, then ``pad_token_id``; its score (4.x ``sequence_scores``).
#   Exact ties: candidates of equal score are ranked by flat index here (``jax.lax.top_k``), by ``torch.topk``'s
#   (unspecified) order in HF, which then decides the order of hypotheses added in the same step.
#   4.x computes the hypothesis scores and the done test in Python floats (float64) from the float32 sums; here
#   they are float32 quotients (the same value rounded; the returned score is float32 in 4.x too), so two
#   hypotheses whose float64 scores differ by less than a float32 rounding compare equal here, and with α ∉ {0, 1}
#   the divisor is ℓ^α rounded to float32.
# Processors, in HF's order: no-repeat-n-gram (a token completing an n-gram already in the row's sequence,
# prompt / decoder start included, gets −inf), min-length (EOS −inf while c < min_length; c counts the prompt),
# forced BOS (c == 1: all but ``forced_bos_token_id`` −inf, that one 0), forced EOS (c == max_length − 1: all
# but ``forced_eos_token_id`` −inf, that one 0). Scores are float32 throughout; the divisors ℓ^length_penalty are
# computed in float64 and rounded to float32, as torch divides a float32 tensor by a Python float.
#
# Version notes (radgen_spec §3.5, ct_agrg_spec §7.1):
#   * ℓ. 5.23 (``_update_finished_beams``): ℓ = c + 1 − decoder_prompt_len = generated tokens with the EOS. The
#     4.x ``BeamSearchScorer`` (4.x ``generate`` before the vectorised rewrite; what RGRG calls directly) gives the
#     same when it is passed ``decoder_prompt_len`` (``generated_len = cur_len − decoder_prompt_len``, cur_len =
#     length + 1). Releases before ``generated_len`` existed: ℓ = stored hypothesis length = prompt + generated
#     tokens without the EOS — the same number for a one-token decoder start (BART), L0 − 1 more for a
#     decoder-only prompt of L0 tokens. RGRG/CT-AGRG call ``BeamSearchScorer.process`` without
#     ``decoder_prompt_len`` (default 0): ℓ = length incl. BOS + 1 (BOS and EOS counted), one more than 5.23
#     ``generate`` for the same one-token BOS prompt (ct_agrg_spec §7.1): ``scorer="v4"``.
#   * Done rule. 4.x ``BeamHypotheses.is_done`` compares the worst held score with the best *raw candidate*
#     of the step (EOS candidates included) / ℓ^α; 5.23 uses the best *running* beam (after the EOS candidates
#     left) / ℓ*^α. early_stopping=True: closed at K hypotheses in both.
#   * Finalisation. 4.x ``finalize`` adds the K running beams of an open image with score S / (max_length − L0)
#     (running beams = best non-EOS candidates of the last step, of any rank); 5.23 closes the candidates of
#     rank < K of the last step (EOS or not) with the same divisor; the best of them is the same (ties aside),
#     but the done-rule difference above can change which hypotheses are held by then. The done rule and the
#     finalisation of 4.x: ``scorer="v4"`` (which also keeps L0 = 0 there, as RGRG).
#   * Padding. 5.23 beam search fills with ``pad_token_id or eos_token_id`` (a pad id of 0 is falsy: EOS is used);
#     here the fill is always ``pad_token_id`` (greedy uses pad_token_id in both). HF also crops the batch to
#     its longest output; here the buffer has ``max_length`` columns and ``lengths`` tells where each ends.
#   * Legacy generation fields. transformers 4.x copies ``no_repeat_ngram_size``, ``forced_bos_token_id``,
#     ``forced_eos_token_id``, ``num_beams``, ``early_stopping``, ``length_penalty`` … from ``config.json`` into
#     the generation config; 5.23 still does so in ``from_pretrained`` for a folder without
#     ``generation_config.json`` (checked with a saved config), and ``generate`` fills every field left None in
#     the passed GenerationConfig from ``model.generation_config``. These functions have no hidden defaults.

HF_BEAM_OFFSET = -1.0e9  # HF's "very large negative" score offset (initial beams, hits, closed images)
HF_BEAM_SCORERS = ("v5", "v4")  # hf_beam_search(scorer=...): transformers 5.x generate | 4.x BeamSearchScorer


class HFDecoded(NamedTuple):
  """``tokens`` (B, max_length) int32: prompt, generated tokens (the EOS included), then ``pad_token_id``;
  ``scores`` (B,) float32: beam search — HF's ``sequences_scores`` (sum of processed log-probs / ℓ^α); greedy —
  the sum of ``log_softmax(logits)`` (before the processors) of the generated tokens; ``lengths`` (B,) int32:
  sequence length, prompt included (HF's output width is ``max(lengths)``); ``steps`` () int32: step_fn calls."""
  tokens: jax.Array
  scores: jax.Array
  lengths: jax.Array
  steps: jax.Array


def _token_ids(value: Any, name: str) -> tuple[int, ...]:
  """None / an int / a sequence of ints → a tuple of ids."""
  if value is None:
    return ()
  if isinstance(value, (int, np.integer)):
    return (int(value),)
  ids = tuple(int(i) for i in value)
  if not ids:
    raise ValueError(f"{name} is an empty sequence")
  return ids


def _isin(tokens: jax.Array, ids: tuple[int, ...]) -> jax.Array:
  out = jnp.zeros(tokens.shape, bool)
  for i in ids:
    out = out | (tokens == i)
  return out


def _make_prompt(prompt: Any, start_token_id: int | None, batch_size: int, max_length: int) -> jax.Array:
  if (prompt is None) == (start_token_id is None):
    raise ValueError("give exactly one of prompt (B, L0) and start_token_id")
  if prompt is None:
    prompt = jnp.full((batch_size, 1), start_token_id, jnp.int32)
  prompt = jnp.asarray(prompt).astype(jnp.int32)
  if prompt.ndim != 2 or prompt.shape[0] != batch_size or prompt.shape[1] < 1:
    raise ValueError(f"prompt must be (batch_size={batch_size}, L0 >= 1), got {prompt.shape}")
  if prompt.shape[1] >= max_length:
    raise ValueError(f"prompt length {prompt.shape[1]} >= max_length {max_length}: nothing to generate")
  return prompt


@dataclasses.dataclass(frozen=True)
class _HFProcessors:
  """HF logits processors in ``_get_logits_processor`` order (only those the options switch on)."""
  max_length: int
  eos: tuple[int, ...]
  no_repeat_ngram_size: int = 0
  min_length: int = 0
  forced_bos: int | None = None
  forced_eos: tuple[int, ...] = ()

  def __post_init__(self):
    if self.no_repeat_ngram_size < 0 or self.min_length < 0:
      raise ValueError("no_repeat_ngram_size and min_length must be >= 0")

  def __call__(self, scores: jax.Array, seqs: jax.Array, cur_len: jax.Array) -> jax.Array:
    """scores (N, V) float32; seqs (N, L) with the first ``cur_len`` columns filled → processed scores."""
    v = scores.shape[-1]
    vocab = jnp.arange(v)
    neg = jnp.float32(-jnp.inf)
    if self.no_repeat_ngram_size > 0:
      scores = _ban_repeated_ngrams(scores, seqs, cur_len, self.no_repeat_ngram_size)
    if self.min_length > 0 and self.eos:
      scores = jnp.where((cur_len < self.min_length) & _isin(vocab, self.eos)[None], neg, scores)
    if self.forced_bos is not None:
      forced = jnp.where(vocab == self.forced_bos, 0.0, neg).astype(jnp.float32)
      scores = jnp.where(cur_len == 1, forced[None], scores)
    if self.forced_eos:
      forced = jnp.where(_isin(vocab, self.forced_eos), 0.0, neg).astype(jnp.float32)
      scores = jnp.where(cur_len == self.max_length - 1, forced[None], scores)
    return scores


def _ban_repeated_ngrams(scores: jax.Array, seqs: jax.Array, cur_len: jax.Array, n: int) -> jax.Array:
  """HF ``NoRepeatNGramLogitsProcessor``: for every window ``seqs[i:i+n]`` inside the first ``cur_len`` tokens
  whose first n−1 tokens equal the last n−1 tokens, its last token gets −inf (nothing while cur_len < n)."""
  rows, length = seqs.shape
  v = scores.shape[-1]
  if length < n:
    return scores
  nw = length - n + 1
  windows = jnp.stack([seqs[:, j:j + nw] for j in range(n)], axis=-1)  # (N, nw, n)
  suffix = jax.lax.dynamic_slice_in_dim(seqs, jnp.maximum(cur_len + 1 - n, 0), n - 1, axis=1)  # (N, n−1)
  inside = jnp.arange(nw) <= cur_len - n
  match = jnp.all(windows[..., :-1] == suffix[:, None, :], axis=-1) & inside[None] & (cur_len >= n)
  target = jnp.where(match, jnp.minimum(windows[..., -1], v), v)  # non-matches → a spare column
  banned = jnp.zeros((rows, v + 1), bool).at[jnp.arange(rows)[:, None], target].set(True)
  return jnp.where(banned[:, :v], -jnp.inf, scores)


@dataclasses.dataclass(frozen=True)
class _HFBeamCarry:
  """``cur_len`` (); running beams ``running_seqs`` (B, K, L), ``running_scores`` (B, K); held hypotheses
  ``seqs`` (B, K, L), ``scores`` (B, K) (sorted, −1e9 placeholders), ``finished`` (B, K), ``lengths`` (B, K);
  ``open_`` (B,) the early-stop heuristic is unsatisfied; ``done`` () the loop is over. ``scorer="v4"``: the held
  hypotheses in insertion order (``finished``: slots 0..n−1), ``open_`` = not done."""
  cur_len: jax.Array
  running_seqs: jax.Array
  running_scores: jax.Array
  seqs: jax.Array
  scores: jax.Array
  finished: jax.Array
  lengths: jax.Array
  open_: jax.Array
  done: jax.Array


jax.tree_util.register_dataclass(_HFBeamCarry, data_fields=[f.name for f in dataclasses.fields(_HFBeamCarry)],
                                 meta_fields=[])


def _gather(x: jax.Array, idx: jax.Array) -> jax.Array:
  """x (B, M, ...) , idx (B, K) → x[b, idx[b, k], ...] (B, K, ...)."""
  return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def _hf_candidates(carry: _HFBeamCarry, logp: jax.Array, n_keep: int
                   ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """The top ``n_keep`` continuations (both scorers): processed log-probs (B, K, V) → candidate scores (B, K')
  (sorted, descending; the lowest flat index first among equal values), source beam (B, K'),
  token (B, K') and sequence (B, K', L) (the token written at ``cur_len``)."""
  b, k, v = logp.shape
  acc = (logp + carry.running_scores[:, :, None]).reshape(b, k * v)
  cand, flat = jax.lax.top_k(acc, n_keep)
  parent, tok = flat // v, (flat % v).astype(jnp.int32)
  cand_seqs = _gather(carry.running_seqs, parent)
  cand_seqs = jnp.where(jnp.arange(cand_seqs.shape[-1]) == carry.cur_len, tok[..., None], cand_seqs)
  return cand, parent, tok, cand_seqs


def _hf_beam_select(carry: _HFBeamCarry, logp: jax.Array, *, num_beams: int, n_keep: int, eos: tuple[int, ...],
                    max_length: int, prompt_len: int, divisors: jax.Array, length_penalty: float,
                    early_stopping: bool | str) -> tuple[_HFBeamCarry, jax.Array]:
  """One 5.23 beam step: processed log-probs (B, K, V) → (new carry, parent beam of each running beam (B, K))."""
  b = logp.shape[0]
  c = carry.cur_len
  # c. top-K' continuations
  cand, parent, tok, cand_seqs = _hf_candidates(carry, logp, n_keep)
  # d. stopping criteria (max length, EOS)
  hits = _isin(tok, eos) | (c + 1 >= max_length)
  # e. running beams
  run_scores = cand + hits.astype(jnp.float32) * HF_BEAM_OFFSET
  _, nxt = jax.lax.top_k(run_scores, num_beams)
  running_seqs = _gather(cand_seqs, nxt)
  running_scores = _gather(run_scores, nxt)
  running_parent = _gather(parent, nxt)
  # f. held hypotheses
  new_finished = hits & (jnp.arange(n_keep) < num_beams)[None]
  scores = cand / divisors[c + 1 - prompt_len]
  if early_stopping is True:
    full = jnp.all(carry.finished, axis=1, keepdims=True)
    scores = scores + full.astype(jnp.float32) * HF_BEAM_OFFSET
  scores = scores + (~carry.open_)[:, None].astype(jnp.float32) * HF_BEAM_OFFSET
  scores = scores + (~new_finished).astype(jnp.float32) * HF_BEAM_OFFSET
  merged_scores = jnp.concatenate([carry.scores, scores], axis=1)
  _, keep = jax.lax.top_k(merged_scores, num_beams)
  held_seqs = _gather(jnp.concatenate([carry.seqs, cand_seqs], axis=1), keep)
  held_scores = _gather(merged_scores, keep)
  held_finished = _gather(jnp.concatenate([carry.finished, new_finished], axis=1), keep)
  new_lengths = jnp.broadcast_to(c + 1, (b, n_keep)).astype(jnp.int32)
  held_lengths = _gather(jnp.concatenate([carry.lengths, new_lengths], axis=1), keep)
  # g. early-stop heuristic and loop condition, at the new length c + 1
  if early_stopping == "never" and length_penalty > 0.0:
    hypothetical = max_length - prompt_len
  else:
    hypothetical = c + 1 - prompt_len
  best_possible = running_scores[:, 0] / divisors[hypothetical]
  worst_held = jnp.where(held_finished, jnp.min(held_scores, axis=1, keepdims=True), HF_BEAM_OFFSET)
  open_ = carry.open_ & jnp.any(best_possible[:, None] > worst_held, axis=1)
  closed_full = jnp.all(held_finished) & (early_stopping is True)
  done = ~(jnp.any(open_) & ~closed_full & ~jnp.all(hits))
  carry = _HFBeamCarry(cur_len=c + 1, running_seqs=running_seqs, running_scores=running_scores, seqs=held_seqs,
                       scores=held_scores, finished=held_finished, lengths=held_lengths, open_=open_, done=done)
  return carry, running_parent


def _hf_v4_add(carry: _HFBeamCarry, seq: jax.Array, total: jax.Array, length: jax.Array | int,
               divisor: jax.Array, add: jax.Array) -> _HFBeamCarry:
  """4.x ``BeamHypotheses.add`` where ``add`` (B,): the hypothesis ``seq`` (B, L) of summed log-probs ``total``
  (B,) and ``length`` tokens, score ``total / divisor``. The held list is kept in insertion order (slots
  0..n−1 valid, ``finished``); it enters while n < K, else only if strictly better than the worst held one, which
  then leaves (the earliest added among equal worst scores, as HF's ``sorted((score, index))``); the later ones
  move up a slot and the new one takes the last."""
  b, k = carry.scores.shape
  score = total / divisor
  n = jnp.sum(carry.finished, axis=1)
  full = n == k
  masked = jnp.where(carry.finished, carry.scores, jnp.inf)
  accept = add & (~full | (score > jnp.min(masked, axis=1)))
  slot = jnp.arange(k)[None]
  evict = jnp.argmin(masked, axis=1)[:, None]  # first of the equal minima
  src = jnp.where(accept[:, None] & full[:, None], jnp.minimum(slot + (slot >= evict), k - 1), slot)
  put = accept[:, None] & (slot == jnp.where(full, k - 1, n)[:, None])

  def place(held, new):
    return jnp.where(put.reshape(put.shape + (1,) * (held.ndim - 2)), new[:, None], _gather(held, src))

  return dataclasses.replace(
      carry, seqs=place(carry.seqs, seq), scores=place(carry.scores, score),
      finished=place(carry.finished, jnp.ones((b,), bool)),
      lengths=place(carry.lengths, jnp.broadcast_to(length, (b,)).astype(jnp.int32)))


def _hf_v4_select(carry: _HFBeamCarry, logp: jax.Array, *, num_beams: int, n_keep: int, eos: tuple[int, ...],
                  max_length: int, divisors: jax.Array, length_penalty: float, early_stopping: bool | str
                  ) -> tuple[_HFBeamCarry, jax.Array]:
  """One 4.x ``BeamSearchScorer.process`` step (``decoder_prompt_len`` 0): processed log-probs (B, K, V) → (new
  carry, parent beam of each running beam (B, K)); ``open_`` = not ``_done``."""
  c = carry.cur_len
  cand, parent, tok, cand_seqs = _hf_candidates(carry, logp, n_keep)
  is_eos = _isin(tok, eos)
  # Running beams: the first K non-EOS candidates in rank order (n_keep ≥ (1 + n_eos)·K leaves at least K).
  nxt = jnp.argsort(is_eos, axis=1, stable=True)[:, :num_beams]
  # Hypotheses: the EOS candidates of rank < K, one by one in rank order, while the image is not done.
  for r in range(num_beams):
    carry = _hf_v4_add(carry, cand_seqs[:, r], cand[:, r], c + 1, divisors[c + 1], is_eos[:, r] & carry.open_)
  if early_stopping is True:
    done = jnp.ones_like(carry.open_)
  else:
    hypothetical = max_length if early_stopping == "never" and length_penalty > 0.0 else c + 1
    worst = jnp.min(jnp.where(carry.finished, carry.scores, jnp.inf), axis=1)
    done = worst >= cand[:, 0] / divisors[hypothetical]
  open_ = carry.open_ & ~(jnp.all(carry.finished, axis=1) & done)
  carry = dataclasses.replace(
      carry, cur_len=c + 1, running_seqs=_gather(cand_seqs, nxt), running_scores=_gather(cand, nxt), open_=open_,
      done=~jnp.any(open_) | (c + 1 >= max_length))
  return carry, _gather(parent, nxt)


def _hf_v4_finalize(carry: _HFBeamCarry, divisors: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """4.x ``BeamSearchScorer.finalize``: an image not done adds its K running beams in beam order (score S / ℓ^α,
  ℓ the running length); the output is the best held hypothesis, the latest added among equal scores (HF's
  stable ``sorted(...).pop()``) → (tokens (B, L), score (B,), length (B,))."""
  k = carry.scores.shape[1]
  for j in range(k):
    carry = _hf_v4_add(carry, carry.running_seqs[:, j], carry.running_scores[:, j], carry.cur_len,
                       divisors[carry.cur_len], carry.open_)
  best = (k - 1 - jnp.argmax(jnp.where(carry.finished, carry.scores, -jnp.inf)[:, ::-1], axis=1))[:, None]
  return _gather(carry.seqs, best)[:, 0], _gather(carry.scores, best)[:, 0], _gather(carry.lengths, best)[:, 0]


def _check_common(max_length: int, pad_token_id: int):
  if max_length < 2:
    raise ValueError(f"max_length ({max_length}) must be >= 2")
  if not isinstance(pad_token_id, (int, np.integer)):
    raise ValueError(f"pad_token_id must be an int, got {pad_token_id!r}")


def hf_beam_search(step_fn: StepFn, init_state: Any, batch_size: int, *, num_beams: int, max_length: int,
                   eos_token_id: int | tuple[int, ...] | None, pad_token_id: int, prompt: Any = None,
                   start_token_id: int | None = None, length_penalty: float = 1.0,
                   early_stopping: bool | str = False, no_repeat_ngram_size: int = 0, min_length: int = 0,
                   forced_bos_token_id: int | None = None,
                   forced_eos_token_id: int | tuple[int, ...] | None = None, scorer: str = "v5") -> HFDecoded:
  """Beam search with the semantics of transformers 5.23.0 ``generate(num_beams=K, do_sample=False)``, or with
  ``scorer="v4"`` those of the 4.x ``BeamSearchScorer`` driven without ``decoder_prompt_len`` (RGRG / CT-AGRG);
  see the section comment above. ``step_fn`` returns logits, ``init_state`` leaves have leading dim B.

  Args:
    prompt / start_token_id: the sequence so far, (B, L0) ints, or one start token (an encoder-decoder's
      ``decoder_start_token_id``; for a decoder-only model without prompt, BOS). Exactly one.
    max_length: total length, prompt included (HF ``max_length``); static.
    eos_token_id: one id or several (HF lists), or None; pad_token_id: the fill after each hypothesis.
    length_penalty, early_stopping (True | False | "never"), no_repeat_ngram_size, min_length,
      forced_bos_token_id, forced_eos_token_id: as HF's GenerationConfig fields (HF's global defaults here).
    scorer: "v5" (default) — transformers 5.23.0 ``generate``; "v4" — the ``BeamSearchScorer`` of transformers
      4.36.0–4.57.x (the same rule in all of them; 4.53.0 and 4.57.6 read) called without ``decoder_prompt_len``
      (0: ℓ counts the prompt) and with ``max_length``, as RGRG's / CT-AGRG's generation loop does. 5.x ships no
      ``BeamSearchScorer``; releases before 4.36 divide an EOS-ended hypothesis by its length without the EOS.
  """
  if num_beams < 1:
    raise ValueError(f"num_beams ({num_beams}) must be >= 1")
  if scorer not in HF_BEAM_SCORERS:
    raise ValueError(f"scorer must be one of {HF_BEAM_SCORERS}, got {scorer!r}")
  if isinstance(early_stopping, (bool, np.bool_)):
    early_stopping = bool(early_stopping)
  elif early_stopping != "never":
    raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
  _check_common(max_length, pad_token_id)
  b, k = batch_size, num_beams
  prompt = _make_prompt(prompt, start_token_id, b, max_length)
  l0 = prompt.shape[1]
  eos = _token_ids(eos_token_id, "eos_token_id")
  n_keep = max(2, 1 + len(eos)) * k
  process = _HFProcessors(max_length, eos, no_repeat_ngram_size, min_length, forced_bos_token_id,
                          _token_ids(forced_eos_token_id, "forced_eos_token_id"))
  divisors = jnp.asarray(np.array([1.0] + [float(n) ** length_penalty for n in range(1, max_length + 1)],
                                  np.float32))
  if scorer == "v4":
    select = functools.partial(_hf_v4_select, num_beams=k, n_keep=n_keep, eos=eos, max_length=max_length,
                               divisors=divisors, length_penalty=length_penalty, early_stopping=early_stopping)
  else:
    select = functools.partial(_hf_beam_select, num_beams=k, n_keep=n_keep, eos=eos, max_length=max_length,
                               prompt_len=l0, divisors=divisors, length_penalty=length_penalty,
                               early_stopping=early_stopping)

  buf = jnp.full((b, max_length), pad_token_id, jnp.int32).at[:, :l0].set(prompt)
  seqs = jnp.broadcast_to(buf[:, None], (b, k, max_length))
  carry = _HFBeamCarry(
      cur_len=jnp.asarray(l0, jnp.int32), running_seqs=seqs,
      running_scores=jnp.zeros((b, k), jnp.float32).at[:, 1:].set(HF_BEAM_OFFSET), seqs=seqs,
      scores=jnp.full((b, k), HF_BEAM_OFFSET, jnp.float32), finished=jnp.zeros((b, k), bool),
      lengths=jnp.full((b, k), l0, jnp.int32), open_=jnp.ones((b,), bool), done=jnp.zeros((), bool))

  # As HF: the state is repeated to B·K rows up front; at the first step beams 1..K−1 (identical rows) start at
  # −1e9, so the candidates come from beam 0 — one loop body for every step.
  state = jax.tree.map(lambda x: jnp.repeat(x, k, axis=0), init_state)

  def body(loop):
    carry, state = loop
    c = carry.cur_len
    flat = carry.running_seqs.reshape(b * k, max_length)
    logits, state = step_fn(state, jax.lax.dynamic_index_in_dim(flat, c - 1, axis=1, keepdims=False))
    if logits.shape[-1] * k < n_keep:
      raise ValueError(f"vocabulary size {logits.shape[-1]} too small for {n_keep} candidates")
    logp = process(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), flat, c)
    carry, parent = select(carry, logp.reshape(b, k, -1))
    return carry, _reorder(state, parent)

  carry, _ = jax.lax.while_loop(lambda loop: ~loop[0].done, body, (carry, state))
  if scorer == "v4":
    return HFDecoded(*_hf_v4_finalize(carry, divisors), carry.cur_len - l0)
  return HFDecoded(carry.seqs[:, 0], carry.scores[:, 0], carry.lengths[:, 0], carry.cur_len - l0)


@dataclasses.dataclass(frozen=True)
class _HFGreedyCarry:
  cur_len: jax.Array
  seqs: jax.Array
  unfinished: jax.Array
  scores: jax.Array
  lengths: jax.Array


jax.tree_util.register_dataclass(_HFGreedyCarry, data_fields=[f.name for f in dataclasses.fields(_HFGreedyCarry)],
                                 meta_fields=[])


def hf_greedy(step_fn: StepFn, init_state: Any, batch_size: int, *, max_length: int,
              eos_token_id: int | tuple[int, ...] | None, pad_token_id: int, prompt: Any = None,
              start_token_id: int | None = None, no_repeat_ngram_size: int = 0, min_length: int = 0,
              forced_bos_token_id: int | None = None,
              forced_eos_token_id: int | tuple[int, ...] | None = None) -> HFDecoded:
  """Greedy decoding with the semantics of transformers 5.23.0 ``generate(num_beams=1, do_sample=False)``
  (``_sample``): processors on the raw logits, argmax (first index among ties); a finished row (EOS emitted)
  receives ``pad_token_id``; the loop ends when every row has finished or at ``max_length``. Arguments as
  ``hf_beam_search``."""
  _check_common(max_length, pad_token_id)
  b = batch_size
  prompt = _make_prompt(prompt, start_token_id, b, max_length)
  l0 = prompt.shape[1]
  eos = _token_ids(eos_token_id, "eos_token_id")
  process = _HFProcessors(max_length, eos, no_repeat_ngram_size, min_length, forced_bos_token_id,
                          _token_ids(forced_eos_token_id, "forced_eos_token_id"))
  carry = _HFGreedyCarry(
      cur_len=jnp.asarray(l0, jnp.int32),
      seqs=jnp.full((b, max_length), pad_token_id, jnp.int32).at[:, :l0].set(prompt),
      unfinished=jnp.ones((b,), bool), scores=jnp.zeros((b,), jnp.float32), lengths=jnp.full((b,), l0, jnp.int32))

  def body(loop):
    carry, state = loop
    c = carry.cur_len
    logits, state = step_fn(state, jax.lax.dynamic_index_in_dim(carry.seqs, c - 1, axis=1, keepdims=False))
    logits = logits.astype(jnp.float32)
    tok = jnp.argmax(process(logits, carry.seqs, c), axis=-1).astype(jnp.int32)
    if eos:
      tok = jnp.where(carry.unfinished, tok, pad_token_id)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tok[:, None], axis=1)[:, 0]
    seqs = jnp.where(jnp.arange(max_length) == c, tok[:, None], carry.seqs)
    ended = _isin(tok, eos) | (c + 1 >= max_length)
    carry = _HFGreedyCarry(cur_len=c + 1, seqs=seqs, unfinished=carry.unfinished & ~ended,
                           scores=carry.scores + jnp.where(carry.unfinished, logp, 0.0),
                           lengths=jnp.where(carry.unfinished, c + 1, carry.lengths))
    return carry, state

  carry, _ = jax.lax.while_loop(lambda loop: jnp.any(loop[0].unfinished), body, (carry, init_state))
  return HFDecoded(carry.seqs, carry.scores, carry.lengths, carry.cur_len - l0)


# --- step functions of the HF-semantics models -----------------------------------------------------------------

def bart_step_fns(model: nn.Module, variables: Any, encoder_hidden_states: jax.Array,
                  encoder_attention_mask: jax.Array | None, max_length: int) -> tuple[StepFn, Any]:
  """(step_fn → logits, init_state) of a ``layers.bart.BartForConditionalGeneration`` decoder over the encoder
  output (B, S, D): the state is the KV cache (``model.init_cache``: cross-attention K/V projected once), fed
  from the decoder start token (``start_token_id=decoder_start_token_id`` in hf_beam_search / hf_greedy)."""
  def step(cache, tokens):
    return model.apply(variables, cache, tokens, method="decode_step")

  return step, model.apply(variables, encoder_hidden_states, encoder_attention_mask, max_length,
                           method="init_cache")


def _gpt2_padded_step(module, layers, token, index, positions, valid):
  """GPT2LMHeadModel one-token step (eval) with per-row position ids and a key-validity mask (left padding):
  token at cache slot ``index`` (B,), position id ``positions`` (B,); keys j ≤ index with ``valid[:, j]``
  (and the pseudo self-attention prefix slot, if any) are visible → (logits (B, V), layers)."""
  x = module.embed(token[:, None], positions[:, None])
  out = []
  for block, cache in zip(module.h, layers):
    x, cache = block.step(x, cache, index, valid)
    out.append(cache)
  return module.head(module.ln_f(x))[:, 0], out


def gpt2_step_fns(model: nn.Module, variables: Any, input_ids: jax.Array, attention_mask: jax.Array | None,
                  max_length: int, *, prefix: jax.Array | None = None) -> tuple[StepFn, Any]:
  """(step_fn → logits, init_state) of a ``layers.gpt2.GPT2LMHeadModel`` continuing the (left-padded) prompt
  ``input_ids`` (B, L0) with ``attention_mask`` (B, L0) 0/1 (None = all ones), as HF ``generate``: position ids
  ``cumsum(mask) − 1`` (0 at pads), then +1 per generated token; padded prompt keys are never visible.
  ``prefix`` (B, Dz): the pseudo self-attention conditioning vector. The prompt's first L0 − 1 tokens are fed here
  (token by token, cached); pass ``prompt=input_ids`` to hf_beam_search / hf_greedy, whose first call feeds the
  last prompt token."""
  b, l0 = input_ids.shape
  mask = jnp.ones((b, l0), jnp.int32) if attention_mask is None else jnp.asarray(attention_mask).astype(jnp.int32)
  prompt_pos = jnp.where(mask > 0, jnp.cumsum(mask, axis=1) - 1, 0)
  after = prompt_pos[:, -1:] + jnp.arange(1, max_length - l0 + 1)[None]
  cache = model.apply(variables, b, max_length, prefix, method="init_cache")
  state = {"layers": cache["layers"], "index": jnp.zeros((b,), jnp.int32),
           "positions": jnp.concatenate([prompt_pos, after], axis=1).astype(jnp.int32),
           "valid": jnp.ones((b, max_length), jnp.int32).at[:, :l0].set(mask)}

  def step(state, tokens):
    index = state["index"]
    positions = jnp.take_along_axis(state["positions"], index[:, None], axis=1)[:, 0]
    logits, layers = model.apply(variables, state["layers"], tokens, index, positions, state["valid"],
                                 method=_gpt2_padded_step)
    return logits, {**state, "layers": layers, "index": index + 1}

  if l0 > 1:
    state, _ = jax.lax.scan(lambda s, tok: (step(s, tok)[1], None), state,
                            jnp.asarray(input_ids)[:, :-1].T.astype(jnp.int32))
  return step, state
