"""transforms: torchvision semantics (resize rule, crop, flip, rotate/scale, squash), torch normalisation,
grayscale == its RGB conversion, determinism."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from input_pipeline import transforms


def _gray(w: int, h: int, seed: int = 0) -> PIL.Image.Image:
  return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8), "L")


def test_normalize_matches_torch():
  rgb = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)
  t = torch.from_numpy(rgb).permute(2, 0, 1).float().div(255)
  ref = (t - torch.tensor(transforms.MEAN)[:, None, None]) / torch.tensor(transforms.STD)[:, None, None]
  ref = ref.permute(1, 2, 0).numpy()
  out = transforms.normalize(PIL.Image.fromarray(rgb))
  assert out.dtype == np.float32 and out.shape == (5, 7, 3)
  np.testing.assert_array_equal(out, ref)
  gray = rgb[..., 0]
  np.testing.assert_array_equal(transforms.normalize(PIL.Image.fromarray(gray, "L")),
                                transforms.normalize(PIL.Image.fromarray(gray, "L").convert("RGB")))


@pytest.mark.parametrize("size,expected", [((300, 200), (384, 256)), ((200, 301), (256, 385)),
                                           ((624, 512), (312, 256)), ((256, 300), (256, 300))])
def test_resize_shorter_side_rule(size, expected):
  im = _gray(*size)
  out = transforms.resize_shorter(im, 256)
  assert out.size == expected  # long side int(256 * long / short), as torchvision
  np.testing.assert_array_equal(np.asarray(out), np.asarray(im.resize(expected, PIL.Image.BILINEAR)))


def test_random_crop_offsets_are_uniform_and_exact():
  a = np.arange(20 * 30, dtype=np.int32).reshape(20, 30) % 251
  im = PIL.Image.fromarray(a.astype(np.uint8), "L")
  tops, lefts = set(), set()
  for seed in range(200):
    out = np.asarray(transforms.random_crop(im, 16, np.random.default_rng(seed)))
    top, left = divmod(int(np.flatnonzero(a == out[0, 0])[0]), 30)
    np.testing.assert_array_equal(out, a[top:top + 16, left:left + 16])
    tops.add(top)
    lefts.add(left)
  assert tops == set(range(5)) and lefts == set(range(15))
  with pytest.raises(ValueError, match="Cannot crop"):
    transforms.random_crop(im, 21, np.random.default_rng(0))


def test_flip_train_output_is_crop_or_mirrored_crop():
  im = _gray(40, 48, seed=3)
  resized = np.asarray(transforms.resize_shorter(im, 36))
  ref = transforms.normalize(PIL.Image.fromarray(resized))
  flipped = 0
  for seed in range(40):
    out = transforms.train_image(im, np.random.default_rng(seed), augment="flip", resize=36, image_size=32)
    assert out.shape == (32, 32, 3) and out.dtype == np.float32
    found = None
    for top in range(resized.shape[0] - 31):
      for left in range(resized.shape[1] - 31):
        crop = ref[top:top + 32, left:left + 32]
        if np.array_equal(out, crop):
          found = "plain"
        elif np.array_equal(out, crop[:, ::-1]):
          found = "flip"
    assert found is not None
    flipped += found == "flip"
  assert 8 <= flipped <= 32  # p = 0.5


def test_rotate_and_scale_geometry():
  im = _gray(32, 32, seed=4)
  a = np.asarray(im)
  np.testing.assert_array_equal(np.asarray(transforms.rotate(im, 0.0)), a)
  np.testing.assert_array_equal(np.asarray(transforms.rotate(im, 90.0)), np.rot90(a))
  rotated = np.asarray(transforms.rotate(im, 10.0))
  assert rotated[0, 0] == 0 and rotated[-1, -1] == 0  # fill 0 in the uncovered corners
  np.testing.assert_array_equal(np.asarray(transforms.scale_about_centre(im, 1.0)), a)
  small = np.asarray(transforms.scale_about_centre(im, 0.5))
  assert (small[:6] == 0).all() and (small[:, :6] == 0).all() and (small[-6:] == 0).all()
  # Zooming in by 2 about the centre: output pixel (x, y) samples input ((x + .5 - 16) / 2 + 16 - .5), so
  # output pixels 15/16 straddle input 15.75/16.25 -> a smooth interior; the border is not filled.
  big = np.asarray(transforms.scale_about_centre(im, 2.0))
  assert (big != 0).mean() > 0.95


def test_rotate_scale_gray_equals_rgb_and_is_deterministic():
  im = PIL.Image.fromarray(np.random.default_rng(5).integers(1, 256, (40, 50), dtype=np.uint8), "L")
  kw = dict(augment="rotate_scale", resize=36, image_size=32)
  filled = 0
  for seed in range(40):
    g = transforms.train_image(im, np.random.default_rng(seed), **kw)
    if seed < 8:
      np.testing.assert_array_equal(g, transforms.train_image(im.convert("RGB"), np.random.default_rng(seed), **kw))
      np.testing.assert_array_equal(g, transforms.train_image(im, np.random.default_rng(seed), **kw))
    filled += bool((g == transforms.normalize(PIL.Image.new("L", (1, 1)))[0, 0]).any())  # fill 0 appears
  assert 8 <= filled <= 30  # rotate+scale applied with p = 0.5 (not every draw leaves a filled corner)


def test_eval_squashes_without_crop():
  im = _gray(60, 45, seed=6)
  out = transforms.eval_image(im, image_size=32)
  ref = np.asarray(im.convert("RGB").resize((32, 32), PIL.Image.BILINEAR))
  np.testing.assert_array_equal(out, transforms.normalize(PIL.Image.fromarray(ref)))


def test_transform_views_stacks_independent_views():
  im = _gray(48, 40, seed=7)
  out = transforms.transform_views([im, im], np.random.default_rng(0), train=True, augment="flip", resize=40,
                                   image_size=32)
  assert out.shape == (2, 32, 32, 3) and out.dtype == np.float32
  assert not np.array_equal(out[0], out[1])  # independent crops / flips of the same picture
  ev = transforms.transform_views([im], None, train=False, augment="flip", resize=40, image_size=32)
  assert ev.shape == (1, 32, 32, 3)
  with pytest.raises(ValueError, match="augment"):
    transforms.train_image(im, np.random.default_rng(0), augment="mixup", resize=40, image_size=32)
