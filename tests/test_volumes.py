"""input_pipeline.volumes: the .npz contract and its refusals, intensity mapping and crop/pad (CT-AGRG spec §2.3,
§13.4, §13.5), resampling sizes (§13.6) and trilinear resampling against torch, SLP reorientation and the NIfTI →
contract conversion (§2.4) on small volumes with known affines and HU scalings."""

from __future__ import annotations

import nibabel
import numpy as np
import pytest
import torch

from input_pipeline import volumes
from input_pipeline.records import DataError

_HU_ATOL = 2e-3  # HU: 1e-6 of the volumes' ~2000 HU range (measured: bit-identical)
# Direction (RAS+) of the contract axes: 0 → superior, 1 → left, 2 → posterior.
_SLP_DIRECTIONS = np.array([[0, 0, 1], [-1, 0, 0], [0, -1, 0]], dtype=np.float64)


def _torch_resize(x: np.ndarray, shape) -> np.ndarray:
  return torch.nn.functional.interpolate(torch.from_numpy(np.ascontiguousarray(x))[None, None], size=tuple(shape),
                                         mode="trilinear", align_corners=False)[0, 0].numpy()


def _save_npz(path, array) -> str:
  np.savez(path, array)
  return str(path)


# --- contract -------------------------------------------------------------------------------------------------

def test_contract_volume_loads_float32_hu(tmp_path):
  hu = np.random.default_rng(0).uniform(-1024, 1500, (4, 5, 6)).astype(np.float32)
  out = volumes.load_contract_volume(_save_npz(tmp_path / "train_1_a_1.nii.gz.npz", hu))
  assert out.dtype == np.float32 and out.shape == (4, 5, 6)
  np.testing.assert_array_equal(out, hu)


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int16, np.int32, np.uint16])
def test_contract_casts_real_dtypes_to_float32(tmp_path, dtype):
  hu = np.array([-1000, 0, 40, 1000], dtype=np.int32).reshape(1, 2, 2).astype(dtype)
  out = volumes.load_contract_volume(_save_npz(tmp_path / "v.npz", hu))
  assert out.dtype == np.float32
  np.testing.assert_array_equal(out, hu.astype(np.float32))


@pytest.mark.parametrize("array, message", [
    (np.full((4, 5), 100.0, np.float32), "3-D"),
    (np.zeros((0, 4, 5), np.float32), "empty"),
    (np.ones((2, 3, 4), bool), "dtype bool"),
    (np.full((2, 3, 4), 100 + 1j, np.complex64), "dtype complex64"),
    (np.full((2, 3, 4), 100, object), "Object arrays"),
    (np.array([-1000, np.nan, 0, 40], np.float32).reshape(1, 2, 2), "NaN or infinite"),
    (np.array([-1000, np.inf, 0, 40], np.float64).reshape(1, 2, 2), "NaN or infinite"),
    (np.linspace(-1, 1, 24, dtype=np.float32).reshape(2, 3, 4), "inside [-1, 1]: not Hounsfield units"),
])
def test_contract_refusals(tmp_path, array, message):
  path = _save_npz(tmp_path / "bad.npz", array)
  with pytest.raises(DataError, match=r"bad\.npz") as e:
    volumes.load_contract_volume(path)
  assert message in str(e.value)


def test_ct_clip_refusal_explains_the_hu_contract(tmp_path):
  ct_clip = np.clip(np.random.default_rng(0).uniform(-1500, 1500, (3, 4, 5)), -1000, 1000) / 1000
  with pytest.raises(DataError) as e:
    volumes.load_contract_volume(_save_npz(tmp_path / "train_1a.npz", ct_clip.astype(np.float32)))
  for phrase in ("Hounsfield units", "air about -1000", "CT-CLIP", "clip(HU, -1000, 1000) / 1000", "ct_prepare"):
    assert phrase in str(e.value)


def test_unreadable_contract_files(tmp_path):
  np.savez(tmp_path / "key.npz", volume=np.zeros((2, 2, 2), np.float32))
  np.save(tmp_path / "bare.npy", np.zeros((2, 2, 2), np.float32))
  (tmp_path / "junk.npz").write_bytes(b"not an archive")
  for name, message in [("key.npz", "has no 'arr_0' array (keys: ['volume'])"), ("bare.npy", "bare .npy array"),
                        ("junk.npz", "not a readable .npz file"), ("missing.npz", "not a readable .npz file")]:
    with pytest.raises(DataError, match=name.replace(".", r"\.")) as e:
      volumes.load_contract_volume(tmp_path / name)
    assert message in str(e.value)


# --- intensity mapping and crop/pad (§2.3) --------------------------------------------------------------------

def test_intensity_map_spec_vector():
  """§13.4, exact in float32."""
  out = volumes.intensity_map(np.array([-2000, -1000, -400, 0, 200, 1000], np.float32))
  assert out.dtype == np.float32
  np.testing.assert_array_equal(out, np.array([-0.449, -0.449, 0.051, 0.3843333, 0.551, 0.551], np.float32))
  assert volumes.intensity_map(np.float32(volumes.HU_MIN)) == np.float32(volumes.AIR)


def test_intensity_map_is_the_original_torch_ops_bitwise():
  hu = np.random.default_rng(0).uniform(-3000, 3000, 100_000).astype(np.float32)
  ref = (torch.clamp(torch.from_numpy(hu), -1000, 200) + 1000) / 1200 - 0.449
  np.testing.assert_array_equal(volumes.intensity_map(hu), ref.numpy())


_CROP_PAD_CASES = [  # §13.5: input shape → per-axis (start, end, pad_before, pad_after) for (240, 480, 480)
    ((300, 512, 400), [(30, 270, 0, 0), (16, 496, 0, 0), (0, 400, 40, 40)]),
    ((101, 481, 479), [(0, 101, 69, 70), (0, 480, 0, 0), (0, 479, 0, 1)]),
    ((241, 512, 512), [(0, 240, 0, 0), (16, 496, 0, 0), (16, 496, 0, 0)]),
    ((90, 400, 400), [(0, 90, 75, 75), (0, 400, 40, 40), (0, 400, 40, 40)]),
]


@pytest.mark.parametrize("shape, plans", _CROP_PAD_CASES)
def test_crop_or_pad_spec_vectors(shape, plans):
  """§13.5: the plans, and per axis the actual array (other axes of length 1; crop/pad acts per axis), whose padded
  voxels hold normalised air, −0.449."""
  assert [volumes.crop_or_pad_plan(n, t) for n, t in zip(shape, volumes.TARGET_SHAPE)] == plans
  for axis, (n, t, (start, end, before, after)) in enumerate(zip(shape, volumes.TARGET_SHAPE, plans)):
    along = [1, 1, 1]
    along[axis] = n
    hu = np.arange(n, dtype=np.float32).reshape(along)
    target = [1, 1, 1]
    target[axis] = t
    out = volumes.preprocess(hu, target).reshape(-1)
    air = np.float32(-0.449)
    expected = np.concatenate([np.full(before, air), volumes.intensity_map(np.arange(start, end)), np.full(after, air)])
    assert out.dtype == np.float32 and out.shape == (t,)
    np.testing.assert_array_equal(out, expected.astype(np.float32))


def test_crop_and_pad_together_in_3d():
  x = np.random.default_rng(0).standard_normal((5, 6, 7)).astype(np.float32)
  out = volumes.center_crop_or_pad(x, (4, 9, 7), fill=-0.449)
  expected = np.full((4, 9, 7), np.float32(-0.449), np.float32)
  expected[:, 1:7, :] = x[0:4, :, :]  # d: (0, 4, 0, 0), h: (0, 6, 1, 2), w unchanged
  np.testing.assert_array_equal(out, expected)


def test_preprocess_normalises_before_padding():
  out = volumes.preprocess(np.full((2, 2, 2), 3000.0, np.float32), (4, 2, 2))
  np.testing.assert_array_equal(out[:, 0, 0], np.float32([-0.449, 0.551, 0.551, -0.449]))


# --- resampling (§2.4) ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, spacing, expected", [  # §13.6
    ((300, 512, 512), (1.0, 0.6, 0.6), (200, 409, 409)),
    ((120, 512, 512), (3.0, 0.703125, 0.703125), (240, 480, 480)),
    ((200, 512, 512), (1.25, 0.78125, 0.78125), (166, 533, 533)),
    ((500, 512, 512), (0.625, 0.9765625, 0.9765625), (208, 666, 666)),
])
def test_resampled_shape_spec_vectors(shape, spacing, expected):
  assert volumes.resampled_shape(shape, spacing) == expected


@pytest.mark.parametrize("spacing", [(0.0, 0.75, 0.75), (1.5, -0.75, 0.75), (1e-6, 0.75, 0.75)])
def test_resampled_shape_refuses_bad_spacing(spacing):
  with pytest.raises(ValueError):
    volumes.resampled_shape((8, 12, 10), spacing)


def test_linear_taps_follow_the_spec_formula():
  """2 → 4: c = max((o + 0.5)/2 − 0.5, 0) = (0, 0.25, 0.75, 1.25); the last tap clamps to the last voxel."""
  out = volumes.resample_trilinear(np.float32([10, 20]).reshape(1, 1, 2), (1, 1, 4))
  np.testing.assert_array_equal(out.reshape(-1), np.float32([10, 12.5, 17.5, 20]))


@pytest.mark.parametrize("out_shape", [(13, 17, 23), (5, 7, 4), (16, 5, 10), (3, 30, 7), (8, 12, 10), (1, 1, 1)])
def test_resample_trilinear_matches_torch(out_shape):
  """Up, down, mixed, identity; measured bit-identical to torch's CPU kernel, asserted to 1e-6 (unit-scale data)."""
  x = np.random.default_rng(0).standard_normal((8, 12, 10)).astype(np.float32)
  out = volumes.resample_trilinear(x, out_shape)
  assert out.dtype == np.float32 and out.shape == out_shape
  np.testing.assert_allclose(out, _torch_resize(x, out_shape), rtol=0, atol=1e-6)


# --- reorientation and NIfTI → contract (§2.4) ----------------------------------------------------------------

def _stored(slp: np.ndarray, spacing, perm, flips, offset=(10.0, -20.0, 30.0)):
  """(voxel array, affine) of a volume whose contract form is ``slp``: stored axis a is contract axis ``perm[a]``,
  reversed where ``flips[a]``; the affine is written from the definition of RAS+ (independent of nibabel's
  orientation code)."""
  array = np.transpose(slp, perm)
  affine = np.eye(4)
  affine[:3, 3] = offset
  for a, (axis, flip) in enumerate(zip(perm, flips)):
    if flip:
      array = np.flip(array, a)
    affine[:3, a] = _SLP_DIRECTIONS[axis] * spacing[axis] * (-1 if flip else 1)
  return np.ascontiguousarray(array), affine


_ORIENTATIONS = {  # name: (perm, flips); nibabel axis codes of the stored axes in the comment
    "slp": ((0, 1, 2), (False, False, False)),  # S L P: already the contract
    "lps_ct_rate": ((1, 2, 0), (False, False, False)),  # L P S: CT-RATE's voxel order, the original's (k, i, j)
    "ras": ((1, 2, 0), (True, True, False)),  # R A S
    "pis": ((2, 0, 1), (False, True, False)),  # P I L
}


@pytest.mark.parametrize("name", sorted(_ORIENTATIONS))
def test_reorient_to_slp(name):
  slp = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
  array, affine = _stored(slp, (2.0, 0.9, 0.6), *_ORIENTATIONS[name])
  out, spacing = volumes.reorient_to_slp(array, affine)
  np.testing.assert_array_equal(out, slp)
  assert out.flags.c_contiguous
  np.testing.assert_allclose(spacing, (2.0, 0.9, 0.6), rtol=1e-12)
  if name == "lps_ct_rate":
    np.testing.assert_array_equal(out, np.transpose(array, (2, 0, 1)))


def test_reorient_refuses_a_degenerate_affine():
  with pytest.raises(ValueError):
    volumes.reorient_to_slp(np.zeros((2, 3, 4), np.float32), np.diag([1.0, 0.0, 1.0, 1.0]))


def _hu_volume(shape=(8, 12, 10), seed=0) -> tuple[np.ndarray, np.ndarray]:
  """(raw int16, HU = 2·raw − 1024 as float32) in contract orientation."""
  raw = np.random.default_rng(seed).integers(0, 1600, shape).astype(np.int16)
  return raw, (2 * raw.astype(np.float32) - 1024)


def _write_nifti(path, raw: np.ndarray, affine: np.ndarray, header_scaling=None) -> str:
  image = nibabel.Nifti1Image(raw, affine)
  if header_scaling is not None:
    image.header.set_slope_inter(*header_scaling)
  image.to_filename(path)
  written = nibabel.load(path)
  assert (written.dataobj.slope, written.dataobj.inter) == (header_scaling or (1.0, 0.0))
  np.testing.assert_array_equal(np.asanyarray(written.dataobj.get_unscaled()), raw)
  return str(path)


@pytest.mark.parametrize("name", sorted(_ORIENTATIONS))
@pytest.mark.parametrize("header_scaling, metadata", [
    ((2.0, -1024.0), (None, None)),  # scaling in the header only: nibabel applies it
    (None, (2.0, -1024.0)),  # metadata only: applied here
    ((2.0, -1024.0), (2.0, -1024.0)),  # both, equal: applied once
])
def test_nifti_to_contract(tmp_path, name, header_scaling, metadata):
  spacing = (2.0, 0.9, 0.6)  # affine spacing, contract order (z, x, y)
  raw_slp, hu_slp = _hu_volume()
  raw, affine = _stored(raw_slp, spacing, *_ORIENTATIONS[name])
  path = _write_nifti(tmp_path / "train_1_a_1.nii.gz", raw, affine, header_scaling)
  out = volumes.nifti_to_contract(path, *metadata)
  shape = volumes.resampled_shape(hu_slp.shape, spacing)
  assert shape == (10, 14, 8) and out.shape == shape and out.dtype == np.float32
  np.testing.assert_allclose(out, _torch_resize(hu_slp, shape), rtol=0, atol=_HU_ATOL)


def test_nifti_metadata_spacing_overrides_the_affine(tmp_path):
  raw_slp, hu_slp = _hu_volume()
  raw, affine = _stored(raw_slp, (1.0, 1.0, 1.0), *_ORIENTATIONS["ras"])
  path = _write_nifti(tmp_path / "v.nii.gz", raw, affine)
  out = volumes.nifti_to_contract(path, 2.0, -1024.0, spacing=(3.0, 0.6, 0.6))
  assert out.shape == (16, 9, 8)
  np.testing.assert_allclose(out, _torch_resize(hu_slp, (16, 9, 8)), rtol=0, atol=_HU_ATOL)


def test_nifti_refusals(tmp_path):
  raw, affine = _stored(_hu_volume()[0], (1.5, 0.75, 0.75), *_ORIENTATIONS["slp"])
  mismatch = _write_nifti(tmp_path / "mismatch.nii.gz", raw, affine, (2.0, -1024.0))
  with pytest.raises(DataError, match=r"mismatch\.nii\.gz: the header's scl_slope/scl_inter \(2\.0, -1024\.0\)"):
    volumes.nifti_to_contract(mismatch, 1.0, -1024.0)
  nibabel.Nifti1Image(np.zeros((2, 3, 4, 2), np.int16), np.eye(4)).to_filename(tmp_path / "4d.nii.gz")
  with pytest.raises(DataError, match=r"4d\.nii\.gz: expected a 3-D volume"):
    volumes.nifti_to_contract(tmp_path / "4d.nii.gz")
  nibabel.Nifti1Image(np.full((4, 4, 4), 0.5, np.float32), np.eye(4)).to_filename(tmp_path / "scaled.nii.gz")
  with pytest.raises(DataError, match=r"scaled\.nii\.gz: values lie in \[0\.5, 0\.5\]"):
    volumes.nifti_to_contract(tmp_path / "scaled.nii.gz")
  (tmp_path / "junk.nii.gz").write_bytes(b"junk")
  with pytest.raises(DataError, match=r"junk\.nii\.gz is not a readable NIfTI file"):
    volumes.nifti_to_contract(tmp_path / "junk.nii.gz")


@pytest.mark.parametrize("value, expected", [("[0.75, 0.75]", (0.75, 0.75)), ("[0.7, 0.8]", (0.7, 0.8)),
                                             ("(0.5,0.5)", (0.5, 0.5))])
def test_parse_xy_spacing(value, expected):
  assert volumes.parse_xy_spacing(value, "row 3") == expected


@pytest.mark.parametrize("value", ["0.75", "[0.75]", "[0.75, 0.75, 1.0]", "[a, b]", "[-0.75, 0.75]", "", None,
                                   "[inf, 1]"])
def test_parse_xy_spacing_refusals(value):
  with pytest.raises(DataError, match="row 3: XYSpacing"):
    volumes.parse_xy_spacing(value, "row 3")
