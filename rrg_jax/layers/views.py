"""Multi-view image studies: one backbone applied to each view, the views' patch tokens concatenated."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def view_tokens(backbone: Callable[..., jax.Array], images: jax.Array, train: bool
                ) -> tuple[jax.Array, list[jax.Array]]:
  """images (B, V, H, W, 3) → (tokens (B, V·h·w, C), per-view global average pools [(B, C) float32] × V).

  ``backbone(x (B, H, W, 3), train) -> (B, h, w, C)`` is called separately per view, view 0 first — each call
  has its own BatchNorm batch statistics and running-statistics update, as the R2Gen-family originals do. Tokens
  are row-major per view (the original's ``reshape(B, C, h·w).permute(0, 2, 1)``), views concatenated in order.
  """
  tokens, pools = [], []
  for v in range(images.shape[1]):
    f = backbone(images[:, v], train)
    tokens.append(f.reshape(f.shape[0], -1, f.shape[-1]))
    pools.append(jnp.mean(f.astype(jnp.float32), axis=(1, 2)))
  return jnp.concatenate(tokens, axis=1), pools
