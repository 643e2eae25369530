"""input_pipeline.ct_prepare: CT-RATE NIfTI + metadata CSV → contract .npz files in CT-RATE's layout (CT-AGRG spec
§2.1, §2.2, §2.4): the CLI once as a subprocess, then in process — array contents against an independent
reorientation + torch resampling, skip-existing / --overwrite, and one ``error:`` line per user error."""

from __future__ import annotations

import csv
import subprocess
import sys

import nibabel
import numpy as np
import pytest
import torch

from conftest import REPO
from input_pipeline import ct_prepare, volumes

_HU_ATOL = 2e-3  # HU: 1e-6 of the ~2000 HU range (measured: bit-identical)
_METADATA_SPACING = (2.0, 0.9)  # ZSpacing, XYSpacing
_SLOPE, _INTERCEPT = 2.0, -1024.0
# name: (seed, stored axes = contract axes permuted and flipped (nibabel codes in the comment), header scaling); the
# affine spacing is 1 mm (wrong on purpose: the metadata spacing is the one used). The header scaling equals the
# metadata's: nibabel applies it, the converter must not apply it again.
_VOLUMES = {
    "train_1_a_1.nii.gz": (0, (1, 2, 0), (False, False, False), None),  # L P S, CT-RATE's voxel order
    "train_1_a_2.nii.gz": (1, (1, 2, 0), (True, True, False), None),  # R A S
    "train_2_b_1.nii.gz": (2, (2, 0, 1), (False, True, False), (_SLOPE, _INTERCEPT)),  # P I L
}
_SLP_DIRECTIONS = np.array([[0, 0, 1], [-1, 0, 0], [0, -1, 0]], dtype=np.float64)  # RAS+ direction of S, L, P


def _hu_slp(seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(raw int16, HU = 2·raw − 1024 float32), both (8, 12, 10) in contract orientation."""
  raw = np.random.default_rng(seed).integers(0, 1600, (8, 12, 10)).astype(np.int16)
  return raw, 2 * raw.astype(np.float32) - 1024


def _write_nifti(path, seed: int, perm, flips, header_scaling) -> None:
  """The raw volume stored with its axes permuted/flipped, with the matching 1 mm RAS+ affine."""
  raw = np.transpose(_hu_slp(seed)[0], perm)
  affine = np.eye(4)
  for a, (axis, flip) in enumerate(zip(perm, flips)):
    raw = np.flip(raw, a) if flip else raw
    affine[:3, a] = _SLP_DIRECTIONS[axis] * (-1 if flip else 1)
  path.parent.mkdir(parents=True, exist_ok=True)
  image = nibabel.Nifti1Image(np.ascontiguousarray(raw), affine)
  if header_scaling:
    image.header.set_slope_inter(*header_scaling)
  image.to_filename(path)
  assert (nibabel.load(path).dataobj.slope, nibabel.load(path).dataobj.inter) == (header_scaling or (1.0, 0.0))


def _expected(seed: int) -> np.ndarray:
  """The contract array, independently: HU in SLP, torch trilinear to (z, xy, xy) → (1.5, 0.75, 0.75) mm."""
  hu = _hu_slp(seed)[1]
  z, xy = _METADATA_SPACING
  shape = (int(8 * z / 1.5), int(12 * xy / 0.75), int(10 * xy / 0.75))
  assert shape == (10, 14, 12)
  return torch.nn.functional.interpolate(torch.from_numpy(hu)[None, None], size=shape, mode="trilinear",
                                         align_corners=False)[0, 0].numpy()


def _write_metadata(path, names) -> None:
  with path.open("w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["VolumeName", "Manufacturer", "XYSpacing", "ZSpacing", "RescaleSlope", "RescaleIntercept"])
    z, xy = _METADATA_SPACING
    w.writerows([name, "SIEMENS", f"[{xy}, {xy}]", z, _SLOPE, _INTERCEPT] for name in names)


@pytest.fixture
def ct_rate(tmp_path):
  """(nifti_dir, metadata CSV, out_dir) of a 3-volume CT-RATE-layout split."""
  nifti_dir = tmp_path / "dataset" / "train"
  for name, (seed, *layout) in _VOLUMES.items():
    split, patient, scan, _ = name.split("_")
    _write_nifti(nifti_dir / f"{split}_{patient}" / f"{split}_{patient}_{scan}" / name, seed, *layout)
  _write_metadata(tmp_path / "train_metadata.csv", _VOLUMES)
  return nifti_dir, tmp_path / "train_metadata.csv", tmp_path / "npz"


def _args(nifti_dir, metadata, out_dir, *extra) -> list[str]:
  return ["--nifti_dir", str(nifti_dir), "--metadata", str(metadata), "--out_dir", str(out_dir), *extra]


_OUTPUTS = ["train_1/train_1_a/train_1_a_1.nii.gz.npz", "train_1/train_1_a/train_1_a_2.nii.gz.npz",
            "train_2/train_2_b/train_2_b_1.nii.gz.npz"]


def test_cli_writes_contract_files_in_ct_rate_layout(ct_rate):
  nifti_dir, metadata, out_dir = ct_rate
  r = subprocess.run([sys.executable, "-m", "input_pipeline.ct_prepare", *_args(*ct_rate)], cwd=REPO,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.strip() == f"{out_dir}: 3 volume(s) converted, 0 already present."
  assert sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file()) == _OUTPUTS
  for rel, (seed, *_) in zip(_OUTPUTS, _VOLUMES.values()):
    with np.load(out_dir / rel) as f:
      assert f.files == ["arr_0"] and f["arr_0"].dtype == np.float32
    out = volumes.load_contract_volume(out_dir / rel)
    np.testing.assert_allclose(out, _expected(seed), rtol=0, atol=_HU_ATOL)


def test_skips_existing_outputs_unless_overwrite(ct_rate, capsys):
  nifti_dir, metadata, out_dir = ct_rate
  assert ct_prepare.main(_args(*ct_rate)) == 0
  sentinel = out_dir / _OUTPUTS[0]
  np.savez(sentinel, np.full((2, 2, 2), 7.0, np.float32))
  capsys.readouterr()
  assert ct_prepare.main(_args(*ct_rate)) == 0
  assert capsys.readouterr().out.strip() == (f"{out_dir}: 0 volume(s) converted, 3 already present "
                                             "(--overwrite converts them again).")
  assert volumes.load_contract_volume(sentinel).shape == (2, 2, 2)
  assert ct_prepare.main(_args(*ct_rate, "--overwrite")) == 0
  assert capsys.readouterr().out.strip() == f"{out_dir}: 3 volume(s) converted, 0 already present."
  np.testing.assert_allclose(volumes.load_contract_volume(sentinel), _expected(0), rtol=0, atol=_HU_ATOL)
  assert not list(out_dir.rglob("*.partial"))


def _error_line(capsys, argv) -> str:
  assert ct_prepare.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
  return err


def test_missing_metadata_row_is_one_error_line(ct_rate, capsys):
  nifti_dir, metadata, out_dir = ct_rate
  _write_metadata(metadata, ["train_1_a_1.nii.gz", "train_2_b_1.nii.gz"])
  err = _error_line(capsys, _args(*ct_rate))
  missing = nifti_dir / "train_1" / "train_1_a" / "train_1_a_2.nii.gz"
  assert f"{missing}: no row with VolumeName 'train_1_a_2.nii.gz' in metadata CSV {metadata}" in err
  assert not out_dir.exists()  # every row is checked before the first conversion


def test_user_errors(ct_rate, capsys):
  nifti_dir, metadata, out_dir = ct_rate
  no_z = metadata.with_name("no_z.csv")
  no_z.write_text("VolumeName,XYSpacing,RescaleSlope,RescaleIntercept\n")
  assert f"Metadata CSV {no_z} lacks column(s) ['ZSpacing']" in _error_line(capsys, _args(nifti_dir, no_z, out_dir))
  assert "NIfTI folder" in _error_line(capsys, _args(nifti_dir / "nope", metadata, out_dir))
  rows = list(csv.reader(metadata.open()))
  rows[1][2] = "0.9"
  with metadata.open("w", newline="") as f:
    csv.writer(f).writerows(rows)
  err = _error_line(capsys, _args(*ct_rate))
  assert f"Metadata CSV {metadata}, VolumeName 'train_1_a_1.nii.gz': XYSpacing '0.9'" in err
  (nifti_dir / "scan.nii.gz").write_bytes(b"")
  assert "'scan.nii.gz' is not of the CT-RATE form" in _error_line(capsys, _args(*ct_rate))


def test_output_path_follows_ct_rate_names():
  """Spec §13.8: train_12_b_2.nii.gz → accession folder train_12_b, file train_12_b_2.nii.gz.npz."""
  assert ct_prepare.output_path(REPO, "train_12_b_2.nii.gz") == REPO / "train_12/train_12_b/train_12_b_2.nii.gz.npz"
  assert ct_prepare.output_path(REPO, "valid_7_c_10.nii.gz") == REPO / "valid_7/valid_7_c/valid_7_c_10.nii.gz.npz"
