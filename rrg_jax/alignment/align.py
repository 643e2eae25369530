"""[RECON] Align2Gen's alignment blocks GAB and LAB (spec align2gen_spec.md §6.3–6.6), as pure functions.

[RECON] reconstruction, not the paper's published code: the official ``modulesS/alignment.py`` (class ``Align``)
was never committed. What is built here is the spec's reconstruction from the reserved hyper-parameters, which are
verbatim NAAF's / SCAN's: NAAF's training-time fragment score with a fixed boundary τ (``thres``) and the VSE++
hardest-negative ranking loss.

Shapes: one pair is text units ``X`` (m, d) with mask (m,) and visual units ``Y`` (n, d) with mask (n,); a batch
is text (B_t, m, d) and visual (B_v, n, d). Score matrices have **rows = images, columns = texts** (§6.3):
``Sim[i, j] = Sim(text units of j, visual units of i)``. Masked-out units take no part in any sum, maximum or
softmax; an empty set gives a finite 0 (with finite gradients), so padded images and texts can stay in a batch
under jit and be masked out of the loss.

Three L2-normalisation conventions (§14 item 28): ``normalize`` = torch ``F.normalize`` (x / max(‖x‖, 1e-12),
BERT tokens); ``l2norm`` = NAAF/SCAN's x / (‖x‖ + 1e-8) (visual units, sentence vectors); the NAAF cosine divides
by the context norm only. Norms have gradient 0 at a zero vector (a plain ``sqrt`` gives NaN there).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NAAF_EPS = 1e-8       # NAAF/SCAN's l2norm, softmax-denominator, relevance-normaliser and cosine epsilon
NORMALIZE_EPS = 1e-12  # torch F.normalize's default
LEAKY_SLOPE = 0.1
SIMILARITIES = ("naaf", "scan")
REDUCTIONS = ("sum", "mean")


def safe_norm(x: jax.Array, axis: int = -1, keepdims: bool = True) -> jax.Array:
  """‖x‖₂ over ``axis`` with gradient 0 (not NaN) where x = 0."""
  sq = jnp.sum(x * x, axis=axis, keepdims=keepdims)
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def normalize(x: jax.Array, axis: int = -1, eps: float = NORMALIZE_EPS) -> jax.Array:
  """torch ``F.normalize(x, dim=axis, eps)``: x / max(‖x‖, eps)."""
  return x / jnp.maximum(safe_norm(x, axis), eps)


def l2norm(x: jax.Array, axis: int = -1, eps: float = NAAF_EPS) -> jax.Array:
  """NAAF / SCAN ``l2norm``: x / (‖x‖ + eps)."""
  return x / (safe_norm(x, axis) + eps)


def _masked_softmax(logits: jax.Array, mask: jax.Array) -> jax.Array:
  """Softmax over the last axis restricted to ``mask`` (broadcast); all-masked rows give 0."""
  m = jnp.max(jnp.where(mask, logits, -jnp.inf), axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  e = jnp.where(mask, jnp.exp(jnp.where(mask, logits - m, 0.0)), 0.0)
  return e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), jnp.finfo(e.dtype).tiny)


def _prepare(text, text_mask, visual, visual_mask, imgnorm):
  """(A = X Yᵀ (m, n), Y, word mask (m, 1), visual mask (1, n)) in float32."""
  x = text.astype(jnp.float32)
  y = visual.astype(jnp.float32)
  if imgnorm:
    y = l2norm(y)
  a = x @ y.T
  return x, y, a, text_mask[:, None].astype(bool), visual_mask[None, :].astype(bool)


def _relevance(a: jax.Array, tmask: jax.Array, vmask: jax.Array, lambda_softmax: float) -> jax.Array:
  """NAAF step 3 / SCAN's attention: r_wn = softmax_n(λ ĝ_wn), ĝ = LeakyReLU₀.₁(A) normalised over the valid
  words of each visual unit (÷ (√Σ_w g² + 1e-8)). (m, n), zero on masked visual units."""
  g = jnp.where(tmask, jax.nn.leaky_relu(a, LEAKY_SLOPE), 0.0)
  g = g / (safe_norm(g, axis=0) + NAAF_EPS)
  return _masked_softmax(lambda_softmax * g, vmask)


def _masked_mean(s: jax.Array, tmask: jax.Array) -> jax.Array:
  w = tmask[:, 0].astype(s.dtype)
  return jnp.sum(w * s) / jnp.maximum(jnp.sum(w), 1.0)


def naaf_similarity(text: jax.Array, text_mask: jax.Array, visual: jax.Array, visual_mask: jax.Array, *,
                    lambda_softmax: float = 20.0, thres: float = 0.0, imgnorm: bool = True) -> jax.Array:
  """[RECON] NAAF fragment score with a fixed boundary τ = ``thres`` (§6.3): text (m, d) (rows already unit-norm),
  text_mask (m,), visual (n, d), visual_mask (n,) → scalar float32.

  Per valid word w (A = X Yᵀ, Y l2norm'd unless ``imgnorm`` is False):
  neg_w = min(max_n (A_wn − τ), 0); q_wn = exp(λ(A_wn − τ)) on A_wn > τ, p = q / (Σ_n q + 1e-8),
  posf_w = ⟨X_w, Σ_n p_wn Y_n⟩ / max(‖Σ_n p_wn Y_n‖, 1e-8); posr_w = Σ_n A_wn r_wn (``_relevance``);
  Sim = mean over valid words of neg + posf + posr. p is computed in the overflow-free form
  exp(s − s*) / (Σ exp(s − s*) + 1e-8·exp(−s*)), s* = max(0, max_n s) (same value).
  """
  x, y, a, tmask, vmask = _prepare(text, text_mask, visual, visual_mask, imgnorm)
  d = a - thres
  rho = jnp.max(jnp.where(vmask, d, -jnp.inf), axis=1, keepdims=True)
  neg = jnp.where(jnp.isfinite(rho) & (rho < 0), rho, 0.0)
  pos = vmask & (d > 0)
  s = lambda_softmax * d
  s_max = jnp.max(jnp.where(pos, s, 0.0), axis=1, keepdims=True)
  q = jnp.where(pos, jnp.exp(jnp.where(pos, s - s_max, 0.0)), 0.0)
  p = q / (jnp.sum(q, axis=1, keepdims=True) + NAAF_EPS * jnp.exp(-s_max))
  c = p @ y
  posf = jnp.sum(x * c, axis=1, keepdims=True) / jnp.maximum(safe_norm(c), NAAF_EPS)
  posr = jnp.sum(a * _relevance(a, tmask, vmask, lambda_softmax), axis=1, keepdims=True)
  return _masked_mean((neg + posf + posr)[:, 0], tmask)


def scan_similarity(text: jax.Array, text_mask: jax.Array, visual: jax.Array, visual_mask: jax.Array, *,
                    lambda_softmax: float = 20.0, imgnorm: bool = True) -> jax.Array:
  """[RECON] ``similarity: scan`` variant (§6.3): s_w = cos(X_w, Σ_n r_wn Y_n) (SCAN's cosine,
  ⟨x, c⟩ / max(‖x‖·‖c‖, 1e-8)) with r of ``_relevance``; Sim = mean over valid words. Same arguments as
  ``naaf_similarity`` (no boundary)."""
  x, y, a, tmask, vmask = _prepare(text, text_mask, visual, visual_mask, imgnorm)
  c = _relevance(a, tmask, vmask, lambda_softmax) @ y
  cos = jnp.sum(x * c, axis=1) / jnp.maximum(safe_norm(x)[:, 0] * safe_norm(c)[:, 0], NAAF_EPS)
  return _masked_mean(cos, tmask)


def similarity_matrix(text: jax.Array, text_mask: jax.Array, visual: jax.Array, visual_mask: jax.Array, *,
                      method: str = "naaf", **kwargs) -> jax.Array:
  """Batch scores: text (B_t, m, d), text_mask (B_t, m), visual (B_v, n, d), visual_mask (B_v, n) →
  (B_v, B_t) float32, ``[i, j] = Sim(text j, image i)`` (rows = images). ``method`` ∈ ``SIMILARITIES``;
  ``kwargs`` go to ``naaf_similarity`` / ``scan_similarity``."""
  if method not in SIMILARITIES:
    raise ValueError(f"similarity method {method!r}; choose one of {SIMILARITIES}.")
  fn = naaf_similarity if method == "naaf" else scan_similarity

  def one_image(v, vm):
    return jax.vmap(lambda t, tm: fn(t, tm, v, vm, **kwargs))(text, text_mask)
  return jax.vmap(one_image)(visual, visual_mask)


def ranking_loss(sim: jax.Array, margin: float = 0.2, reduction: str = "sum",
                 mask: jax.Array | None = None) -> jax.Array:
  """[RECON] VSE++ / NAAF hardest-negative bidirectional hinge (§6.6) on sim (B, B) (rows images, positives on
  the diagonal): Σ_i max_{j≠i} [μ + S_ij − S_ii]₊ + Σ_j max_{i≠j} [μ + S_ij − S_jj]₊.

  ``mask`` (B,) bool keeps only those images/texts, as anchors and as negatives (jit-compatible: the LAB
  restriction of ``lab_mask``); fewer than 2 kept → 0. ``reduction`` "sum" (NAAF) or "mean" (÷ kept images).
  """
  if reduction not in REDUCTIONS:
    raise ValueError(f"ranking-loss reduction {reduction!r}; choose one of {REDUCTIONS}.")
  sim = sim.astype(jnp.float32)
  b = sim.shape[0]
  keep = jnp.ones((b,), bool) if mask is None else mask.astype(bool)
  pairs = keep[:, None] & keep[None, :] & ~jnp.eye(b, dtype=bool)
  diag = jnp.diagonal(sim)
  cost_text = jnp.where(pairs, jax.nn.relu(margin + sim - diag[:, None]), 0.0)   # image i anchor, texts j ≠ i
  cost_image = jnp.where(pairs, jax.nn.relu(margin + sim - diag[None, :]), 0.0)  # text j anchor, images i ≠ j
  loss = jnp.sum(jnp.max(cost_text, axis=1)) + jnp.sum(jnp.max(cost_image, axis=0))
  if reduction == "mean":
    loss = loss / jnp.maximum(jnp.sum(keep), 1)
  return loss


def lab_mask(region_valid: jax.Array, sentence_mask: jax.Array) -> jax.Array:
  """[RECON] LAB's image restriction (§6.5): region_valid (B, M), sentence_mask (B, S) → (B,) bool, images with
  ≥ 1 valid region and a report with ≥ 1 sentence."""
  return jnp.any(region_valid, axis=-1) & jnp.any(sentence_mask, axis=-1)


def sentence_vectors(token_emb: jax.Array, token_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """[RECON] LAB text units (§6.5): token embeddings (..., T, d), token mask (..., T) → (l2norm of the mean of
  the non-pad tokens (..., d) float32, sentence mask (...,) = has ≥ 1 token). An empty sentence gives 0."""
  w = token_mask.astype(jnp.float32)[..., None]
  total = jnp.sum(w * token_emb.astype(jnp.float32), axis=-2)
  mean = total / jnp.maximum(jnp.sum(w, axis=-2), 1.0)
  return l2norm(mean), jnp.any(token_mask, axis=-1)


def alignment_loss(text: jax.Array, text_mask: jax.Array, visual: jax.Array, visual_mask: jax.Array, *,
                   image_mask: jax.Array | None = None, method: str = "naaf", margin: float = 0.2,
                   reduction: str = "sum", **kwargs) -> jax.Array:
  """[RECON] One alignment branch's loss: ``ranking_loss(similarity_matrix(...), margin, reduction,
  image_mask)`` with text (B, m, d) / visual (B, n, d) of the same B images (pair b = positive).
  GAB: text = report tokens, visual = patch_feats (all valid), no image mask. LAB: text = ``sentence_vectors``,
  visual = region_feats with the region validity, ``image_mask = lab_mask(...)``."""
  sim = similarity_matrix(text, text_mask, visual, visual_mask, method=method, **kwargs)
  return ranking_loss(sim, margin, reduction, image_mask)
