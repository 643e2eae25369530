"""The CT volume contract of CT-AGRG and its preprocessing (CT-AGRG spec §2.2–§2.4), in numpy.

Contract (spec §2.2). A volume file is an ``.npz`` whose ``arr_0`` (``np.savez``'s default key) is one 3-D array
``(D, H, W)`` in **SLP** orientation — axis 0 runs inferior → superior, axis 1 right → left, axis 2 anterior →
posterior — at spacing (z, x, y) = (1.5, 0.75, 0.75) mm, holding **Hounsfield units**, unclipped and unscaled
(air ≈ −1000, water 0, bone > 200). The original code only works with float32; ``load_contract_volume`` casts
float16/float64/integer arrays to float32 and refuses the rest (bool, complex, ...).
Hazard (spec §2.2): CT-CLIP's CT-RATE script writes files of the same name holding ``clip(HU, −1000, 1000) / 1000``,
i.e. values in [−1, 1]; the intensity mapping below turns those into a near-constant volume. An array whose whole
range lies inside [−1, 1] is therefore refused. ``input_pipeline.ct_prepare`` writes contract files from NIfTI.

Preprocessing (spec §2.3), identical for training and evaluation, normalisation before crop/pad:
``intensity_map`` clips to [−1000, 200] HU, maps to [0, 1] with ``(x + 1000) / 1200`` and subtracts 0.449 (the mean
of the ImageNet channel means; no division by a std), all in float32 — bit-identical to the original's torch CPU
ops; ``center_crop_or_pad`` crops/pads each axis to the target (240, 480, 480) with floor-division centring and the
fill −0.449 (normalised air). ``preprocess`` returns ``(D, H, W)`` without a channel axis: the original adds it in
front (``(1, D, H, W)``), a channels-last model adds it at the end when batching.

NIfTI → contract (spec §2.4 and its recommendation), for the offline converter: ``reorient_to_slp`` uses the
affine (nibabel axis codes name the direction an axis points *to*: I→S is ``'S'``, R→L ``'L'``, A→P ``'P'``).
For an affine with codes ``('L', 'P', 'S')`` — the voxel order the original assumes for CT-RATE without checking
(i: R→L, j: A→P, k: I→S) — this is its plain permutation ``(k, i, j)``; any other affine is followed, not the
assumption.
``resampled_shape`` and ``resample_trilinear`` are torch ``F.interpolate(size=..., mode='trilinear',
align_corners=False)`` without antialiasing; on unclipped HU (clipping comes later, in ``intensity_map``).
"""

from __future__ import annotations

import ast
import math
import os
import pathlib
import zipfile
import zlib
from collections.abc import Sequence

import nibabel
import numpy as np
from nibabel import affines, orientations
from nibabel.filebasedimages import ImageFileError

from input_pipeline.records import DataError

NPZ_KEY = "arr_0"
HU_MIN = -1000.0
HU_MAX = 200.0
IMAGENET_MEAN_GREY = 0.449
AIR = -IMAGENET_MEAN_GREY  # intensity_map(HU_MIN): the crop/pad fill
TARGET_SHAPE = (240, 480, 480)
CONTRACT_SPACING = (1.5, 0.75, 0.75)  # mm, (z, x, y) = contract axis order
CONTRACT_AXCODES = ("S", "L", "P")
_IDENTITY_SCALING = (1.0, 0.0)
_REAL_KINDS = "fiu"  # float, signed and unsigned integer dtypes
Shape3 = tuple[int, int, int]
Spacing3 = tuple[float, float, float]


# --- the contract ---------------------------------------------------------------------------------------------

def check_contract(array: np.ndarray, where: str) -> np.ndarray:
  """A contract volume as float32 ``(D, H, W)``; ``DataError`` naming ``where`` if ``array`` is not 3-D, empty, not
  of a real dtype, not finite, or looks like CT-CLIP's [−1, 1]-scaled data instead of Hounsfield units."""
  if array.ndim != 3:
    raise DataError(f"{where}: expected one 3-D (D, H, W) volume, got an array of shape {array.shape}.")
  if array.size == 0:
    raise DataError(f"{where}: the volume is empty (shape {array.shape}).")
  if array.dtype.kind not in _REAL_KINDS:
    raise DataError(f"{where}: dtype {array.dtype} is not a real number type; the contract is float32 Hounsfield "
                    "units (float16/float64/integer arrays are cast).")
  volume = array.astype(np.float32, copy=False)
  lo, hi = float(volume.min()), float(volume.max())  # NaN if any voxel is NaN
  if not (math.isfinite(lo) and math.isfinite(hi)):
    raise DataError(f"{where}: the volume holds NaN or infinite values (range [{lo:g}, {hi:g}]).")
  if lo >= -1.0 and hi <= 1.0:
    raise DataError(
        f"{where}: values lie in [{lo:g}, {hi:g}], inside [-1, 1]: not Hounsfield units. The volume contract (CT-AGRG "
        "spec §2.2) is unclipped, unscaled HU (air about -1000, water 0, bone above 200). CT-CLIP's CT-RATE "
        "preprocessing writes files of the same name holding clip(HU, -1000, 1000) / 1000, which this pipeline would "
        "turn into a near-constant volume; convert the NIfTI files with `python -m input_pipeline.ct_prepare`.")
  return volume


def _read_npz_array(path: pathlib.Path) -> np.ndarray:
  """The ``arr_0`` array of an ``.npz`` file; ``DataError`` if the file cannot be read or lacks the key."""
  readable = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)
  try:
    archive = np.load(path, allow_pickle=False)
  except readable as e:
    raise DataError(f"CT volume {path} is not a readable .npz file: {e}") from e
  if not isinstance(archive, np.lib.npyio.NpzFile):
    raise DataError(f"CT volume {path} is a bare .npy array, not an .npz archive; write it with "
                    f"np.savez(path, volume) so that the array is stored as {NPZ_KEY!r}.")
  with archive:
    if NPZ_KEY not in archive.files:
      raise DataError(f"CT volume {path} has no {NPZ_KEY!r} array (keys: {archive.files}); write it with "
                      "np.savez(path, volume).")
    try:
      return archive[NPZ_KEY]
    except readable as e:
      raise DataError(f"CT volume {path}: array {NPZ_KEY!r} is not readable: {e}") from e


def load_contract_volume(path: str | os.PathLike[str]) -> np.ndarray:
  """``np.load(path)['arr_0']`` checked against the contract (``check_contract``): float32 HU ``(D, H, W)``."""
  path = pathlib.Path(path)
  return check_contract(_read_npz_array(path), f"CT volume {path}")


# --- preprocessing (§2.3) -------------------------------------------------------------------------------------

def intensity_map(hu: np.ndarray) -> np.ndarray:
  """HU ``(...)`` → float32 ``(...)`` in [−0.449, 0.551]: clip to [−1000, 200], ``(x + 1000) / 1200``, ``− 0.449``,
  each step rounded to float32 as the original's torch CPU ops."""
  x = np.clip(np.asarray(hu, np.float32), np.float32(HU_MIN), np.float32(HU_MAX))
  x -= np.float32(HU_MIN)
  x /= np.float32(HU_MAX - HU_MIN)
  x -= np.float32(IMAGENET_MEAN_GREY)
  return x


def crop_or_pad_plan(n: int, t: int) -> tuple[int, int, int, int]:
  """``(start, end, pad_before, pad_after)`` taking an axis of length ``n`` to length ``t``: keep ``[start, end)``
  (centred, the odd voxel dropped at the end), then pad (centred, the odd voxel added at the end)."""
  start = max((n - t) // 2, 0)
  end = min(start + t, n)
  pad_before = (t - (end - start)) // 2
  return start, end, pad_before, t - (end - start) - pad_before


def center_crop_or_pad(x: np.ndarray, target_shape: Sequence[int], fill: float = AIR) -> np.ndarray:
  """``(d, h, w)`` → ``target_shape``, each axis cropped/padded by ``crop_or_pad_plan``; padding holds ``fill``
  (cast to ``x.dtype``)."""
  plans = [crop_or_pad_plan(n, t) for n, t in zip(x.shape, target_shape, strict=True)]
  out = np.full(tuple(target_shape), fill, dtype=x.dtype)
  out[tuple(slice(b, t - a) for (_, _, b, a), t in zip(plans, target_shape))] = \
      x[tuple(slice(s, e) for s, e, _, _ in plans)]
  return out


def preprocess(hu: np.ndarray, target_shape: Sequence[int] = TARGET_SHAPE) -> np.ndarray:
  """Contract volume, HU ``(d, h, w)`` → network input float32 ``target_shape`` (no channel axis):
  ``intensity_map`` then ``center_crop_or_pad`` with fill −0.449."""
  return center_crop_or_pad(intensity_map(hu), target_shape, AIR)


# --- NIfTI → contract (§2.4) ----------------------------------------------------------------------------------

def parse_xy_spacing(value: object, where: str) -> tuple[float, float]:
  """CT-RATE's ``XYSpacing`` cell, a string like ``"[0.75, 0.75]"`` → the pair of positive floats (mm)."""
  try:
    pair = ast.literal_eval(value) if isinstance(value, str) else value
    spacing = tuple(float(v) for v in pair)
  except (ValueError, TypeError, SyntaxError):
    spacing = ()
  if len(spacing) != 2 or not all(math.isfinite(s) and s > 0 for s in spacing):
    raise DataError(f"{where}: XYSpacing {value!r} is not a pair of positive numbers like '[0.75, 0.75]'.")
  return spacing


def resampled_shape(shape: Sequence[int], spacing: Sequence[float],
                    target_spacing: Sequence[float] = CONTRACT_SPACING) -> Shape3:
  """Per axis ``int(n * s / s_target)`` evaluated left to right in float64 (spec §2.4 step 4, §13.6).
  ``ValueError`` for a non-positive spacing or an axis that would vanish."""
  if not all(math.isfinite(s) and s > 0 for s in (*spacing, *target_spacing)):
    raise ValueError(f"spacings must be positive, got {tuple(spacing)} → {tuple(target_spacing)} mm.")
  out = tuple(int(n * float(s) / float(t)) for n, s, t in zip(shape, spacing, target_spacing, strict=True))
  if min(out) < 1:
    raise ValueError(f"resampling shape {tuple(shape)} from {tuple(spacing)} to {tuple(target_spacing)} mm "
                     f"gives {out}.")
  return out


def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(i0, i1, w0, w1), each ``(n_out,)``: output ``o`` = ``w0·x[i0] + w1·x[i1]`` with source coordinate
  ``c = max((o + 0.5)·(n_in/n_out) − 0.5, 0)``, ``i0 = ⌊c⌋``, ``i1 = min(i0 + 1, n_in − 1)``, ``w1 = c − i0``.
  float32 like torch; ``c`` rounded once, as torch's fused multiply-add computes it."""
  ratio = np.float32(n_in) / np.float32(n_out)
  c = (np.float64(ratio) * (np.arange(n_out) + 0.5) - 0.5).astype(np.float32)
  c = np.maximum(c, np.float32(0))
  i0 = np.minimum(c.astype(np.intp), n_in - 1)
  w1 = c - i0.astype(np.float32)
  return i0, np.minimum(i0 + 1, n_in - 1), np.float32(1) - w1, w1


def _resample_axis(x: np.ndarray, axis: int, n_out: int) -> np.ndarray:
  """Linear resampling of float32 ``x`` along ``axis`` to ``n_out`` (unchanged if already that long). Computed as
  torch's CPU kernel, ``fma(w0, x[i0], w1·x[i1])``: the fused multiply-add is emulated in float64, where the product
  of two float32 numbers is exact."""
  n_in = x.shape[axis]
  if n_in == n_out:
    return x
  i0, i1, w0, w1 = _linear_taps(n_in, n_out)
  along = [1] * x.ndim
  along[axis] = n_out
  second = np.take(x, i1, axis=axis)
  second *= w1.reshape(along)
  acc = np.take(x, i0, axis=axis).astype(np.float64)
  acc *= w0.reshape(along)
  acc += second
  return acc.astype(np.float32)


def resample_trilinear(x: np.ndarray, out_shape: Sequence[int]) -> np.ndarray:
  """float32 ``(d, h, w)`` → ``out_shape``: torch ``F.interpolate(size=out_shape, mode='trilinear',
  align_corners=False)`` (no antialiasing), separable — W, then H, then D, the nesting of torch's kernel; measured
  bit-identical to torch 2.13's CPU kernel (AVX2). An axis already at its size is left as is (``x`` itself is
  returned when nothing changes)."""
  if x.ndim != 3 or len(out_shape) != 3 or min(out_shape) < 1:
    raise ValueError(f"resample_trilinear takes a 3-D array and 3 positive sizes, got {x.shape} → {out_shape}.")
  x = np.asarray(x, np.float32)
  for axis in (2, 1, 0):
    x = _resample_axis(x, axis, int(out_shape[axis]))
  return x


def reorient_to_slp(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, Spacing3]:
  """Voxel array ``(i, j, k)`` with its (4, 4) voxel → RAS+ mm affine → (contiguous array in SLP orientation
  ``(D, H, W)``, its voxel spacing in mm in that axis order, from the affine's column norms). Oblique affines go to
  the closest axes (``io_orientation``). ``ValueError`` for a degenerate affine."""
  transform = orientations.ornt_transform(orientations.io_orientation(affine),
                                          orientations.axcodes2ornt(CONTRACT_AXCODES))
  sizes = affines.voxel_sizes(affine)
  spacing = [0.0] * 3
  for axis, (new_axis, _) in enumerate(transform):
    spacing[int(new_axis)] = float(sizes[axis])
  return np.ascontiguousarray(orientations.apply_orientation(array, transform)), tuple(spacing)


def _load_nifti(path: pathlib.Path, where: str) -> nibabel.Nifti1Image:
  try:
    image = nibabel.load(path)
  except (OSError, EOFError, ValueError, zlib.error, ImageFileError) as e:
    raise DataError(f"{where} is not a readable NIfTI file: {e}") from e
  if not isinstance(image, nibabel.Nifti1Image):
    raise DataError(f"{where} is a {type(image).__name__}, not a NIfTI image.")
  if len(image.shape) != 3:
    raise DataError(f"{where}: expected a 3-D volume, got shape {image.shape}.")
  return image


def _metadata_scaling(header: tuple[float, float], slope: float | None, intercept: float | None,
                      where: str) -> tuple[float, float]:
  """The (slope, intercept) still to apply after nibabel has applied the header's ``scl_slope/scl_inter``
  (``header``, (1, 0) when unset): the metadata's when the header carries no scaling, none when the header already
  carries the same one; a different non-identity header scaling is ambiguous and refused."""
  if slope is None and intercept is None:
    return _IDENTITY_SCALING
  metadata = (1.0 if slope is None else float(slope), 0.0 if intercept is None else float(intercept))
  if header == _IDENTITY_SCALING:
    return metadata
  if np.allclose(header, metadata, rtol=1e-6, atol=1e-6):
    return _IDENTITY_SCALING
  raise DataError(f"{where}: the header's scl_slope/scl_inter {header} (applied by nibabel) differ from the "
                  f"metadata's RescaleSlope/RescaleIntercept {metadata}; refusing to guess which gives HU.")


def _hounsfield(image: nibabel.Nifti1Image, slope: float | None, intercept: float | None,
                where: str) -> np.ndarray:
  """float32 HU ``(i, j, k)``: ``get_fdata`` (header scaling applied by nibabel), then the metadata scaling when
  the header has none — computed in float64, cast once."""
  proxy = image.dataobj
  header = (float(proxy.slope), float(proxy.inter))
  extra_slope, extra_intercept = _metadata_scaling(header, slope, intercept, where)
  try:
    raw = image.get_fdata(dtype=np.float64, caching="unchanged")
  except (OSError, EOFError, ValueError, zlib.error) as e:
    raise DataError(f"{where}: the voxel data is not readable: {e}") from e
  if (extra_slope, extra_intercept) != _IDENTITY_SCALING:
    raw = raw * extra_slope + extra_intercept
  return raw.astype(np.float32)


def nifti_to_contract(nifti_path: str | os.PathLike[str], rescale_slope: float | None = None,
                      rescale_intercept: float | None = None,
                      spacing: Sequence[float] | None = None) -> np.ndarray:
  """A NIfTI CT volume → the contract array: float32 HU ``(D, H, W)``, SLP, (1.5, 0.75, 0.75) mm.

  ``rescale_slope/rescale_intercept`` (CT-RATE metadata ``RescaleSlope/RescaleIntercept``) are applied only when the
  header carries no ``scl_slope/scl_inter`` (unset or identity): nibabel's ``get_fdata`` already applies the header's,
  and applying them twice would shift every voxel; a header scaling that differs from the metadata's is refused.
  ``spacing``: the voxel spacing in mm in contract axis order
  (z, x, y) — CT-RATE's ``(ZSpacing, XY, XY)`` — else the affine's. The unclipped HU are resampled (spec §2.4)."""
  path = pathlib.Path(nifti_path)
  where = f"NIfTI {path}"
  image = _load_nifti(path, where)
  hu = _hounsfield(image, rescale_slope, rescale_intercept, where)
  try:
    volume, affine_spacing = reorient_to_slp(hu, image.affine)
    shape = resampled_shape(volume.shape, affine_spacing if spacing is None else spacing)
  except ValueError as e:
    raise DataError(f"{where}: {e}") from e
  return check_contract(resample_trilinear(volume, shape), where)
