"""CT slice montage (``heatmaps.save_ct_montage``): PNG output, radiological orientation of the views, the
findings caption, slice spacing and input validation. Volumes are (D, H, W) "SLP": axis 0 inferior → superior,
axis 1 patient right → left, axis 2 anterior → posterior."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest

from rrg_jax import heatmaps

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _cube_volume() -> np.ndarray:
  """(24, 40, 32) air (-1000 HU) with soft tissue (40 HU) inside and a bone-bright cube (700 HU) at
  [10:14, 5:11, 4:10]."""
  v = np.full((24, 40, 32), -1000.0, np.float32)
  v[2:22, 4:36, 3:29] = 40.0
  v[10:14, 5:11, 4:10] = 700.0
  return v


def test_save_ct_montage_png(tmp_path):
  path = heatmaps.save_ct_montage(_cube_volume(), tmp_path / "sub" / "dir" / "montage.png", title="study 1",
                                  findings=[("Lung nodule", 0.91), ("Emphysema", 0.55)])
  assert path == tmp_path / "sub" / "dir" / "montage.png"
  assert path.read_bytes()[:8] == PNG_SIGNATURE
  with PIL.Image.open(path) as image:
    width, height = image.size
  assert 300 < height < width < 3000


def test_save_ct_montage_variants(tmp_path):
  normalised = (np.clip(_cube_volume(), -1000, 200) + 1000) / 1200 - 0.449
  for i, kwargs in enumerate([dict(hu=False), dict(axial=2, coronal=0), dict(axial=0, coronal=4)]):
    path = heatmaps.save_ct_montage(normalised if i == 0 else _cube_volume(), tmp_path / f"m{i}.png", **kwargs)
    assert path.read_bytes()[:8] == PNG_SIGNATURE
  path = heatmaps.save_ct_montage(np.zeros((1, 1, 1), np.float32), str(tmp_path / "one.png"))
  assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_axial_view_orientation():
  d, h, w = 24, 40, 32
  v = np.zeros((d, h, w), np.float32)
  v[:, :h // 2, :] = 1.0  # patient-right half
  view = heatmaps.ct_axial_view(v, 5)
  assert view.shape == (w, h)  # rows = axis 2 (A→P), columns = axis 1 (R→L)
  assert (view[:, :h // 2] == 1).all() and (view[:, h // 2:] == 0).all()  # right on the image's LEFT
  v = np.zeros((d, h, w), np.float32)
  v[:, :, :w // 4] = 1.0  # anterior quarter
  view = heatmaps.ct_axial_view(v, 5)
  assert (view[:w // 4] == 1).all() and (view[w // 4:] == 0).all()  # anterior at the TOP
  cube = heatmaps.ct_axial_view(_cube_volume(), 12)
  rows, cols = np.nonzero(cube == 700)
  assert (rows.min(), rows.max(), cols.min(), cols.max()) == (4, 9, 5, 10)


def test_coronal_view_orientation():
  d, h, w = 24, 40, 32
  v = np.zeros((d, h, w), np.float32)
  v[d - 6:] = 1.0  # superior slices
  view = heatmaps.ct_coronal_view(v, 7)
  assert view.shape == (d, h)
  assert (view[:6] == 1).all() and (view[6:] == 0).all()  # superior at the TOP
  v = np.zeros((d, h, w), np.float32)
  v[:, :h // 2, :] = 1.0
  view = heatmaps.ct_coronal_view(v, 7)
  assert (view[:, :h // 2] == 1).all() and (view[:, h // 2:] == 0).all()  # right on the LEFT
  cube = heatmaps.ct_coronal_view(_cube_volume(), 6)
  rows, cols = np.nonzero(cube == 700)
  assert (rows.min(), rows.max(), cols.min(), cols.max()) == (d - 14, d - 11, 5, 10)


def test_slice_indices():
  assert heatmaps.ct_slice_indices(24, 6) == [2, 6, 10, 13, 17, 21]  # linspace(2, 21, 6), outer 10% left out
  assert heatmaps.ct_slice_indices(32, 3) == [3, 16, 28]
  assert heatmaps.ct_slice_indices(240, 2) == [24, 215]
  assert heatmaps.ct_slice_indices(1, 3) == [0, 0, 0]
  assert heatmaps.ct_slice_indices(5, 1) == [2]


def test_montage_caption():
  assert heatmaps.montage_caption([]) == ["No abnormalities detected."]
  assert heatmaps.montage_caption(
      [("Emphysema", 0.55), ("Lung nodule", 0.912), ("Cardiomegaly", 0.7), ("Atelectasis", 0.7)]) == [
          "Lung nodule  0.91", "Cardiomegaly  0.70", "Atelectasis  0.70", "Emphysema  0.55"]


@pytest.mark.parametrize("shape", [(40, 32), (2, 24, 40, 32), (0, 40, 32), (24, 40, 0)])
def test_bad_volume(tmp_path, shape):
  with pytest.raises(ValueError, match=r"3-D .*" + str(shape).replace("(", r"\(").replace(")", r"\)")):
    heatmaps.save_ct_montage(np.zeros(shape, np.float32), tmp_path / "bad.png")
  assert not (tmp_path / "bad.png").exists()
  with pytest.raises(ValueError, match="3-D"):
    heatmaps.ct_axial_view(np.zeros(shape, np.float32), 0)


def test_bad_slice_counts(tmp_path):
  with pytest.raises(ValueError, match="axial=0, coronal=0"):
    heatmaps.save_ct_montage(_cube_volume(), tmp_path / "bad.png", axial=0, coronal=0)
