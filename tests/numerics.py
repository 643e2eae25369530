"""Numerical comparison for the parity tests: plain bounds, and the float64 noise-floor rule where float32 cannot
meet them (JAX must then be at most 1.5× as far from the float64 result as torch float32 is)."""

from __future__ import annotations

import numpy as np


def _rel(got, want) -> tuple[float, float]:
  """(max|got − want|, that divided by max|want|)."""
  diff = float(np.max(np.abs(got - want))) if got.size else 0.0
  return diff, diff / max(float(np.max(np.abs(want))) if want.size else 0.0, 1e-30)


def check(name: str, got, want, *, rtol: float | None = None, atol: float | None = None, exact=None) -> float:
  """Asserts max|got − want| ≤ atol, or ≤ rtol·max|want|; prints and returns the measured max abs diff.

  ``exact``: the float64 torch result, for the float32 noise floor. Where the plain bound fails, JAX passes only
  if it is as accurate as torch float32 itself: its error against ``exact`` (abs with ``atol``, rel with
  ``rtol``) at most 1.5× torch float32's own.
  """
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (name, got.shape, want.shape)
  diff, rel = _rel(got, want)
  scale = float(np.max(np.abs(want))) if want.size else 0.0
  noise = ""
  if exact is not None:
    exact = np.asarray(exact, np.float64)
    (jax_abs, jax_rel), (torch_abs, torch_rel) = _rel(got, exact), _rel(want, exact)
    noise = (f"; vs float64: jax max_abs={jax_abs:.3e} rel={jax_rel:.3e}, torch32 max_abs={torch_abs:.3e} "
             f"rel={torch_rel:.3e}")
  print(f"PARITY {name}: max_abs={diff:.3e} rel={rel:.3e} (max|ref|={scale:.3e}){noise}")
  if (atol is None or diff <= atol) and (rtol is None or rel <= rtol):
    return diff
  assert exact is not None, f"{name}: max abs diff {diff:.3e}, relative {rel:.3e} > atol {atol} / rtol {rtol}"
  jax_err, torch_err = (jax_abs, torch_abs) if atol is not None else (jax_rel, torch_rel)
  assert jax_err <= 1.5 * torch_err, (
      f"{name}: max abs diff {diff:.3e} (rel {rel:.3e}) exceeds atol {atol} / rtol {rtol}, and JAX is further "
      f"from float64 ({jax_err:.3e}) than 1.5× torch float32 ({torch_err:.3e})")
  return diff


def residuals(loss_fn, params) -> list:
  """The arrays (``ShapeDtypeStruct`` s) the backward pass of ``loss_fn(params)`` keeps: what ``jax.vjp`` closes
  over; shapes only, nothing is computed."""
  import jax  # pylint: disable=g-import-not-at-top

  return jax.eval_shape(lambda p: jax.tree.leaves(jax.vjp(loss_fn, p)[1]), params)


def residual_bytes(loss_fn, params) -> int:
  """Bytes of ``residuals(loss_fn, params)``."""
  return sum(r.size * r.dtype.itemsize for r in residuals(loss_fn, params))
