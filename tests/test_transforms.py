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


def test_hflip_switch_of_flip_mode():
  im = _gray(40, 48, seed=8)
  resized = transforms.resize_shorter(im, 36)

  def crop(seed):
    return transforms.random_crop(resized, 32, np.random.default_rng(seed))

  kw = dict(augment="flip", resize=36, image_size=32)
  for seed in range(10):
    np.testing.assert_array_equal(transforms.train_image(im, np.random.default_rng(seed), hflip=False, **kw),
                                  transforms.normalize(crop(seed)))
  assert any(not np.array_equal(transforms.train_image(im, np.random.default_rng(s), **kw),
                                transforms.normalize(crop(s))) for s in range(10))


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


# --- RadGen (spec §2.2) -------------------------------------------------------------------------------------

def _normalize_ref(a: np.ndarray) -> np.ndarray:
  """uint8 (H, W) grey or (H, W, 3) → ImageNet-normalised float32 (H, W, 3), in numpy."""
  rgb = np.repeat(a[..., None], 3, axis=-1) if a.ndim == 2 else a
  return ((rgb.astype(np.float32) / np.float32(255)) - np.float32(transforms.MEAN)) / np.float32(transforms.STD)


def _brightness_ref(a: np.ndarray, f: float) -> np.ndarray:
  return np.clip(np.floor(np.float32(f) * a.astype(np.float32)), 0, 255).astype(np.uint8)


def _contrast_ref(a: np.ndarray, f: float) -> np.ndarray:
  m = np.float32(int(a.mean() + 0.5))
  return np.clip(np.floor(m + np.float32(f) * (a.astype(np.float32) - m)), 0, 255).astype(np.uint8)


def _translate_ref(a: np.ndarray, dx: int, dy: int) -> np.ndarray:
  out = np.zeros_like(a)
  h, w = a.shape[:2]
  out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
      a[max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
  return out


def _rotate_nearest_ref(a: np.ndarray, degrees: float) -> np.ndarray:
  """Counter-clockwise rotation about the image centre (w/2, h/2): output pixel centre (x + .5, y + .5) reads the
  input pixel containing its pre-image; 0 outside."""
  h, w = a.shape
  t = np.deg2rad(degrees)
  y, x = np.mgrid[0:h, 0:w] + 0.5
  u, v = x - w / 2, y - h / 2
  xin = np.floor(np.cos(t) * u - np.sin(t) * v + w / 2).astype(int)
  yin = np.floor(np.sin(t) * u + np.cos(t) * v + h / 2).astype(int)
  inside = (xin >= 0) & (xin < w) & (yin >= 0) & (yin < h)
  return np.where(inside, a[np.clip(yin, 0, h - 1), np.clip(xin, 0, w - 1)], 0)


@pytest.mark.parametrize("f", [0.8, 0.93, 1.07, 1.2])
def test_brightness_and_contrast_math(f):
  a = np.asarray(_gray(24, 20, seed=11))
  im = PIL.Image.fromarray(a, "L")
  np.testing.assert_array_equal(np.asarray(transforms.adjust_brightness(im, f)), _brightness_ref(a, f))
  np.testing.assert_array_equal(np.asarray(transforms.adjust_contrast(im, f)), _contrast_ref(a, f))
  # Grey RGB: the grey-level version is the image itself, so each band equals the "L" result.
  rgb = im.convert("RGB")
  np.testing.assert_array_equal(np.asarray(transforms.adjust_contrast(rgb, f))[..., 1], _contrast_ref(a, f))


def test_translate_and_nearest_rotation_geometry():
  a = np.asarray(_gray(32, 32, seed=12))
  im = PIL.Image.fromarray(a, "L")
  for dx, dy in [(3, -2), (-3, 0), (0, 3), (0, 0)]:
    np.testing.assert_array_equal(np.asarray(transforms.translate(im, dx, dy)), _translate_ref(a, dx, dy))
  for degrees in (7.3, -13.9):
    got = np.asarray(transforms.rotate(im, degrees, PIL.Image.NEAREST))
    np.testing.assert_array_equal(got, _rotate_nearest_ref(a, degrees))
    assert got[0, 0] == 0  # fill 0 in the uncovered corners


@pytest.mark.parametrize("brightness_first", [True, False])
def test_radgen_pipeline_with_fixed_draws(brightness_first):
  im = _gray(50, 40, seed=13)
  draws = transforms.RadGenDraws(flip=True, angle=90.0, brightness_first=brightness_first, brightness=1.15,
                                 contrast=0.85, dx=-3, dy=2)
  a = np.asarray(im.resize((32, 32), PIL.Image.BILINEAR))  # Resize((32, 32)), anisotropic
  a = np.rot90(a[:, ::-1])  # flip, then 90° counter-clockwise
  if brightness_first:
    a = _contrast_ref(_brightness_ref(a, 1.15), 0.85)
  else:
    a = _brightness_ref(_contrast_ref(a, 0.85), 1.15)
  a = _translate_ref(a, -3, 2)
  got = transforms.radgen_apply(im, draws, image_size=32)
  np.testing.assert_array_equal(np.asarray(got), a)
  np.testing.assert_array_equal(transforms.normalize(got), _normalize_ref(a))
  # The two jitter orders give different images (the order is a real random choice).
  other = transforms.radgen_apply(im, transforms.RadGenDraws(True, 90.0, not brightness_first, 1.15, 0.85, -3, 2),
                                  image_size=32)
  assert not np.array_equal(np.asarray(other), a)


def test_radgen_draws_ranges_and_switch():
  draws = [transforms.radgen_draws(np.random.default_rng(s), image_size=224) for s in range(400)]
  assert all(-15 <= d.angle <= 15 and 0.8 <= d.brightness <= 1.2 and 0.8 <= d.contrast <= 1.2 for d in draws)
  assert {d.dx for d in draws} | {d.dy for d in draws} <= set(range(-22, 23))  # round(U(-22.4, 22.4))
  assert min(d.dx for d in draws) <= -20 and max(d.dy for d in draws) >= 20
  assert 150 <= sum(d.flip for d in draws) <= 250 and 150 <= sum(d.brightness_first for d in draws) <= 250
  assert max(d.angle for d in draws) > 14 and min(d.angle for d in draws) < -14
  assert not any(transforms.radgen_draws(np.random.default_rng(s), image_size=224, hflip=False).flip
                 for s in range(50))


def test_radgen_train_and_eval_views():
  im = _gray(60, 45, seed=14)
  kw = dict(augment="radgen", resize=0, image_size=32)
  out = transforms.transform_views([im, im.convert("RGB")], np.random.default_rng(3), train=True, **kw)
  assert out.shape == (2, 32, 32, 3) and out.dtype == np.float32
  rng = np.random.default_rng(3)
  expected = transforms.radgen_apply(im, transforms.radgen_draws(rng, image_size=32), image_size=32)
  np.testing.assert_array_equal(out[0], _normalize_ref(np.asarray(expected)))
  assert not np.array_equal(out[0], out[1])  # the second view draws again
  again = transforms.transform_views([im], np.random.default_rng(3), train=True, **kw)
  np.testing.assert_array_equal(again[0], out[0])
  gray_rgb = transforms.transform_views([im.convert("RGB")], np.random.default_rng(3), train=True, **kw)
  np.testing.assert_array_equal(gray_rgb[0], out[0])
  ev = transforms.transform_views([im], None, train=False, **kw)
  np.testing.assert_array_equal(ev[0], _normalize_ref(np.asarray(im.resize((32, 32), PIL.Image.BILINEAR))))
