"""Beam search / greedy (rrg_jax.decoding) against a plain numpy transcription of spec §9 (the official loop, no
early exit), with toy step functions whose log-probs depend on the whole prefix; exact ties (quarter-integer
log-probs), EOS-heavy and EOS-free tables exercise the tie order, the −1000 penalty and forced termination.
The CAMANet cached and full-prefix flavours must give identical tokens (tiny config)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from rrg_jax import decoding

MOD = 97  # history hash modulus


def make_table(seed: int, vocab: int, rows: int, eos_bias: float) -> np.ndarray:
  """(rows, K) float32 log-probs in {0, -0.25, ..., -3}: many exact ties; EOS shifted by ``eos_bias``."""
  rng = np.random.default_rng(seed)
  t = -rng.integers(0, 13, size=(rows, vocab)).astype(np.float32) / 4
  t[:, 0] = np.minimum(t[:, 0] + eos_bias, 0.0)
  return t


def toy_step(table: np.ndarray):
  """Step function whose next-token log-probs are ``table[hash(prefix) % rows]``: state ``h`` (N,) int32."""
  table = jnp.asarray(table)

  def step(h, tokens):
    h = (h * 31 + tokens + 1) % MOD
    return table[h % table.shape[0]], h

  return step


def ref_hash(prefix: list[int]) -> int:
  h = 0
  for tok in prefix:
    h = (h * 31 + tok + 1) % MOD
  return h


def ref_beam_search(table: np.ndarray, batch: int, init_h: np.ndarray, beam_size: int, max_len: int):
  """Spec §9 literally, in float32 numpy (lists of finished hypotheses, python ``max`` = first of equal scores)."""
  rows, k = table.shape
  f32 = np.float32
  out_tokens, out_scores = np.zeros((batch, max_len), np.int32), np.zeros((batch,), np.float32)
  for b in range(batch):
    def logp(seq):  # log-probs after feeding BOS + seq, history hash started at init_h[b]
      h = int(init_h[b])
      for tok in [0] + seq:
        h = (h * 31 + tok + 1) % MOD
      return table[h % rows]

    beams = [([], f32(0.0))]
    cur = [logp([])]
    done = []
    for t in range(max_len):
      cand = np.concatenate([(s + lp).astype(f32) for (_, s), lp in zip(beams, cur)])
      order = np.argsort(-cand, kind="stable")[:beam_size]
      beams = [(beams[i // k][0] + [int(i % k)], cand[i]) for i in order]
      new = []
      for seq, s in beams:
        if seq[-1] == 0 or t == max_len - 1:
          done.append((float(s), seq))
          s = f32(s - f32(1000.0))
        new.append((seq, s))
      beams = new
      cur = [logp(seq) for seq, _ in beams]
    score, seq = max(done, key=lambda x: x[0])
    out_tokens[b, :len(seq)] = seq
    out_scores[b] = score
  return out_tokens, out_scores


def ref_greedy(table, batch, init_h, max_len):
  rows = table.shape[0]
  out_tokens, out_scores = np.zeros((batch, max_len), np.int32), np.zeros((batch,), np.float32)
  for b in range(batch):
    h, s, tok = int(init_h[b]), np.float32(0.0), 0
    for t in range(max_len):
      h = (h * 31 + tok + 1) % MOD
      lp = table[h % rows]
      tok = int(np.argmax(lp))
      s = np.float32(s + lp[tok])
      out_tokens[b, t] = tok
      if tok == 0:
        break
    out_scores[b] = s
  return out_tokens, out_scores


CASES = [  # (seed, vocab, rows, eos_bias, beam, max_len, batch)
    (0, 7, 13, 0.0, 3, 8, 16),
    (1, 5, 11, 2.0, 3, 10, 16),     # EOS-heavy: beams die early, dead beams get selected
    (2, 6, 17, -3.0, 3, 6, 8),      # EOS-free: forced termination at max_len
    (3, 30, 23, 0.5, 3, 12, 8),
    (4, 4, 7, 1.0, 2, 9, 16),
    (5, 3, 5, 0.25, 3, 7, 16),      # K == beam_size
    (6, 9, 29, 0.0, 1, 8, 8),
    (7, 4, 3, 1.5, 3, 12, 32),      # few distinct rows: simultaneous equal-score endings
]


@pytest.mark.parametrize("seed,vocab,rows,eos_bias,beam,max_len,batch", CASES)
@pytest.mark.parametrize("early_exit", [True, False])
def test_beam_search_matches_reference(seed, vocab, rows, eos_bias, beam, max_len, batch, early_exit):
  table = make_table(seed, vocab, rows, eos_bias)
  init_h = np.random.default_rng(seed + 100).integers(0, MOD, size=batch).astype(np.int32)
  fn = jax.jit(functools.partial(decoding.beam_search, toy_step(table), beam_size=beam, max_len=max_len,
                                 batch_size=batch, early_exit=early_exit))
  tokens, scores, _ = fn(jnp.asarray(init_h))
  want_tokens, want_scores = ref_beam_search(table, batch, init_h, beam, max_len)
  np.testing.assert_array_equal(np.asarray(tokens), want_tokens)
  np.testing.assert_array_equal(np.asarray(scores), want_scores)


def test_reference_cases_cover_the_special_paths():
  """The table cases really produce empty reports, forced (EOS-less) endings and EOS endings."""
  kinds = set()
  for seed, vocab, rows, eos_bias, beam, max_len, batch in CASES:
    table = make_table(seed, vocab, rows, eos_bias)
    init_h = np.random.default_rng(seed + 100).integers(0, MOD, size=batch).astype(np.int32)
    tokens, _ = ref_beam_search(table, batch, init_h, beam, max_len)
    for row in tokens:
      kinds.add("empty" if row[0] == 0 else "forced" if row[-1] != 0 else "eos")
  assert kinds == {"empty", "forced", "eos"}


@pytest.mark.parametrize("seed,vocab,rows,eos_bias,max_len", [(0, 7, 13, 0.0, 8), (1, 5, 11, 1.0, 10),
                                                              (2, 6, 17, -3.0, 6)])
def test_greedy_matches_argmax_reference(seed, vocab, rows, eos_bias, max_len):
  batch = 6
  table = make_table(seed, vocab, rows, eos_bias)
  init_h = np.random.default_rng(seed).integers(0, MOD, size=batch).astype(np.int32)
  tokens, scores, _ = jax.jit(functools.partial(decoding.greedy, toy_step(table), batch_size=batch,
                                             max_len=max_len))(jnp.asarray(init_h))
  want_tokens, want_scores = ref_greedy(table, batch, init_h, max_len)
  np.testing.assert_array_equal(np.asarray(tokens), want_tokens)
  np.testing.assert_array_equal(np.asarray(scores), want_scores)


def test_early_exit_stops_once_no_hypothesis_can_win():
  """EOS-certain table: the best beam ends at step 0, so one step suffices; without early exit all run."""
  table = np.full((1, 5), -2.0, np.float32)
  table[:, 0] = 0.0
  for early_exit, steps in ((True, 1), (False, 50)):
    out = jax.jit(functools.partial(decoding.beam_search, toy_step(table), batch_size=2, beam_size=3, max_len=50,
                                    early_exit=early_exit))(jnp.zeros((2,), jnp.int32))
    assert int(out.steps) == steps
    np.testing.assert_array_equal(np.asarray(out.tokens), 0)
    np.testing.assert_array_equal(np.asarray(out.scores), 0.0)


# --- CAMANet adapter ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_camanet():
  """Tiny CAMANet (2 views, K = 12, T = 12) with a sharper output layer, and a random decoder memory (6, 8, 32)
  that makes the six hypotheses differ (empty, EOS-ended and forced endings)."""
  from rrg_jax import models  # pylint: disable=g-import-not-at-top

  config = tiny_config(num_views=2, vocab_size=12)
  config.data.max_seq_length = 12
  model = models.get_model(config.model)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(2, 2, 64, 64, 3)), jnp.float32)
  variables = jax.jit(functools.partial(model.init, train=False))(
      {"params": jax.random.key(0), "dropout": jax.random.key(1)}, images, jnp.zeros((2, 12), jnp.int32),
      jnp.ones((2, 12)))
  variables = jax.tree_util.tree_map_with_path(
      lambda p, x: x * 4 if "'logit'" in jax.tree_util.keystr(p) and x.ndim == 2 else x, variables)
  memory = jnp.asarray(3 * rng.normal(size=(6, 8, 32)), jnp.float32)
  return config, model, variables, images, memory


@pytest.mark.parametrize("beam_size", [3, 1])
def test_camanet_cached_equals_full_prefix(tiny_camanet, beam_size):
  config, model, variables, _, memory = tiny_camanet
  outs = []
  for cached in (True, False):
    step_fn, state = decoding.encoder_decoder_step_fns(model, variables, memory, 12, cached=cached)
    outs.append(jax.device_get(jax.jit(functools.partial(
        decoding.beam_search, step_fn, batch_size=6, beam_size=beam_size, max_len=12))(state)))
  np.testing.assert_array_equal(outs[0].tokens, outs[1].tokens)
  np.testing.assert_allclose(outs[0].scores, outs[1].scores, rtol=1e-5)
  if beam_size == 3:
    ends = {"empty" if r[0] == 0 else "forced" if r[-1] != 0 else "eos" for r in outs[0].tokens}
    assert ends == {"empty", "forced", "eos"}


def test_camanet_beam_equals_reference_over_decode_full(tiny_camanet):
  """The cached search equals the numpy spec-§9 loop driven by ``decode_full`` on each prefix (BOS + prefix,
  zero padded to T: the decoder is causal; all images and beams in one call per step)."""
  config, model, variables, _, memory = tiny_camanet
  t, nb, beam = 12, memory.shape[0], 3
  step_fn, state = decoding.encoder_decoder_step_fns(model, variables, memory, t, cached=True)
  got = np.asarray(decoding.beam_search(step_fn, state, nb, beam_size=beam, max_len=t).tokens)
  decode = jax.jit(lambda mem, seq: model.apply(variables, mem, seq, method="decode_full")[0])

  def logps(beams_per_image, width):  # (nb, width, K) next-token log-probs after BOS + each beam's prefix
    prefixes = [seq for beams in beams_per_image for seq, _ in beams]
    seqs = np.zeros((len(prefixes), t), np.int32)
    for n, seq in enumerate(prefixes):
      seqs[n, 1:len(seq) + 1] = seq
    out = np.asarray(decode(jnp.repeat(memory, width, axis=0), jnp.asarray(seqs)))
    return out[np.arange(len(prefixes)), [len(seq) for seq in prefixes]].reshape(nb, width, -1)

  beams = [[([], np.float32(0))] for _ in range(nb)]
  cur, done = logps(beams, 1), [[] for _ in range(nb)]
  for step in range(t):
    for b in range(nb):
      k = cur.shape[-1]
      cand = np.concatenate([(s + lp).astype(np.float32) for (_, s), lp in zip(beams[b], cur[b])])
      order = np.argsort(-cand, kind="stable")[:beam]
      beams[b] = [(beams[b][i // k][0] + [int(i % k)], cand[i]) for i in order]
      for n, (seq, s) in enumerate(beams[b]):
        if seq[-1] == 0 or step == t - 1:
          done[b].append((float(s), seq))
          beams[b][n] = (seq, np.float32(s - np.float32(1000)))
    if step < t - 1:
      cur = logps(beams, beam)
  for b in range(nb):
    best = max(done[b], key=lambda x: x[0])[1]
    np.testing.assert_array_equal(got[b, :len(best)], best)
    assert not got[b, len(best):].any()


def test_system_generate_outputs(tiny_camanet):
  config, model, variables, images, _ = tiny_camanet
  from rrg_jax import models  # pylint: disable=g-import-not-at-top

  out = jax.device_get(models.get_system(config).generate(variables, {"images": images}, with_attention=True))
  enc = model.apply(variables, images, method="encode")
  step_fn, state = decoding.encoder_decoder_step_fns(model, variables, enc["memory"], 12, cached=False)
  want = decoding.beam_search(step_fn, state, 2, beam_size=3, max_len=12)
  np.testing.assert_array_equal(out["tokens"], np.asarray(want.tokens))
  assert out["tokens"].shape == (2, 12) and out["tokens"].dtype == np.int32
  np.testing.assert_allclose(out["probs"], np.asarray(enc["probs"]), rtol=1e-6)
  assert out["vdm"].shape == (2, 8) and out["word_attention"].shape == (2, 12, 8)
  np.testing.assert_allclose(out["word_attention"].sum(-1), 1.0, rtol=1e-5)  # head-mean of softmax rows
