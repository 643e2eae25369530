"""Heatmap figures (matplotlib, Agg): the visual discriminative map (VDM) over each view, the decoder
cross-attention of chosen words (paper Fig. 7/8 style), each with a colour bar, and a classifier's attention over
the report's words.

Token layout (``layers.views.view_tokens``): ``N = V·h·w`` patch tokens, views concatenated, each view's
``h × w`` grid row-major; eval images are square, so ``h = w = sqrt(N / V)``. Maps are bilinearly upsampled onto
the image the model saw (the eval transform's ``image_size`` square).
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402

SKIP_WORDS = frozenset({".", "<unk>"})


def view_grids(values: np.ndarray, num_views: int) -> np.ndarray:
  """Token values (N,) → (V, h, w) per-view grids."""
  values = np.asarray(values, np.float32)
  side = math.isqrt(values.shape[0] // num_views)
  if num_views * side * side != values.shape[0]:
    raise ValueError(f"{values.shape[0]} tokens do not form {num_views} square grid(s).")
  return values.reshape(num_views, side, side)


def upsample(grid: np.ndarray, size: int) -> np.ndarray:
  """(h, w) → (size, size) bilinear (PIL, float32)."""
  return np.asarray(PIL.Image.fromarray(np.asarray(grid, np.float32)).resize((size, size), PIL.Image.BILINEAR))


def top_words(words: Sequence[str], attention: np.ndarray, vdm: np.ndarray | None, n: int) -> list[int]:
  """Positions of the ``n`` generated words whose cross-attention map (L, N) is most similar (cosine) to the
  VDM (N,) — or, without a VDM, whose attention is most focused (highest peak) — skipping ``.`` and ``<unk>``;
  in report order."""
  attention = np.asarray(attention[:len(words)], np.float64)
  if vdm is None:
    sim = attention.max(axis=1) if len(words) else np.zeros((0,))
  else:
    vdm = np.asarray(vdm, np.float64)
    denom = np.linalg.norm(attention, axis=1) * max(np.linalg.norm(vdm), 1e-12)
    sim = attention @ vdm / np.maximum(denom, 1e-12)
  order = [i for i in np.argsort(-sim, kind="stable") if words[i] not in SKIP_WORDS]
  return sorted(order[:n])


def _panel(ax, image: PIL.Image.Image, heat: np.ndarray, title: str, vmin: float, vmax: float):
  ax.imshow(np.asarray(image.convert("L")), cmap="gray")
  im = ax.imshow(upsample(heat, image.size[0]), cmap="jet", alpha=0.45, vmin=vmin, vmax=vmax)
  ax.set_title(title, fontsize=10)
  ax.axis("off")
  return im


def save_vdm(images: Sequence[PIL.Image.Image], vdm: np.ndarray, path: str | pathlib.Path) -> pathlib.Path:
  """One panel per view: the VDM (N,) in [0, 1] over the (square, model-sized) view images."""
  grids = view_grids(vdm, len(images))
  fig, axes = plt.subplots(1, len(images), figsize=(4.2 * len(images), 4.2), squeeze=False)
  for v, (ax, image) in enumerate(zip(axes[0], images)):
    im = _panel(ax, image, grids[v], f"VDM, view {v}", 0.0, 1.0)
  fig.colorbar(im, ax=axes[0].tolist(), fraction=0.046, pad=0.04)
  return _save(fig, path)


def save_word_attention(images: Sequence[PIL.Image.Image], words: Sequence[str], attention: np.ndarray,
                        positions: Sequence[int], path: str | pathlib.Path) -> pathlib.Path:
  """Rows = the chosen word positions, columns = views: the word's cross-attention (L, N) over the views, on one
  colour scale spanning the drawn maps (attention probability, head mean)."""
  rows = [view_grids(attention[i], len(images)) for i in positions]
  if not rows:
    raise ValueError("No words to draw (the report is empty or only punctuation).")
  vmin, vmax = float(min(r.min() for r in rows)), float(max(r.max() for r in rows))
  fig, axes = plt.subplots(len(rows), len(images), figsize=(4.2 * len(images), 4.0 * len(rows)), squeeze=False)
  for r, (pos, grids) in enumerate(zip(positions, rows)):
    for v, image in enumerate(images):
      im = _panel(axes[r, v], image, grids[v], f'"{words[pos]}" (word {pos + 1}), view {v}', vmin, vmax)
  fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.046, pad=0.04, label="cross-attention")
  return _save(fig, path)


def save_boxes(image: PIL.Image.Image, xyxy: np.ndarray, width: int, height: int, path: str | pathlib.Path
               ) -> pathlib.Path:
  """The image with its boxes xyxy (K, 4), given in a ``width`` × ``height`` annotation frame (scaled to the
  image), numbered in slot order."""
  from matplotlib import patches  # pylint: disable=g-import-not-at-top

  sx, sy = image.size[0] / width, image.size[1] / height
  fig, ax = plt.subplots(figsize=(5.0, 5.0 * image.size[1] / image.size[0]))
  ax.imshow(np.asarray(image.convert("L")), cmap="gray")
  for k, (x0, y0, x1, y1) in enumerate(np.asarray(xyxy, np.float64)):
    ax.add_patch(patches.Rectangle((x0 * sx, y0 * sy), (x1 - x0) * sx, (y1 - y0) * sy, fill=False, lw=2,
                                   edgecolor="yellow"))
    ax.text(x0 * sx + 3, y0 * sy + 12, str(k + 1), color="yellow", fontsize=10)
  ax.set_title(f"{len(xyxy)} box(es)", fontsize=10)
  ax.axis("off")
  return _save(fig, path)


def save_report_attention(words: Sequence[str], weights: np.ndarray, path: str | pathlib.Path,
                          per_row: int = 16) -> pathlib.Path:
  """The attention a classifier paid to each word of the report (``weights`` (n,) aligned with ``words``, e.g.
  RadGen's fusion cross-attention, head mean) as a strip of cells, ``per_row`` words a row, one colour scale."""
  if not len(words):
    raise ValueError("No words to draw (the report is empty).")
  w = np.asarray(weights, np.float64)[:len(words)]
  rows = math.ceil(len(words) / per_row)
  grid = np.full((rows, per_row), np.nan)
  grid.flat[:len(words)] = w
  fig, ax = plt.subplots(figsize=(0.9 * per_row, 0.8 * rows + 0.8))
  im = ax.imshow(grid, cmap="viridis", vmin=float(w.min()), vmax=float(w.max()), aspect="auto")
  for i, word in enumerate(words):
    ax.text(i % per_row, i // per_row, word, ha="center", va="center", fontsize=8, rotation=30,
            color="white" if w[i] < (w.min() + w.max()) / 2 else "black")
  ax.set_xticks([])
  ax.set_yticks([])
  ax.set_title("attention over the report's words", fontsize=10)
  fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label="cross-attention")
  return _save(fig, path)


def _save(fig, path: str | pathlib.Path) -> pathlib.Path:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=100, bbox_inches="tight")
  plt.close(fig)
  return path
