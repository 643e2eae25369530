"""Heatmap figures (matplotlib, Agg): the visual discriminative map (VDM) over each view, the decoder
cross-attention of chosen words (paper Fig. 7/8 style), each with a colour bar, and a classifier's attention over
the report's words; and, for CT-AGRG, a CT volume's axial / coronal slice montage with the detected abnormalities.

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


# CT volumes (CT-AGRG, ``ct_agrg_spec.md`` 2.2/2.3): float32 (D, H, W) in "SLP" orientation — axis 0 inferior →
# superior, axis 1 patient right → left, axis 2 anterior → posterior — at (1.5, 0.75, 0.75) mm, in Hounsfield units
# or the model's normalised intensities (clip(HU, -1000, 200) + 1000) / 1200 - 0.449. Drawn in the radiological
# convention (patient right on the image's left) with one window spanning the model's clip range [-1000, 200] HU.
CT_HU_WINDOW = (-1000.0, 200.0)
CT_NORMALISED_WINDOW = (-0.449, 0.551)
CT_SPACING = (1.5, 0.75, 0.75)


def _ct_volume(volume: np.ndarray) -> np.ndarray:
  """(D, H, W) as an array (no copy, any dtype); ValueError naming the shape unless 3-D with every axis ≥ 1."""
  volume = np.asarray(volume)
  if volume.ndim != 3 or min(volume.shape) < 1:
    raise ValueError(f"A CT volume must be a 3-D array (D, H, W) with every axis >= 1, got shape {volume.shape}.")
  return volume


def ct_axial_view(volume: np.ndarray, z: int) -> np.ndarray:
  """The axial slice ``volume[z]`` (H, W) as shown: (W, H), rows anterior → posterior (anterior at the top),
  columns patient right → left (right on the image's left); float32."""
  return np.asarray(_ct_volume(volume)[z], np.float32).T


def ct_coronal_view(volume: np.ndarray, y: int) -> np.ndarray:
  """The coronal slice ``volume[:, :, y]`` (D, H) as shown: (D, H), rows superior → inferior (superior at the
  top), columns patient right → left; float32."""
  return np.asarray(_ct_volume(volume)[::-1, :, y], np.float32)


def ct_slice_indices(n: int, count: int) -> list[int]:
  """``count`` evenly spaced (``np.linspace``, rounded) indices into an axis of length ``n`` ≥ 1, leaving out the
  outermost 10% at each end (``⌊0.1·n⌋`` indices); one slice is the middle one; may repeat when ``count`` exceeds
  the indices left."""
  lo, hi = int(0.1 * n), n - 1 - int(0.1 * n)
  points = np.linspace(lo, hi, count) if count != 1 else np.array([(lo + hi) / 2])
  return [int(i) for i in np.rint(points)]


def montage_caption(findings: Sequence[tuple[str, float]]) -> list[str]:
  """The detected abnormalities as shown: ``"<name>  <probability, 2 decimals>"`` lines, most probable first (ties
  in the given order), or ``["No abnormalities detected."]`` when there are none."""
  if not findings:
    return ["No abnormalities detected."]
  ranked = sorted(findings, key=lambda f: -float(f[1]))
  return [f"{name}  {float(prob):.2f}" for name, prob in ranked]


def save_ct_montage(volume: np.ndarray, path: str | pathlib.Path, *, findings: Sequence[tuple[str, float]] = (),
                    title: str = "", axial: int = 6, coronal: int = 3, hu: bool = True,
                    spacing: tuple[float, float, float] = CT_SPACING) -> pathlib.Path:
  """A row of ``axial`` axial slices and a row of ``coronal`` coronal slices of ``volume`` (D, H, W) ("SLP"),
  evenly spaced (``ct_slice_indices``) and labelled with their index, in the radiological convention
  (``ct_axial_view`` / ``ct_coronal_view``), greyscale over [-1000, 200] HU (``hu=True``) or the normalised
  [-0.449, 0.551] (``hu=False``); a side panel lists ``findings`` (name, probability) (``montage_caption``);
  ``title`` on top. ``spacing`` (z, x, y) mm sets the pixel aspect (the volume contract's (1.5, 0.75, 0.75))."""
  volume = _ct_volume(volume)
  if axial < 0 or coronal < 0 or axial + coronal == 0:
    raise ValueError(f"Need axial >= 0 and coronal >= 0 slices, not both 0; got axial={axial}, coronal={coronal}.")
  d, h, w = volume.shape
  sz, sx, sy = (float(s) for s in spacing)
  vmin, vmax = CT_HU_WINDOW if hu else CT_NORMALISED_WINDOW
  # (plane, index name, [(index, view)], pixel aspect = row / column spacing, panel height / width in mm,
  #  orientation letters at the first panel's top / left / right)
  rows = []
  if axial:
    rows.append(("axial", "z", [(z, ct_axial_view(volume, z)) for z in ct_slice_indices(d, axial)], sy / sx,
                 w * sy / (h * sx), ("A", "R", "L")))
  if coronal:
    rows.append(("coronal", "y", [(y, ct_coronal_view(volume, y)) for y in ct_slice_indices(w, coronal)], sz / sx,
                 d * sz / (h * sx), ("S", "R", "L")))
  ncols, panel = max(axial, coronal), 2.2
  heights = [r[4] for r in rows]
  fig = plt.figure(figsize=(panel * (ncols + 1.4), panel * sum(heights) + (0.5 if title else 0.2)))
  grid = fig.add_gridspec(len(rows), ncols + 1, width_ratios=[1.0] * ncols + [1.4], height_ratios=heights,
                          wspace=0.05, hspace=0.2)
  for r, (plane, axis, views, aspect, _, (top, left, right)) in enumerate(rows):
    for c in range(ncols):
      ax = fig.add_subplot(grid[r, c])
      ax.axis("off")
      if c >= len(views):
        continue
      index, view = views[c]
      ax.imshow(view, cmap="gray", vmin=vmin, vmax=vmax, aspect=aspect)
      ax.set_title(f"{plane} {axis}={index}", fontsize=9)
      if c == 0:
        for text, xy, ha, va in ((top, (0.5, 0.98), "center", "top"), (left, (0.02, 0.5), "left", "center"),
                                 (right, (0.98, 0.5), "right", "center")):
          ax.text(*xy, text, transform=ax.transAxes, ha=ha, va=va, color="yellow", fontsize=8)
  ax = fig.add_subplot(grid[:, ncols])
  ax.axis("off")
  ax.text(0.05, 0.98, "\n".join(["Detected abnormalities", ""] + montage_caption(findings)), transform=ax.transAxes,
          ha="left", va="top", fontsize=9, family="monospace")
  window = f"window [{vmin:g}, {vmax:g}]" + (" HU" if hu else " (normalised)")
  ax.text(0.05, 0.02, window, transform=ax.transAxes, ha="left", va="bottom", fontsize=8, color="0.4")
  if title:
    fig.suptitle(title, fontsize=11)
  return _save(fig, path)


def _save(fig, path: str | pathlib.Path) -> pathlib.Path:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=100, bbox_inches="tight")
  plt.close(fig)
  return path
