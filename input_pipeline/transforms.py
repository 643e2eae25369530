"""Image transforms of the official code (reference spec §2.5), in PIL + numpy, seeded explicitly.

Each function maps one PIL image (mode ``"L"`` or ``"RGB"``) to float32 ``(H, W, 3)``, ImageNet-normalised;
``transform_views`` stacks the independently transformed views to ``(V, H, W, 3)``.

* ``"flip"`` (IU, train): ``Resize(resize)`` (shorter side; long side ``int(resize * long / short)``, PIL
  bilinear) → random crop ``image_size`` (uniform offsets) → horizontal flip with p = 0.5.
* ``"rotate_scale"`` (MIMIC ``--randaug``, train): resize → crop → with p = 0.5 both a rotation by U(-10°, 10°)
  (bicubic, fill 0, same size) and a scaling by U(0.8, 1.2) about the centre (bicubic, fill 0).
* ``"radgen"`` (RadGen spec §2.2, train): ``Resize((S, S))`` (squash, bilinear) → horizontal flip with p = 0.5
  (``hflip``) → rotation by U(-15°, 15°) (nearest, fill 0, same size) → colour jitter: brightness factor
  U(0.8, 1.2) and contrast factor U(0.8, 1.2) in random order (torchvision ``ColorJitter(0.2, 0.2)`` on PIL:
  ``ImageEnhance``, i.e. ``blend(degenerate, image, f)`` truncated to uint8 — brightness against black, contrast
  against the rounded mean of the grey-level image) → translation by ``round(U(-0.1 S, 0.1 S))`` pixels per axis
  (nearest, fill 0). ``radgen_draws`` draws the parameters, ``radgen_apply`` applies them.
* eval (every mode): squash to ``(image_size, image_size)``, bilinear, no crop.

``hflip=False`` turns off the flip of ``"flip"`` and ``"radgen"`` (no draw is made for it).

The geometric operations are torchvision's PIL code paths (``Image.resize``, ``crop``, ``transpose``,
``rotate``, ``transform(AFFINE)`` with the inverse matrix of ``torchvision.transforms.functional.affine``), and
normalisation is torchvision's float32 ``(x / 255 - mean) / std``, so inputs are bit-identical to the original
pipeline given the same random draws (the draws come from a ``numpy`` generator, not torch's).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import PIL.Image
import PIL.ImageEnhance

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
AUGMENTATIONS = ("flip", "rotate_scale", "radgen")

# (256, 3) float32: value v of channel c -> (v / 255 - mean[c]) / std[c], computed in float32 like torch.
_LUT = ((np.arange(256, dtype=np.float32)[:, None] / np.float32(255)) - np.asarray(MEAN, np.float32)) \
    / np.asarray(STD, np.float32)


def normalize(im: PIL.Image.Image) -> np.ndarray:
  """uint8 ``"L"``/``"RGB"`` image → float32 ``(H, W, 3)`` (a grayscale image is replicated to 3 channels)."""
  a = np.asarray(im)
  if a.ndim == 2:
    return _LUT[a]
  return np.take_along_axis(_LUT, a.reshape(-1, 3).astype(np.intp), axis=0).reshape(a.shape)


def resize_shorter(im: PIL.Image.Image, size: int) -> PIL.Image.Image:
  """torchvision ``Resize(size)`` on a PIL image: shorter side → ``size``, bilinear."""
  w, h = im.size
  short, long = (w, h) if w <= h else (h, w)
  new_short, new_long = size, int(size * long / short)
  new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
  if (new_w, new_h) == (w, h):
    return im
  return im.resize((new_w, new_h), PIL.Image.BILINEAR)


def random_crop(im: PIL.Image.Image, size: int, rng: np.random.Generator) -> PIL.Image.Image:
  """``RandomCrop(size)``: uniform top/left offsets, no padding."""
  w, h = im.size
  if w < size or h < size:
    raise ValueError(f"Cannot crop {size}x{size} from a {w}x{h} image (config.data.resize < image_size?).")
  top = int(rng.integers(0, h - size + 1))
  left = int(rng.integers(0, w - size + 1))
  return im.crop((left, top, left + size, top + size))


def _fill(im: PIL.Image.Image) -> int | tuple[int, ...]:
  return 0 if im.mode == "L" else (0,) * len(im.getbands())


def rotate(im: PIL.Image.Image, degrees: float, resample: int = PIL.Image.BICUBIC) -> PIL.Image.Image:
  """``F.rotate(im, degrees, resample, expand=False, fill=0)`` (counter-clockwise about the centre)."""
  return im.rotate(degrees, resample, expand=False, fillcolor=_fill(im))


def scale_about_centre(im: PIL.Image.Image, scale: float) -> PIL.Image.Image:
  """``F.affine(im, angle=0, translate=(0, 0), scale=scale, shear=0, BICUBIC, fill=0)``."""
  w, h = im.size
  cx, cy = w * 0.5, h * 0.5
  # torchvision _get_inverse_affine_matrix with rot = shear = 0 and no translation.
  m = [1.0 / scale, 0.0, 0.0, 0.0, 1.0 / scale, 0.0]
  m[2] += m[0] * -cx + m[1] * -cy + cx
  m[5] += m[3] * -cx + m[4] * -cy + cy
  return im.transform((w, h), PIL.Image.AFFINE, m, PIL.Image.BICUBIC, fillcolor=_fill(im))


def translate(im: PIL.Image.Image, dx: int, dy: int) -> PIL.Image.Image:
  """``F.affine(im, angle=0, translate=(dx, dy), scale=1, shear=0, NEAREST, fill=0)``: pixel ``(x, y)`` moves
  to ``(x + dx, y + dy)``; uncovered pixels are 0."""
  w, h = im.size
  return im.transform((w, h), PIL.Image.AFFINE, (1.0, 0.0, -dx, 0.0, 1.0, -dy), PIL.Image.NEAREST,
                      fillcolor=_fill(im))


def adjust_brightness(im: PIL.Image.Image, factor: float) -> PIL.Image.Image:
  """torchvision ``F.adjust_brightness`` on PIL: ``trunc(factor · v)`` clipped to [0, 255] (float32 math)."""
  return PIL.ImageEnhance.Brightness(im).enhance(factor)


def adjust_contrast(im: PIL.Image.Image, factor: float) -> PIL.Image.Image:
  """torchvision ``F.adjust_contrast`` on PIL: ``trunc(m + factor · (v − m))`` clipped to [0, 255], ``m`` the
  mean of the grey-level (``"L"``) image rounded to an integer."""
  return PIL.ImageEnhance.Contrast(im).enhance(factor)


def squash(im: PIL.Image.Image, image_size: int) -> PIL.Image.Image:
  """``Resize((s, s))``: both sides to ``image_size``, bilinear (anisotropic)."""
  if im.size == (image_size, image_size):
    return im
  return im.resize((image_size, image_size), PIL.Image.BILINEAR)


@dataclasses.dataclass(frozen=True)
class RadGenDraws:
  """The random parameters of one RadGen training view (spec §2.2): flip, rotation angle (degrees), the order of
  the two colour-jitter operations, their factors, and the translation (pixels)."""
  flip: bool
  angle: float
  brightness_first: bool
  brightness: float
  contrast: float
  dx: int
  dy: int


def radgen_draws(rng: np.random.Generator, *, image_size: int, hflip: bool = True) -> RadGenDraws:
  """Draws ``RadGenDraws`` in torchvision's order: flip (only with ``hflip``), angle, jitter order, brightness,
  contrast, translation x, y."""
  flip = hflip and bool(rng.random() < 0.5)
  angle = float(rng.uniform(-15.0, 15.0))
  brightness_first = bool(rng.random() < 0.5)
  brightness, contrast = float(rng.uniform(0.8, 1.2)), float(rng.uniform(0.8, 1.2))
  max_d = 0.1 * image_size
  dx, dy = (int(round(float(rng.uniform(-max_d, max_d)))) for _ in range(2))
  return RadGenDraws(flip, angle, brightness_first, brightness, contrast, dx, dy)


def radgen_apply(im: PIL.Image.Image, draws: RadGenDraws, *, image_size: int) -> PIL.Image.Image:
  """The RadGen training transform (module docstring) with the given draws → uint8 image ``(S, S)``."""
  im = squash(im, image_size)
  if draws.flip:
    im = im.transpose(PIL.Image.FLIP_LEFT_RIGHT)
  im = rotate(im, draws.angle, PIL.Image.NEAREST)
  jitter = ((adjust_brightness, draws.brightness), (adjust_contrast, draws.contrast))
  for adjust, factor in jitter if draws.brightness_first else jitter[::-1]:
    im = adjust(im, factor)
  return translate(im, draws.dx, draws.dy)


def train_image(im: PIL.Image.Image, rng: np.random.Generator, *, augment: str, resize: int,
                image_size: int, hflip: bool = True) -> np.ndarray:
  """One training view → float32 ``(image_size, image_size, 3)``."""
  if augment not in AUGMENTATIONS:
    raise ValueError(f"Unknown config.data.augment={augment!r}; choose one of {AUGMENTATIONS}.")
  if augment == "radgen":
    return normalize(radgen_apply(im, radgen_draws(rng, image_size=image_size, hflip=hflip), image_size=image_size))
  im = random_crop(resize_shorter(im, resize), image_size, rng)
  if augment == "flip":
    if hflip and rng.random() < 0.5:
      im = im.transpose(PIL.Image.FLIP_LEFT_RIGHT)
  elif rng.random() < 0.5:
    im = rotate(im, float(rng.uniform(-10.0, 10.0)))
    im = scale_about_centre(im, float(rng.uniform(0.8, 1.2)))
  return normalize(im)


def eval_image(im: PIL.Image.Image, *, image_size: int) -> np.ndarray:
  """One evaluation view → float32 ``(image_size, image_size, 3)``: ``Resize((s, s))`` bilinear."""
  return normalize(squash(im, image_size))


def transform_views(images: Sequence[PIL.Image.Image], rng: np.random.Generator | None, *, train: bool,
                    augment: str, resize: int, image_size: int, hflip: bool = True) -> np.ndarray:
  """Views transformed independently (one generator, consumed view by view) → float32 ``(V, S, S, 3)``."""
  if train:
    if rng is None:
      raise ValueError("Training transforms need a random generator.")
    views = [train_image(im, rng, augment=augment, resize=resize, image_size=image_size, hflip=hflip)
             for im in images]
  else:
    views = [eval_image(im, image_size=image_size) for im in images]
  return np.stack(views)
