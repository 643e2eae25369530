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
