"""The R2Gen encoder-decoder's source key mask (``src_mask`` / an encoder's ``memory_mask``; Align2Gen's empty
lesion slots): hiding memory tokens gives exactly what the model computes without them — in the encoder, the
teacher-forced decoder, the KV-cached and full-prefix decoding steps, and beam search."""

import jax
import jax.numpy as jnp
import numpy as np

from conftest import tiny_r2gen_config
from numerics import check
from rrg_jax import decoding, models


def _model():
  c = tiny_r2gen_config(vocab_size=30)
  system = models.get_system(c)
  return system.module, system.init(jax.random.key(0))


def test_masked_memory_tokens_equal_their_removal():
  model, variables = _model()
  rng = np.random.default_rng(0)
  b, n, hidden = 3, 7, 2  # the last `hidden` tokens of every row are masked out
  feats = jnp.asarray(rng.normal(size=(b, n, 64)), jnp.float32)  # the tiny ResNet-18 width
  mask = jnp.arange(n)[None].repeat(b, 0) < n - hidden
  enc = jax.jit(lambda x, m: model.apply(variables, x, m, method=lambda mod, x, m: mod.encoder_decoder.encode(x, m)))
  with jax.default_matmul_precision("highest"):
    full, kept = enc(feats, mask), enc(feats[:, :n - hidden], None)
    check("masked encoder = encoder without the tokens", full[:, :n - hidden], kept, rtol=1e-6)
    targets = jnp.asarray(rng.integers(1, 30, size=(b, 6)), jnp.int32).at[:, 0].set(0)
    tf = jax.jit(lambda mem, m: model.apply(variables, mem, targets, train=False, src_mask=m,
                                            method=lambda mod, *a, **k: mod.teacher_forced(*a, **k)[0]))
    check("masked teacher-forced log-probs", tf(full, mask), tf(kept, None), rtol=1e-5)
    seq = targets[:, :5]
    logp_full, _ = jax.jit(lambda: model.apply(variables, full, seq, src_mask=mask, method="decode_full"))()
    cache = jax.jit(lambda: model.apply(variables, full, 5, mask, method="init_decode_cache"))()
    step_fn = jax.jit(lambda c, tok: model.apply(variables, full, c, tok, method="decode_step"))
    for t in range(5):
      step, cache, attn = step_fn(cache, seq[:, t])
      check(f"masked cached step {t}", step, logp_full[:, t], rtol=1e-5)
      assert float(jnp.max(attn[..., n - hidden:])) == 0.0  # no attention on hidden tokens
    # beam search through the step functions: the full-prefix one (the cached one's step is checked above)
    fns = [decoding.encoder_decoder_step_fns(model, variables, mem, 6, cached=False, memory_mask=m)
           for mem, m in ((full, mask), (kept, None))]
    search = lambda f, s: jax.jit(lambda s: decoding.beam_search(f, s, b, beam_size=2, max_len=6))(s)
    got, want = (search(f, s) for f, s in fns)
    np.testing.assert_array_equal(got.tokens, want.tokens)
