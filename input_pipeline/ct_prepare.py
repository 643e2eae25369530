"""CT-RATE NIfTI volumes → volume-contract ``.npz`` files, written once so that data workers only read ``.npz``
(CT-AGRG spec §2.1, §2.2, §2.4; the conversion itself is ``input_pipeline.volumes.nifti_to_contract``).

CLI::

  python -m input_pipeline.ct_prepare --nifti_dir CT-RATE/dataset/train --metadata train_metadata.csv \
      --out_dir data/ct_rate/train [--overwrite]

Every ``<nifti_dir>/**/*.nii.gz`` must be named ``<split>_<patient>_<scan>_<recon>.nii.gz`` (e.g.
``train_1_a_1.nii.gz``) and have a row in the metadata CSV whose ``VolumeName`` is that file name (the first such
row counts); its ``XYSpacing`` (a string such as ``"[0.75, 0.75]"``; like CT-CLIP, the first number is used for both
in-plane axes), ``ZSpacing``, ``RescaleSlope`` and ``RescaleIntercept`` give the spacing and the HU scaling.
Output, CT-RATE's folder layout (what the loaders glob, ``<out_dir>/*/*/*.npz``)::

  <out_dir>/<split>_<patient>/<split>_<patient>_<scan>/<name>.npz     e.g. train_1/train_1_a/train_1_a_1.nii.gz.npz

holding ``arr_0`` = float32 HU ``(D, H, W)`` (``np.savez``, uncompressed). Names, rows and spacings are all checked
before the first conversion. Existing outputs are skipped unless ``--overwrite``; each file is written under a
temporary name and renamed, so an interrupted run leaves no partial ``.npz`` and resumes where it stopped.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import pathlib
import re
import sys
from collections.abc import Sequence

import numpy as np
import tqdm

from input_pipeline import volumes
from input_pipeline.records import DataError

METADATA_COLUMNS = ("VolumeName", "XYSpacing", "ZSpacing", "RescaleSlope", "RescaleIntercept")
NIFTI_SUFFIX = ".nii.gz"
_VOLUME_NAME = re.compile(r"^([^_/]+)_([^_/]+)_([^_/]+)_([^_/]+)\.nii\.gz$")


@dataclasses.dataclass(frozen=True)
class Conversion:
  """One volume to convert: source, destination and its metadata (spacing in mm, contract axis order (z, x, y))."""
  source: pathlib.Path
  target: pathlib.Path
  spacing: tuple[float, float, float]
  rescale_slope: float
  rescale_intercept: float


def output_path(out_dir: pathlib.Path, name: str) -> pathlib.Path:
  """``train_1_a_1.nii.gz`` → ``out_dir/train_1/train_1_a/train_1_a_1.nii.gz.npz``; ``DataError`` for a name not
  of the form ``<split>_<patient>_<scan>_<recon>.nii.gz``."""
  m = _VOLUME_NAME.match(name)
  if not m:
    raise DataError(f"NIfTI file name {name!r} is not of the CT-RATE form <split>_<patient>_<scan>_<recon>.nii.gz "
                    "(e.g. train_1_a_1.nii.gz).")
  split, patient, scan, _ = m.groups()
  return out_dir / f"{split}_{patient}" / f"{split}_{patient}_{scan}" / f"{name}.npz"


def read_metadata(csv_path: pathlib.Path) -> dict[str, dict[str, str]]:
  """``VolumeName`` → its first row; ``DataError`` for an unreadable CSV or missing columns."""
  try:
    with csv_path.open(newline="", encoding="utf-8-sig") as f:
      reader = csv.DictReader(f)
      missing = [c for c in METADATA_COLUMNS if c not in (reader.fieldnames or ())]
      if missing:
        raise DataError(f"Metadata CSV {csv_path} lacks column(s) {missing}; it needs {list(METADATA_COLUMNS)}.")
      rows: dict[str, dict[str, str]] = {}
      for row in reader:
        rows.setdefault(row["VolumeName"], row)
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise DataError(f"Metadata CSV {csv_path} is not readable: {e}") from e
  return rows


def _number(row: dict[str, str], column: str, where: str, positive: bool = False) -> float:
  try:
    value = float(row[column])
  except (TypeError, ValueError):
    value = math.nan
  if not math.isfinite(value) or (positive and value <= 0):
    raise DataError(f"{where}: {column} {row[column]!r} is not a{' positive' if positive else ''} number.")
  return value


def find_volumes(nifti_dir: pathlib.Path) -> list[pathlib.Path]:
  """The ``*.nii.gz`` files under ``nifti_dir`` (recursively), sorted; ``DataError`` if there are none or two share
  a file name (their outputs would collide)."""
  if not nifti_dir.is_dir():
    raise DataError(f"NIfTI folder {nifti_dir} not found.")
  paths = sorted(nifti_dir.glob(f"**/*{NIFTI_SUFFIX}"))
  if not paths:
    raise DataError(f"No *{NIFTI_SUFFIX} file under {nifti_dir}.")
  seen: dict[str, pathlib.Path] = {}
  for p in paths:
    if p.name in seen:
      raise DataError(f"Two NIfTI files named {p.name}: {seen[p.name]} and {p}.")
    seen[p.name] = p
  return paths


def plan(nifti_dir: pathlib.Path, metadata_csv: pathlib.Path, out_dir: pathlib.Path) -> list[Conversion]:
  """One ``Conversion`` per NIfTI file, every name and metadata row checked."""
  rows = read_metadata(metadata_csv)
  conversions = []
  for source in find_volumes(nifti_dir):
    target = output_path(out_dir, source.name)
    row = rows.get(source.name)
    if row is None:
      raise DataError(f"{source}: no row with VolumeName {source.name!r} in metadata CSV {metadata_csv}.")
    where = f"Metadata CSV {metadata_csv}, VolumeName {source.name!r}"
    xy, _ = volumes.parse_xy_spacing(row["XYSpacing"], where)
    conversions.append(Conversion(source, target, (_number(row, "ZSpacing", where, positive=True), xy, xy),
                                  _number(row, "RescaleSlope", where), _number(row, "RescaleIntercept", where)))
  return conversions


def _write_npz(path: pathlib.Path, volume: np.ndarray) -> None:
  """``np.savez`` to a temporary name, then renamed: ``path`` is either absent or complete."""
  path.parent.mkdir(parents=True, exist_ok=True)
  partial = path.with_name(path.name + ".partial")
  with partial.open("wb") as f:
    np.savez(f, volume)
  partial.replace(path)


def prepare(nifti_dir: str | pathlib.Path, metadata_csv: str | pathlib.Path, out_dir: str | pathlib.Path,
            overwrite: bool = False, progress: bool = True) -> tuple[int, int]:
  """Converts every NIfTI volume under ``nifti_dir`` into ``out_dir``; returns (converted, skipped as present)."""
  conversions = plan(pathlib.Path(nifti_dir), pathlib.Path(metadata_csv), pathlib.Path(out_dir))
  todo = [c for c in conversions if overwrite or not c.target.exists()]
  for c in tqdm.tqdm(todo, desc="ct_prepare", unit="volume", disable=not progress, dynamic_ncols=True):
    _write_npz(c.target, volumes.nifti_to_contract(c.source, c.rescale_slope, c.rescale_intercept, c.spacing))
  return len(todo), len(conversions) - len(todo)


def main(argv: Sequence[str] | None = None) -> int:
  from rrg_jax import cli  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(prog="python -m input_pipeline.ct_prepare", description=__doc__.split("\n\n")[0])
  parser.add_argument("--nifti_dir", required=True, help="folder searched recursively for *.nii.gz (CT-RATE split)")
  parser.add_argument("--metadata", required=True,
                      help="CT-RATE metadata CSV: VolumeName, XYSpacing, ZSpacing, RescaleSlope, RescaleIntercept")
  parser.add_argument("--out_dir", required=True, help="root of the <split>_<patient>/<accession>/*.npz tree")
  parser.add_argument("--overwrite", action="store_true", help="convert again volumes whose .npz exists")
  args = parser.parse_args(argv)

  def run():
    converted, skipped = prepare(args.nifti_dir, args.metadata, args.out_dir, overwrite=args.overwrite)
    print(f"{args.out_dir}: {converted} volume(s) converted, {skipped} already present"
          + (" (--overwrite converts them again)." if skipped else "."))

  return cli.run_main(run)


if __name__ == "__main__":
  sys.exit(main())
