r"""**SYNTHETIC** chest-CT phantoms in CT-RATE's file layout: the embedded default data set of CT-AGRG.

    THIS IS SYNTHETIC DATA. NOT PATIENT DATA. NOT REAL ANATOMY. NOT FOR ANY CLINICAL OR SCIENTIFIC CLAIM.

No real CT can be shipped with this repository, so the default CT-AGRG config trains and evaluates on volumes drawn
here: cartoon thoraxes made of ellipses, ellipsoids and tubes with textbook Hounsfield values, plus report texts
assembled from templates. They exist to exercise the whole pipeline (contract files, CSVs, sentence extraction, the
18-way detector, the report decoder) and to give a small CNN something learnable from ~100 volumes. There is no
anatomical fidelity (no pulmonary vessels, fissures, liver, muscles, realistic shapes or proportions, scanner
physics or artefacts); any number measured on them says nothing about real CT.

What a phantom contains (``render``; HU before noise). Orientation "SLP" (ct_agrg_spec.md §2.2): axis 0 inferior →
superior, axis 1 patient right → left (right at index 0), axis 2 anterior → posterior. The anatomy is drawn in
coordinates relative to the grid, so it fills any shape (per volume, its size, position and proportions vary by a
few per cent); the nominal spacing written to the metadata is the contract's (1.5, 0.75, 0.75) mm, but the phantom
is not to scale (the default 48 × 192 × 192 volume holds a whole, squashed thorax).

* outside the body: air −1000 (exactly; no noise);
* body: elliptical cross-section, subcutaneous fat rim −100 around soft tissue 40; ribs 500 (a helical pattern of
  arcs in the chest wall), sternum 400; mediastinal fat −90;
* lungs −850, two ellipsoids (the right one reaching slightly higher), minus the mediastinum;
* heart 40 (a rotated ellipsoid, anterior and to the left, lower half) in a −100 pericardial fat layer; ascending
  aorta, arch and descending aorta (posterior-left of the spine) 45 in a −90 fat cuff; superior vena cava 40;
  trachea and main bronchi (air with a 40 HU wall);
* spine: vertebral bodies 350 with a 700 cortex, 80 HU discs, posterior arch 600 around a 30 HU cord.

Abnormalities (``RENDERED``: 12 of the 18 CT-RATE labels; the other six, ``NEVER_RENDERED``, never occur and are
always 0). Small-lesion sizes are in voxels of a 192-wide grid (they scale with ``min(H, W) / 192``). Saturation:
the CT-AGRG intensity map clips to [−1000, 200] HU, so metal, calcium and bone look alike to the network; they are
told apart by where they are.

* Medical material: a port (2500 HU disc, radius 4 voxels, in the right anterior subcutaneous fat) with a catheter
  (2000 HU, ~1 voxel thick) running to the superior vena cava and down it, or a central venous catheter down the
  vena cava from the top slice. Only metal reaches ≥ 1500 HU (everything else stays ≤ 1000 + noise).
* Arterial wall calcification: 3–8 spots of 600–1000 HU (radius 1.6–2.4 voxels) on the aortic wall.
* Cardiomegaly: the heart's in-plane axes × 1.30–1.42 (normal hearts × 0.92–1.05), its height × 1.15–1.21.
* Pericardial effusion: a 15 HU rim, 4–7 voxels (3–5 mm) thick, between the heart and its fat layer.
* Coronary artery wall calcification: 2–4 spots of 600–1000 HU on the anterior heart surface.
* Hiatal hernia: a round 40 HU-walled sac behind the heart in the lowest slices, air (anterior, non-dependent) over
  20 HU fluid.
* Emphysema: 50–90 patches of −980 HU, radius 2.5–5 voxels, in the upper two thirds of both lungs.
* Atelectasis: a plate ~3.6 voxels thick and 3 slices high, −10 HU, in a lower zone.
* Lung nodule: 1–3 balls of 40 HU, radius 3–6 voxels (diameter 4.5–9 mm at 0.75 mm), fully inside aerated lung.
* Lung opacity: 1–2 ground-glass blobs of −500 HU.
* Pleural effusion: dependent (posterior) 10 HU fluid at the lung base, one side or both.
* Consolidation: a lobe-sized 30 HU region of one lung.

The lung lesions are placed in still-aerated lung only, so none hides another (a nodule never sits in a
consolidation, an opacity or an effusion).

Noise: Gaussian, σ = 12 HU, inside the body, with a grain of 3 × 3 voxels in-plane (like a soft reconstruction
kernel; independent per slice). The grain is a size trade-off: deflate compresses a volume to ~0.3 MB with it and
~0.42 MB with a 2 × 2 grain. Values are rounded to whole HU: ``phantom`` returns them as float32, the files store
**int16** HU (``np.savez_compressed``), and the CT-AGRG loader (``input_pipeline.volumes.load_contract_volume``)
casts integer arrays to float32, which gives back exactly ``phantom``'s values.

Reports (``report``): CT-RATE-style ``Findings_EN`` / ``Impressions_EN`` from templates with a few paraphrases each.
Every present abnormality is stated with a keyword of the §9.3 lexicon (``input_pipeline.ct_sentences``): "A 6 mm
nodule is seen in the right upper lobe.", "Bilateral pleural effusion is observed.", "Heart size is enlarged.", ...;
CT-RATE's stock negatives stand for absent cardiomegaly, pericardial and pleural effusion ("Heart size is normal.",
"Pericardial effusion-thickening was not observed.", "No pleural effusion or pneumothorax was detected."), plus
neutral normal sentences ("Trachea and both main bronchi are open."). No absent abnormality is stated positively.

Data set (``write_dataset`` / ``ensure_dataset``; CT-RATE layout, §2.1–§2.2)::

    <out>/train/train_<p>/train_<p>_a/train_<p>_a_1.nii.gz.npz     train (p = 1..n_train) and val (the next n_val)
    <out>/valid/valid_<p>/valid_<p>_a/valid_<p>_a_1.nii.gz.npz     test  (p = 1..n_test)
    <out>/{train,val,test}_{labels,metadata,reports}.csv
    <out>/{train,val,test}_sentences.csv                           stage-2 sentences (§9.2)
    <out>/gpt2_tokenizer/{tokenizer.json,vocab.json}               GPT-2-style byte-level BPE of the train sentences
    <out>/manifest.json, <out>/README.md

As in the CT-AGRG configs (CT-RATE has train and valid only), validation volumes live in the *train* folder and are
told apart by their own CSVs (the loader keeps only the files its labels CSV lists); CT-RATE's ``valid`` folder is
the test split. ``dataset_paths`` gives each split's folder, CSVs and the tokenizer folder. Labels: in each split a
fraction ``healthy_fraction`` of the volumes has no finding; each rendered abnormality is then given to exactly
``round(p · N)`` of the other volumes, drawn independently per abnormality, so its prevalence is ``p`` in every
split. The default set (144 volumes of 48 × 192 × 192) takes ~16 s on one core and ~43 MB; the CT-AGRG config asks
for 24 × 192 × 192.

Stage-2 text (§2.6, §9): each split's sentences CSV is written by the §9.3 rule extractor
(``input_pipeline.ct_sentences.build_sentences_csv``: one row per label-positive abnormality with a matching
sentence; the reports state every labelled abnormality with a lexicon keyword, so every positive gets one). The
tokenizer (``subword.train_subword(..., "bpe", GPT2_VOCAB_SIZE, family="gpt2")``) stands in for GPT-2's 50257-id
BPE: trained on the cleaned (``ct_rate.clean_sentence_text``) sentences of the train split's CSV, deterministic,
``<|endoftext|>`` its last id (``manifest.json`` records the id and the size). The templated sentences support
only ~600 ids (the trainer stops when every word is one token), fewer than the ``GPT2_VOCAB_SIZE`` asked for.

Determinism: everything is a function of ``seed``; volume ``i`` of a split draws from its own generators
(``np.random.default_rng([seed, split, stream, i])``), so its image and report do not depend on the counts.

CLI::

    python -m input_pipeline.synthetic_ct --out DIR [--seed 0] [--num_train 96] [--num_val 24] [--num_test 24] \
        [--shape 48 192 192] [--prevalence 0.3] [--healthy_fraction 0.15]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import json
import math
import os
import pathlib
import shutil
import sys
import tempfile
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tqdm

from input_pipeline import ct_rate, ct_sentences, subword, volumes

GENERATOR = "input_pipeline.synthetic_ct"
VERSION = 2  # 2: sentences CSVs and the GPT-2-style tokenizer
STATEMENT = "SYNTHETIC phantoms, not patient data"
ABNORMALITIES = ct_rate.ABNORMALITIES
RENDERED = (
    "Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
    "Coronary artery wall calcification", "Hiatal hernia", "Emphysema", "Atelectasis", "Lung nodule",
    "Lung opacity", "Pleural effusion", "Consolidation",
)  # in label order
NEVER_RENDERED = tuple(name for name in ABNORMALITIES if name not in RENDERED)
DEFAULT_SHAPE = (48, 192, 192)
DEFAULT_PREVALENCE = 0.3
DEFAULT_HEALTHY_FRACTION = 0.15
DEFAULTS: dict[str, Any] = dict(seed=0, num_train=96, num_val=24, num_test=24, shape=DEFAULT_SHAPE,
                                prevalence=DEFAULT_PREVALENCE, healthy_fraction=DEFAULT_HEALTHY_FRACTION)
# split → (volume folder, volume-name prefix); val shares CT-RATE's train folder, test is CT-RATE's valid.
SPLITS = {"train": ("train", "train"), "val": ("train", "train"), "test": ("valid", "valid")}
LABEL_COLUMNS = ("VolumeName", *ABNORMALITIES)
METADATA_COLUMNS = ("VolumeName", "XYSpacing", "ZSpacing", "RescaleSlope", "RescaleIntercept", "PatientSex",
                    "PatientAge")
REPORT_COLUMNS = ("VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN")
Z_SPACING, XY_SPACING, _ = volumes.CONTRACT_SPACING
NOISE_SIGMA = 12.0  # HU
NOISE_GRAIN = 3     # in-plane voxels per independent noise value (a 3 × 3 grain)
_MIN_SHAPE = (6, 48, 48)
_STREAM_LABELS, _STREAM_IMAGE, _STREAM_TEXT, _STREAM_META = range(4)
TOKENIZER_DIR = "gpt2_tokenizer"
GPT2_VOCAB_SIZE = 1024  # asked for; the synthetic sentences reach ~600 (module docstring)

# HU of the tissues (before noise).
AIR, FAT, MEDIASTINAL_FAT, SOFT, LUNG = -1000.0, -100.0, -90.0, 40.0, -850.0
HEART, AORTA, CORD, DISC = 40.0, 45.0, 30.0, 80.0
VERTEBRA, CORTEX, ARCH, RIB, STERNUM = 350.0, 700.0, 600.0, 500.0, 400.0
PLEURAL_FLUID, PERICARDIAL_FLUID, CONSOLIDATION, GROUND_GLASS, EMPHYSEMA = 10.0, 15.0, 30.0, -500.0, -980.0
NODULE, ATELECTASIS, HERNIA_FLUID, PORT, CATHETER = 40.0, -10.0, 20.0, 2500.0, 2000.0
CALCIUM_RANGE = (600.0, 1000.0)


# --- geometry -------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Frame:
  """Coordinates of a (D, H, W) grid: ``z`` (D, 1, 1) in (0, 1) inferior → superior; ``X`` (1, H, 1) and ``Y``
  (1, 1, W) in the *body frame* (the body's centre at 0, its half-width ≈ 0.9), X right → left, Y anterior →
  posterior; ``s`` = min(H, W) / 192, the scale of voxel-sized lesions."""
  shape: tuple[int, int, int]
  cx: float
  cy: float
  scale: float

  @functools.cached_property
  def z(self) -> np.ndarray:
    return ((np.arange(self.shape[0], dtype=np.float32) + 0.5) / self.shape[0])[:, None, None]

  @functools.cached_property
  def X(self) -> np.ndarray:  # noqa: N802
    x = (np.arange(self.shape[1], dtype=np.float32) + 0.5) / self.shape[1] * 2 - 1
    return ((x - self.cx) / self.scale)[None, :, None]

  @functools.cached_property
  def Y(self) -> np.ndarray:  # noqa: N802
    y = (np.arange(self.shape[2], dtype=np.float32) + 0.5) / self.shape[2] * 2 - 1
    return ((y - self.cy) / self.scale)[None, None, :]

  @property
  def s(self) -> float:
    return min(self.shape[1:]) / 192

  def voxel(self, z: float, x: float, y: float) -> np.ndarray:
    """Body-frame point → voxel coordinates (float (3,))."""
    d, h, w = self.shape
    return np.array([z * d - 0.5, ((x * self.scale + self.cx) + 1) / 2 * h - 0.5,
                     ((y * self.scale + self.cy) + 1) / 2 * w - 0.5])

  def point(self, index: Sequence[int]) -> tuple[float, float, float]:
    """Voxel index → body-frame (z, X, Y)."""
    k, i, j = index
    return float(self.z[k, 0, 0]), float(self.X[0, i, 0]), float(self.Y[0, 0, j])

  def frame_units(self, voxels: float) -> tuple[float, float]:
    """An in-plane length in voxels → body-frame units along (X, Y)."""
    return voxels * 2 / (self.shape[1] * self.scale), voxels * 2 / (self.shape[2] * self.scale)


def _box(frame: _Frame, centre: Sequence[float], semi: Sequence[float]
         ) -> tuple[tuple[slice, slice, slice], np.ndarray, np.ndarray, np.ndarray]:
  """The voxel box around a body-frame ``centre`` (z, X, Y) ± ``semi`` and the offsets (dz, dX, dY) of its voxels
  from the centre, broadcastable (b0, 1, 1), (1, b1, 1), (1, 1, b2)."""
  lo_pt = frame.voxel(centre[0] - semi[0], centre[1] - semi[1], centre[2] - semi[2])
  hi_pt = frame.voxel(centre[0] + semi[0], centre[1] + semi[1], centre[2] + semi[2])
  lo = np.clip(np.floor(lo_pt).astype(int), 0, frame.shape)
  hi = np.clip(np.ceil(hi_pt).astype(int) + 1, 0, frame.shape)
  sl = tuple(slice(a, b) for a, b in zip(lo, hi))
  return (sl, frame.z[sl[0]] - centre[0], frame.X[:, sl[1]] - centre[1], frame.Y[:, :, sl[2]] - centre[2])


def _ellipsoid(frame: _Frame, centre: Sequence[float], semi: Sequence[float], angle: float = 0.0
               ) -> tuple[tuple[slice, slice, slice], np.ndarray]:
  """(box, bool mask of the box) of the ellipsoid with body-frame ``centre`` (z, X, Y), semi-axes ``semi``
  (z, u, v) and its in-plane u axis at ``angle`` (radians, from +X towards +Y)."""
  reach = max(semi[1], semi[2])
  sl, dz, dx, dy = _box(frame, centre, (semi[0], reach, reach) if angle else semi)
  c, s = math.cos(angle), math.sin(angle)
  u, v = dx * c + dy * s, dy * c - dx * s
  return sl, (dz / semi[0]) ** 2 + (u / semi[1]) ** 2 + (v / semi[2]) ** 2 <= 1


def _ball(frame: _Frame, index: Sequence[int], radius_vox: float) -> tuple[tuple[slice, slice, slice], np.ndarray]:
  """A lesion ball centred on voxel ``index``: ``radius_vox`` in-plane, half that (at least one slice) along z
  (the z spacing is twice the in-plane one)."""
  rx, ry = frame.frame_units(radius_vox)
  rz = max(radius_vox * XY_SPACING / Z_SPACING, 1.0) / frame.shape[0]
  return _ellipsoid(frame, frame.point(index), (rz, rx, ry))


def _segments_distance(frame: _Frame, points: Sequence[tuple[float, float]]) -> np.ndarray:
  """float32 (1, H, W): in-plane distance (body-frame units) to the polyline through ``points`` (X, Y)."""
  out = None
  for (ax, ay), (bx, by) in zip(points[:-1], points[1:]):
    ux, uy = bx - ax, by - ay
    t = np.clip(((frame.X - ax) * ux + (frame.Y - ay) * uy) / (ux * ux + uy * uy), 0, 1)
    d = np.hypot(frame.X - ax - t * ux, frame.Y - ay - t * uy)
    out = d if out is None else np.minimum(out, d)
  return out


def _zrange(frame: _Frame, lo: float, hi: float) -> slice:
  """The slices whose centre z lies in [lo, hi)."""
  d = frame.shape[0]
  return slice(int(np.clip(math.ceil(lo * d - 0.5), 0, d)), int(np.clip(math.ceil(hi * d - 0.5), 0, d)))


def _lung_profile(z: np.ndarray, top: float) -> np.ndarray:
  """Squared in-plane scale (D, 1, 1) of a lung whose ellipsoidal z profile is centred at ``top - 0.56``."""
  return np.clip(1 - ((z - (top - 0.56)) / 0.56) ** 2, 0, 1)


@dataclasses.dataclass
class Rendering:
  """A phantom: ``volume`` float32 (D, H, W) integer-valued HU (SLP); ``masks`` bool (D, H, W) of the anatomy as
  drawn, each structure minus what was drawn over it (``body``; ``right_lung`` and ``left_lung``, aerated or not,
  without the mediastinum; ``heart`` without the aortic root; ``aorta``, the lumen); ``details``: abnormality name →
  the facts its report sentence states (JSON-able)."""
  volume: np.ndarray
  masks: dict[str, np.ndarray]
  details: dict[str, dict[str, Any]]


_OTHER, _RIGHT_LUNG, _LEFT_LUNG, _HEART, _AORTA = range(1, 6)  # owners of the anatomy masks


class _Painter:
  """The volume being drawn, and ``owner`` int8 (D, H, W): the anatomical structure drawn last at each voxel (one
  of ``_OTHER``, ``_RIGHT_LUNG``, ..., 0 where none is tracked), from which the anatomy masks are read. Lesions
  change the HU, never the owner."""

  def __init__(self, shape: tuple[int, int, int]):
    self.v = np.full(shape, AIR, np.float32)
    self.owner = np.zeros(shape, np.int8)

  def fill(self, where: tuple[slice, ...], mask: np.ndarray, hu: float, owner: int | None = None) -> None:
    """``hu`` on ``mask`` (broadcastable to the box ``where``), which then belongs to ``owner`` if given."""
    np.copyto(self.v[where], np.float32(hu), where=mask)
    if owner is not None:
      np.copyto(self.owner[where], np.int8(owner), where=mask)

  def fill2d(self, zs: slice, mask2d: np.ndarray, hu: float, owner: int | None = None) -> None:
    """``hu`` on the in-plane ``mask2d`` (H, W) in slices ``zs``."""
    self.fill((zs,), mask2d, hu, owner)


def _check_findings(findings: Collection[str]) -> frozenset[str]:
  unknown = sorted(set(findings) - set(RENDERED))
  if unknown:
    raise ValueError(f"Cannot render {unknown}: the synthetic phantom renders only {list(RENDERED)} "
                     f"(never {list(NEVER_RENDERED)}).")
  return frozenset(findings)


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
  shape = tuple(int(n) for n in shape)
  if len(shape) != 3 or any(n < m for n, m in zip(shape, _MIN_SHAPE)):
    raise ValueError(f"shape must be (D, H, W) of at least {_MIN_SHAPE}, got {shape}.")
  return shape  # type: ignore[return-value]


def _lobe(side: str, z: float, y: float, lung_y: float) -> str:
  """Lobe named from height ``z`` and, for the right middle lobe, anterior position ``y`` < the lung centre."""
  if side == "right":
    lobe = "upper" if z >= 0.62 else "middle" if z >= 0.4 and y < lung_y else "lower"
  else:
    lobe = "upper" if z >= 0.5 else "lower"
  return f"{side} {lobe} lobe"


def render(rng: np.random.Generator, shape: Sequence[int] = DEFAULT_SHAPE,
           findings: Collection[str] = ()) -> Rendering:
  """A SYNTHETIC chest phantom of ``shape`` (D, H, W) showing exactly ``findings`` (names of ``RENDERED``), with
  per-volume anatomical variation drawn from ``rng``. Deterministic given the generator's state."""
  shape, findings = _check_shape(shape), _check_findings(findings)
  u = rng.uniform
  f = _Frame(shape, u(-0.03, 0.03), u(0.0, 0.06), u(0.93, 1.02))
  z, X, Y, s = f.z, f.X, f.Y, f.s
  every = slice(None)
  p = _Painter(shape)
  details: dict[str, dict[str, Any]] = {}

  # Body: fat rim, soft tissue, ribs, mediastinal fat, sternum.
  bax, bay = 0.9, 0.66 * u(0.95, 1.05)
  rho = np.sqrt((X / bax) ** 2 + (Y / bay) ** 2)  # (1, H, W)
  inner = u(0.9, 0.94)
  body2d = rho[0] < 1
  p.fill2d(every, body2d, FAT)
  p.fill2d(every, rho[0] < inner, SOFT)
  theta = np.arctan2(Y / bay, X / bax)[0]
  band = (rho[0] > inner - 0.075) & (rho[0] < inner - 0.02) & (np.sin(theta) > -0.85) & (np.sin(theta) < 0.93)
  arcs = ((theta[band] * 11 / (2 * np.pi) + 2.0 * z[:, :, 0] + u(0, 1)) % 1) < 0.3  # (D, pixels of the band)
  p.v[:, band] = np.where(arcs, np.float32(RIB), p.v[:, band])
  p.fill2d(every, ((X / 0.22) ** 2 + ((Y + 0.12) / 0.42) ** 2 < 1)[0] & (rho[0] < inner), MEDIASTINAL_FAT)
  p.fill2d(every, ((X / 0.08) ** 2 + ((Y + bay * (inner - 0.06)) / 0.028) ** 2 < 1)[0], STERNUM)

  # Lungs, drawn whole: the mediastinum painted next covers them and takes its voxels from their masks.
  lungs = {}
  for side, sign, top, owner in (("right", -1, u(1.1, 1.16), _RIGHT_LUNG), ("left", 1, u(1.06, 1.12), _LEFT_LUNG)):
    lx, ly = sign * 0.42 + u(-0.02, 0.02), 0.08 + u(-0.02, 0.02)
    lax, lay = 0.3 * u(0.95, 1.05), 0.5 * u(0.95, 1.05)
    profile = _lung_profile(z, top)
    lungs[side] = (((X - lx) / lax) ** 2 + ((Y - ly) / lay) ** 2 < profile, ly, lay, profile)
    p.fill((every,), lungs[side][0], LUNG, owner)

  # Spine: vertebral bodies with a cortex and discs, posterior arch around the cord.
  vy = 0.42 + u(-0.01, 0.01)
  vertebra, canal = np.hypot(X, Y - vy)[0], np.hypot(X, Y - (vy + 0.135))[0]
  p.fill2d(every, vertebra < 0.085, CORTEX, _OTHER)
  p.fill2d(every, vertebra < 0.073, VERTEBRA)
  p.fill2d(every, (canal < 0.07) & (canal >= 0.04), ARCH, _OTHER)
  p.fill2d(every, canal < 0.04, CORD, _OTHER)
  p.fill((every,), (((z * 5 + u(0, 1)) % 1) < 0.15) & (vertebra < 0.085), DISC)

  # Heart: its pericardial fat layer (and the effusion rim) now, the heart itself after the great vessels.
  heart_scale = u(1.30, 1.42) if "Cardiomegaly" in findings else u(0.92, 1.05)
  hc = (0.28 + u(-0.02, 0.02), 0.1 + u(-0.02, 0.02), -0.17 + u(-0.02, 0.02))
  hsemi = (0.24 * (1 + 0.5 * (heart_scale - 1)), 0.27 * heart_scale, 0.2 * heart_scale)
  angle = -0.6 + u(-0.1, 0.1)  # long axis towards anterior-left
  rim = u(0.045, 0.07) if "Pericardial effusion" in findings else 0.0
  layers = ((rim + 0.025, FAT), (rim, PERICARDIAL_FLUID)) if rim else ((0.025, FAT),)
  for extra, hu in layers:
    p.fill(*_ellipsoid(f, hc, tuple(a + extra for a in hsemi), angle), hu, _OTHER)
  if "Cardiomegaly" in findings:
    details["Cardiomegaly"] = {"heart_scale": round(heart_scale, 3)}
  if rim:
    details["Pericardial effusion"] = {"thickness_mm": round(rim * f.scale * shape[1] / 2 * XY_SPACING * 2) / 2}

  # Aorta (ascending, arch, descending posterior-left of the spine) and superior vena cava, each in a fat cuff.
  ra = 0.06 * u(0.9, 1.1)
  asc, desc = (-0.06 + u(-0.01, 0.01), -0.1 + u(-0.01, 0.01)), (0.15 + u(-0.01, 0.01), 0.3 + u(-0.01, 0.01))
  svc = (-0.17 + u(-0.01, 0.01), -0.06 + u(-0.01, 0.01))
  arch_z, arch_t = 0.8 + u(-0.03, 0.03), 0.06
  arch_path = (asc, (0.12, 0.0), desc)
  arch_d = _segments_distance(f, arch_path)[0]
  arch_zs = _zrange(f, arch_z - arch_t, arch_z + arch_t)
  for extra, aorta_hu, svc_hu, owner in ((0.02, MEDIASTINAL_FAT, MEDIASTINAL_FAT, _OTHER), (0.0, AORTA, SOFT, _AORTA)):
    aorta = np.zeros(shape, bool)
    aorta[_zrange(f, 0.42, arch_z)] |= np.hypot(X - asc[0], Y - asc[1])[0] < ra + extra
    aorta[_zrange(f, 0.0, arch_z)] |= np.hypot(X - desc[0], Y - desc[1])[0] < ra + extra
    aorta[arch_zs] |= (arch_d / (ra + extra)) ** 2 + ((z[arch_zs] - arch_z) / arch_t) ** 2 <= 1
    p.fill((every,), aorta, aorta_hu, owner)
    p.fill2d(_zrange(f, 0.45, 1.0), np.hypot(X - svc[0], Y - svc[1])[0] < 0.04 + extra, svc_hu, _OTHER)
  p.fill(*_ellipsoid(f, hc, hsemi, angle), HEART, _HEART)  # over the root of the aorta and vena cava

  # Hiatal hernia: a sac behind the heart in the lowest slices, air anteriorly (non-dependent) over fluid.
  if "Hiatal hernia" in findings:
    hh = (0.15 + u(-0.02, 0.02), -0.03 + u(-0.02, 0.02), 0.2 + u(-0.01, 0.01))
    hs = (0.14, 0.12 * u(0.9, 1.1), 0.085 * u(0.9, 1.1))
    p.fill(*_ellipsoid(f, hh, hs), SOFT, _OTHER)
    box, lumen = _ellipsoid(f, hh, (hs[0] * 0.8, hs[1] - 0.015, hs[2] - 0.015))
    p.fill(box, lumen, HERNIA_FLUID)
    p.fill(box, lumen & (Y[:, :, box[2]] < hh[2] + 0.01), AIR)
    details["Hiatal hernia"] = {}

  # Trachea above the carina, main bronchi below it: air inside a soft-tissue wall.
  carina, tx, ty = 0.6 + u(-0.02, 0.02), -0.01, 0.14
  bronchi_zs = _zrange(f, carina - 0.14, carina)
  below = carina - z[bronchi_zs]
  for extra, hu in ((0.012, SOFT), (0.0, AIR)):
    p.fill2d(_zrange(f, carina, 1.0), np.hypot(X - tx, Y - ty)[0] < 0.055 + extra, hu, _OTHER)
    for sign in (-1, 1):
      p.fill((bronchi_zs,), np.hypot(X - (tx + sign * 1.4 * below), Y - (ty + 0.3 * below)) < 0.035 + extra, hu,
             _OTHER)

  # Lungs without the mediastinum; lesions go only into still-aerated lung (``free``), so none hides another.
  masks = {"body": np.broadcast_to(body2d, shape).copy(), "right_lung": p.owner == _RIGHT_LUNG,
           "left_lung": p.owner == _LEFT_LUNG, "heart": p.owner == _HEART, "aorta": p.owner == _AORTA}
  free = {side: masks[f"{side}_lung"].copy() for side in ("right", "left")}

  def pick(candidates: np.ndarray, n: int) -> list[tuple[int, int, int]]:
    flat = np.flatnonzero(candidates)
    if not flat.size:
      raise ValueError(f"shape {shape}: no room left in the lungs for the findings {sorted(findings)}.")
    return [tuple(int(c) for c in np.unravel_index(i, shape)) for i in rng.choice(flat, n)]

  def lung_side(index: Sequence[int]) -> str:
    return "right" if masks["right_lung"][tuple(index)] else "left"

  def lobe_of(index: Sequence[int]) -> str:
    side = lung_side(index)
    zz, _, yy = f.point(index)
    return _lobe(side, zz, yy, lungs[side][1])

  def blob(index: Sequence[int], semi: tuple[float, float, float], hu: float, angle: float = 0.0) -> None:
    side = lung_side(index)
    box, m = _ellipsoid(f, f.point(index), semi, angle)
    m &= free[side][box]
    p.fill(box, m, hu)
    free[side][box] &= ~m

  if "Pleural effusion" in findings:
    side = ("right", "left", "bilateral")[rng.choice(3, p=(0.3, 0.3, 0.4))]
    for name in ("right", "left") if side == "bilateral" else (side,):
      _, ly, lay, profile = lungs[name]
      depth, ztop = u(0.45, 0.7), u(0.42, 0.55)
      level = 1 - 2 * depth * np.clip((ztop - z) / ztop, 0, 1) ** 0.7  # of the lung's AP half-axis at that z
      fluid = free[name] & ((Y - ly) / (lay * np.sqrt(np.maximum(profile, 1e-6))) > level)
      p.fill((every,), fluid, PLEURAL_FLUID)
      free[name] &= ~fluid
    details["Pleural effusion"] = {"side": side}

  if "Consolidation" in findings:
    sides = [side for side in ("right", "left") if free[side].any()]
    (index,) = pick(free[sides[rng.integers(len(sides))]] if sides else free["right"], 1)
    blob(index, (0.18 * u(0.9, 1.2), 0.17 * u(0.9, 1.2), 0.22 * u(0.9, 1.2)), CONSOLIDATION)
    details["Consolidation"] = {"lobe": lobe_of(index)}

  if "Lung opacity" in findings:
    centres = pick(free["right"] | free["left"], int(rng.integers(1, 3)))
    for index in centres:
      blob(index, (0.12 * u(0.8, 1.2), 0.12 * u(0.8, 1.2), 0.14 * u(0.8, 1.2)), GROUND_GLASS)
    sides = {lung_side(i) for i in centres}
    details["Lung opacity"] = {"site": f"the {lobe_of(centres[0])}" if len(centres) == 1
                               else f"the {sides.pop()} lung" if len(sides) == 1 else "both lungs"}

  if "Atelectasis" in findings:
    (index,) = pick((free["right"] | free["left"]) & (z < 0.45), 1)
    blob(index, (1.5 / shape[0], 0.15 * u(0.85, 1.15), f.frame_units(1.8 * s)[1]), ATELECTASIS, u(-0.4, 0.4))
    details["Atelectasis"] = {"lobe": lobe_of(index)}

  if "Emphysema" in findings:
    aerated = free["right"] | free["left"]
    patches = pick(aerated & (z >= 0.35), int(rng.integers(50, 91)))
    for index in patches:
      box, m = _ball(f, index, u(2.5, 5.0) * s)
      p.fill(box, m & aerated[box], EMPHYSEMA)
    details["Emphysema"] = {"patches": len(patches)}

  if "Lung nodule" in findings:
    nodules = []
    for _ in range(int(rng.choice(3, p=(0.5, 0.3, 0.2))) + 1):
      radius = max(2, round(int(rng.integers(3, 7)) * s))
      margin = math.ceil(max(radius * XY_SPACING / Z_SPACING, 1.0))
      inside = np.zeros((shape[0], 1, 1), bool)
      inside[margin:shape[0] - margin] = True
      for index in pick((free["right"] | free["left"]) & inside, 200):  # the last one if none of 200 fits
        box, m = _ball(f, index, radius)
        side = lung_side(index)
        if not (m & ~free[side][box]).any():
          break
      p.fill(box, m, NODULE)
      free[side][box] &= ~m
      nodules.append({"diameter_mm": 2 * radius * XY_SPACING, "lobe": lobe_of(index), "centre": list(index)})
    details["Lung nodule"] = {"nodules": nodules}

  # Calcified spots on the aortic wall and on the anterior heart surface.
  def spot(centre: tuple[float, float, float]) -> None:
    box, m = _ellipsoid(f, centre, (1.0 / shape[0], *f.frame_units(u(1.6, 2.4) * s)))
    p.fill(box, m, float(round(u(*CALCIUM_RANGE))))

  if "Arterial wall calcification" in findings:
    segments = ("ascending aorta", "aortic arch", "descending aorta")
    sites = set()
    for _ in range(int(rng.integers(3, 9))):
      site = segments[rng.integers(3)]
      sites.add(site)
      if site == "aortic arch":  # on its upper wall
        t = u(0, 2)
        (ax, ay), (bx, by) = arch_path[int(t):int(t) + 2]
        spot((arch_z + 0.8 * arch_t, ax + (t % 1) * (bx - ax), ay + (t % 1) * (by - ay)))
      elif site == "ascending aorta":
        a = u(-np.pi, np.pi)
        spot((u(0.63, arch_z), asc[0] + ra * math.cos(a), asc[1] + ra * math.sin(a)))  # above the heart
      else:
        a = u(-np.pi / 2, 1.6)  # the wall away from the spine
        spot((u(0.15, arch_z), desc[0] + ra * math.cos(a), desc[1] + ra * math.sin(a)))
    details["Arterial wall calcification"] = {"sites": [x for x in segments if x in sites]}

  if "Coronary artery wall calcification" in findings:
    n = int(rng.integers(2, 5))
    for _ in range(n):
      dz, phi = u(-0.4, 0.4), u(0, 2 * np.pi)
      du, dv = hsemi[1] * math.sqrt(1 - dz * dz) * math.cos(phi), hsemi[2] * math.sqrt(1 - dz * dz) * math.sin(phi)
      dx, dy = du * math.cos(angle) - dv * math.sin(angle), du * math.sin(angle) + dv * math.cos(angle)
      if dy > 0:  # the anterior surface
        dx, dy = -dx, -dy
      spot((hc[0] + dz * hsemi[0], hc[1] + dx, hc[2] + dy))
    details["Coronary artery wall calcification"] = {"spots": n}

  # Medical material: a port in the right anterior chest wall with its catheter to the superior vena cava and down
  # it, or a central venous catheter down the vena cava from the top slice.
  if "Medical material" in findings:
    device = ("port catheter", "central venous catheter")[rng.choice(2, p=(0.6, 0.4))]
    r_cath, tip, top = max(f.frame_units(1.0)), u(0.4, 0.5), 1.0
    if device == "port catheter":
      top, a = u(0.86, 0.95), -np.pi / 2 - u(0.5, 0.8)
      port = (bax * (inner + 1) / 2 * math.cos(a), bay * (inner + 1) / 2 * math.sin(a))
      p.fill(*_ellipsoid(f, (top, *port), (2.0 / shape[0], *f.frame_units(4 * s))), PORT)
      k = min(int(top * shape[0]), shape[0] - 1)
      p.fill2d(slice(k, k + 1), _segments_distance(f, (port, (-0.2, -0.48), svc))[0] <= r_cath, CATHETER)
    p.fill2d(_zrange(f, tip, top), np.hypot(X - svc[0], Y - svc[1])[0] <= r_cath, CATHETER)
    details["Medical material"] = {"device": device}

  # Noise inside the body: NOISE_GRAIN × NOISE_GRAIN voxels in-plane share a value; whole HU.
  g, (d, h, w) = NOISE_GRAIN, shape
  coarse = rng.standard_normal((d, -(-h // g), 1, -(-w // g), 1), dtype=np.float32) * np.float32(NOISE_SIGMA)
  noise = np.broadcast_to(coarse, (d, coarse.shape[1], g, coarse.shape[3], g)).reshape(d, -1, coarse.shape[3] * g)
  p.v += noise[:, :h, :w] * body2d
  np.rint(p.v, out=p.v)
  return Rendering(p.v, masks, {name: details[name] for name in RENDERED if name in details})


def phantom(rng: np.random.Generator, shape: Sequence[int] = DEFAULT_SHAPE,
            findings: Collection[str] = ()) -> np.ndarray:
  """float32 (D, H, W) HU (integer-valued, SLP orientation) of a SYNTHETIC phantom showing ``findings``;
  ``render(...).volume``."""
  return render(rng, shape, findings).volume


# --- reports --------------------------------------------------------------------------------------------------

_CLINICAL = ("Not given.", "Cough.", "Shortness of breath.", "Chest pain.", "Fever and cough.", "Follow-up.")
_TECHNIQUE = ("Non-contrast images were obtained in the axial plane with a section thickness of 1.5 mm.",
              "Non-contrast axial images of the thorax were obtained with 1.5 mm section thickness.")
_TRACHEA = ("Trachea and both main bronchi are open.", "Trachea and both main bronchi are patent.")
_MEDIASTINUM = "Mediastinal structures cannot be evaluated optimally because intravenous contrast was not given."
_LYMPH = "No lymph node was detected in the mediastinum or hila in pathological size and appearance."
_ESOPHAGUS = "Thoracic esophagus calibration was normal and no significant tumoral wall thickening was detected."
_LUNGS_CLEAR = "No mass or infiltrative lesion was detected in both lungs."
_ABDOMEN = "Upper abdominal organs included in the sections are normal."
_BONES = ("Bone structures in the study area are natural.",
          "No lytic-destructive lesion was detected in the bone structures.")
_HEALTHY_IMPRESSION = ("No significant pathology was detected in the thorax.",
                       "Thorax CT findings are within normal limits.")
# Positive findings sentences (fields from the rendering's details), keyed by abnormality or variant.
_SENTENCES: dict[str, tuple[str, ...]] = {
    "port catheter": ("A port catheter is seen in the right subclavian vein.",
                      "A port catheter is observed, with its tip in the superior vena cava.",
                      "A port catheter placed via the right subclavian vein is seen."),
    "central venous catheter": ("A central venous catheter is seen with its tip in the superior vena cava.",
                                "A right jugular central venous catheter is observed."),
    "Arterial wall calcification": ("Calcific atheroma plaques are seen in the aorta.",
                                    "Atherosclerotic calcifications are observed in the wall of the thoracic aorta.",
                                    "Calcified atheroma plaques are present in the {sites}."),
    "Cardiomegaly": ("Heart size is enlarged.", "Cardiomegaly is observed.",
                     "Heart contour and size are increased."),
    "Pericardial effusion": ("Minimal pericardial effusion is observed.",
                             "Pericardial effusion reaching {thickness} mm in thickness is observed.",
                             "There is pericardial effusion with a thickness of {thickness} mm."),
    "Coronary artery wall calcification": ("Coronary artery calcifications are observed.",
                                           "Calcific atheroma plaques are seen in the coronary arteries.",
                                           "Coronary calcifications are present."),
    "Hiatal hernia": ("Hiatal hernia is observed.", "A sliding-type hiatal hernia is seen.",
                      "There is a hiatal hernia."),
    "Emphysema": ("Emphysematous changes are seen in both lungs.",
                  "Centrilobular emphysema is observed in both lungs, more prominent in the upper lobes.",
                  "Centrilobular and paraseptal emphysematous changes are present in both lungs."),
    "Atelectasis": ("Subsegmental atelectasis is observed in the {lobe}.",
                    "Linear atelectasis is seen in the {lobe}.", "Plate-like atelectasis is present in the {lobe}."),
    "one nodule": ("A {size} mm nodule is seen in the {lobe}.",
                   "A nodule measuring {size} mm is observed in the {lobe}.",
                   "There is a {size} mm nodule in the {lobe}."),
    "Lung opacity": ("Ground-glass opacity is seen in {site}.", "Ground-glass opacities are observed in {site}.",
                     "A ground-glass density increase is noted in {site}."),
    "bilateral": ("Bilateral pleural effusion is observed.", "Pleural effusion is seen on both sides."),
    "unilateral": ("Pleural effusion is seen on the {side}.", "{Side}-sided pleural effusion is observed.",
                   "There is pleural effusion on the {side}."),
    "Consolidation": ("Consolidation is present in the {lobe}.", "There is consolidation in the {lobe}.",
                      "An area of consolidation is seen in the {lobe}."),
}
_IMPRESSIONS = {"Arterial wall calcification": "Aortic atherosclerosis.", "Cardiomegaly": "Cardiomegaly.",
                "Pericardial effusion": "Pericardial effusion.",
                "Coronary artery wall calcification": "Coronary artery calcification.",
                "Hiatal hernia": "Hiatal hernia.", "Emphysema": "Emphysema.",
                "Atelectasis": "Atelectasis in the {lobe}.", "Lung opacity": "Ground-glass opacity in {site}.",
                "Consolidation": "Consolidation in the {lobe}."}
_NEGATIVES = {"Cardiomegaly": ("Heart size is normal.", "Heart contour and size are normal."),
              "Pericardial effusion": ("Pericardial effusion-thickening was not observed.",),
              "Pleural effusion": ("No pleural effusion or pneumothorax was detected.",)}


def _mm(value: float) -> str:
  """4.5 → "4.5", 6.0 → "6"."""
  return f"{value:g}"


def _impression(name: str, d: Mapping[str, Any]) -> str:
  if name == "Medical material":
    return f"{d['device'].capitalize()}."
  if name == "Lung nodule":
    sizes = sorted(n["diameter_mm"] for n in d["nodules"])
    return (f"{_mm(sizes[0])} mm nodule in the {d['nodules'][0]['lobe']}." if len(sizes) == 1
            else f"Pulmonary nodules, the largest {_mm(sizes[-1])} mm.")
  if name == "Pleural effusion":
    return "Bilateral pleural effusion." if d["side"] == "bilateral" else f"Pleural effusion on the {d['side']}."
  return _IMPRESSIONS[name].format(**d)


def report(rng: np.random.Generator, details: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
  """The CT-RATE report columns (``ClinicalInformation_EN``, ``Technique_EN``, ``Findings_EN``, ``Impressions_EN``)
  of a rendering's ``details``: every present abnormality stated with a §9.3 lexicon keyword, stock negatives for
  absent cardiomegaly, pericardial and pleural effusion, and neutral normal sentences. Paraphrases drawn from
  ``rng``."""
  def one(options: Sequence[str], **fields: Any) -> str:
    return options[int(rng.integers(len(options)))].format(**fields)

  def stated(name: str, options: Sequence[str], **fields: Any) -> str:
    return one(options, **fields) if name in details else one(_NEGATIVES[name])

  findings = [one(_TRACHEA)]
  if "Medical material" in details:
    findings.append(one(_SENTENCES[details["Medical material"]["device"]]))
  findings += [_MEDIASTINUM, stated("Cardiomegaly", _SENTENCES["Cardiomegaly"])]
  thickness = details.get("Pericardial effusion", {}).get("thickness_mm", 0.0)
  pericardial = _SENTENCES["Pericardial effusion"]
  findings.append(stated("Pericardial effusion", pericardial if thickness < 5 else pericardial[1:],  # "Minimal" < 5 mm
                         thickness=_mm(thickness)))
  if "Arterial wall calcification" in details:
    sites = details["Arterial wall calcification"]["sites"]
    findings.append(one(_SENTENCES["Arterial wall calcification"],
                        sites=" and ".join([", ".join(sites[:-1]), sites[-1]] if len(sites) > 1 else sites)))
  if "Coronary artery wall calcification" in details:
    findings.append(one(_SENTENCES["Coronary artery wall calcification"]))
  findings += [one(_SENTENCES["Hiatal hernia"]) if "Hiatal hernia" in details else _ESOPHAGUS, _LYMPH]
  lung = [one(_SENTENCES["Emphysema"])] if "Emphysema" in details else []
  for nodule in details.get("Lung nodule", {}).get("nodules", ()):
    lung.append(one(_SENTENCES["one nodule"], size=_mm(nodule["diameter_mm"]), lobe=nodule["lobe"]))
  for name in ("Lung opacity", "Consolidation", "Atelectasis"):
    if name in details:
      lung.append(one(_SENTENCES[name], **details[name]))
  findings += lung or [_LUNGS_CLEAR]
  side = details.get("Pleural effusion", {}).get("side", "")
  findings.append(stated("Pleural effusion", _SENTENCES["bilateral" if side == "bilateral" else "unilateral"],
                         side=side, Side=side.capitalize()))
  findings += [_ABDOMEN, one(_BONES)]
  impressions = [_impression(name, d) for name, d in details.items()] or [one(_HEALTHY_IMPRESSION)]
  return {"ClinicalInformation_EN": one(_CLINICAL), "Technique_EN": one(_TECHNIQUE),
          "Findings_EN": " ".join(findings), "Impressions_EN": " ".join(impressions)}


# --- data set -------------------------------------------------------------------------------------------------

def _parameters(seed: int = DEFAULTS["seed"], num_train: int = DEFAULTS["num_train"],
                num_val: int = DEFAULTS["num_val"], num_test: int = DEFAULTS["num_test"],
                shape: Sequence[int] = DEFAULT_SHAPE, prevalence: float | Mapping[str, float] = DEFAULT_PREVALENCE,
                healthy_fraction: float = DEFAULT_HEALTHY_FRACTION) -> dict[str, Any]:
  """The validated, JSON-normalised generation parameters (what the manifest records and ``ensure_dataset``
  compares). ``prevalence``: one probability for every rendered abnormality, or name → probability for some of
  them (the others keep ``DEFAULT_PREVALENCE``)."""
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed must be an integer >= 0, got {seed!r}.")
  counts = {"num_train": num_train, "num_val": num_val, "num_test": num_test}
  for key, n in counts.items():
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
      raise ValueError(f"{key} must be an integer >= 0, got {n!r}.")
  if not 0 <= healthy_fraction < 1:
    raise ValueError(f"healthy_fraction must lie in [0, 1), got {healthy_fraction!r}.")
  if isinstance(prevalence, Mapping):
    _check_findings(prevalence)
    probs = {name: float(prevalence.get(name, DEFAULT_PREVALENCE)) for name in RENDERED}
  else:
    probs = dict.fromkeys(RENDERED, float(prevalence))
  bad = {name: p for name, p in probs.items() if not 0 <= p <= 1 - healthy_fraction}
  if bad:
    raise ValueError(f"prevalence must lie in [0, 1 - healthy_fraction = {1 - healthy_fraction:g}] (the healthy "
                     f"volumes have no finding), got {bad}.")
  return {"seed": int(seed), **{k: int(n) for k, n in counts.items()}, "shape": list(_check_shape(shape)),
          "prevalence": probs, "healthy_fraction": float(healthy_fraction)}


def assign_labels(rng: np.random.Generator, n: int, prevalence: Mapping[str, float],
                  healthy_fraction: float) -> np.ndarray:
  """bool (n, 18) in ``ABNORMALITIES`` order: ``round(healthy_fraction · n)`` volumes without findings; each
  rendered abnormality on exactly ``round(p · n)`` of the others, chosen independently per abnormality."""
  labels = np.zeros((n, len(ABNORMALITIES)), bool)
  candidates = rng.permutation(n)[int(math.floor(healthy_fraction * n + 0.5)):]
  for name in RENDERED:
    positives = min(int(math.floor(prevalence[name] * n + 0.5)), candidates.size)
    labels[rng.permutation(candidates)[:positives], ABNORMALITIES.index(name)] = True
  return labels


def dataset_paths(root: str | os.PathLike[str]) -> dict[str, dict[str, pathlib.Path]]:
  """split → {``volumes``: the folder its loader globs (``<volumes>/*/*/*.npz``), ``labels``, ``metadata``,
  ``reports``, ``sentences``: its CSVs, ``tokenizer``: the GPT-2-style tokenizer folder (the same for every
  split)}; val shares the train folder (its labels CSV selects its volumes)."""
  root = pathlib.Path(root)
  return {split: {"volumes": root / folder, **{kind: root / f"{split}_{kind}.csv"
                                               for kind in ("labels", "metadata", "reports", "sentences")},
                  "tokenizer": root / TOKENIZER_DIR}
          for split, (folder, _) in SPLITS.items()}


def _volumes(params: Mapping[str, Any]) -> Iterator[tuple[int, str, int, str]]:
  """(split index, split, index in the split, VolumeName) of every volume, in writing order."""
  first = {"train": 1, "val": params["num_train"] + 1, "test": 1}
  for s, split in enumerate(SPLITS):
    for i in range(params[f"num_{split}"]):
      yield s, split, i, f"{SPLITS[split][1]}_{first[split] + i}_a_1.nii.gz"


def _write_csv(path: pathlib.Path, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)


_README = """# SYNTHETIC chest-CT data set — NOT PATIENT DATA

Every volume here is a cartoon phantom drawn by `input_pipeline/synthetic_ct.py` (ellipsoids and tubes with
textbook Hounsfield values, no real anatomy), and every report is assembled from templates. It is the embedded
default data set of the CT-AGRG port, in CT-RATE's file layout, so the pipeline runs without real CT. Numbers
measured on it say nothing about real CT. `manifest.json` records the generator, its parameters and the
per-abnormality prevalence.

Layout: `train/` holds the train and val volumes (told apart by `train_labels.csv` / `val_labels.csv`),
`valid/` the test volumes (CT-RATE's validation split, used as test by CT-AGRG). Each `*.nii.gz.npz` holds `arr_0`,
int16 Hounsfield units (D, H, W) in SLP orientation (the loader casts it to float32). `<split>_sentences.csv` are the
stage-2 per-abnormality sentences (rule-based extractor), `gpt2_tokenizer/` a small GPT-2-style byte-level BPE
trained on the train sentences (it stands in for GPT-2's vocabulary; `<|endoftext|>` is its last id).
"""


def write_dataset(out_dir: str | os.PathLike[str], *, seed: int = DEFAULTS["seed"],
                  num_train: int = DEFAULTS["num_train"], num_val: int = DEFAULTS["num_val"],
                  num_test: int = DEFAULTS["num_test"], shape: Sequence[int] = DEFAULT_SHAPE,
                  prevalence: float | Mapping[str, float] = DEFAULT_PREVALENCE,
                  healthy_fraction: float = DEFAULT_HEALTHY_FRACTION, progress: bool = False) -> pathlib.Path:
  """Writes the SYNTHETIC data set (module docstring: layout, labels, determinism) into ``out_dir``, which must be
  absent or empty; returns it. ``progress``: a tqdm bar over the volumes."""
  params = _parameters(seed, num_train, num_val, num_test, shape, prevalence, healthy_fraction)
  out = pathlib.Path(out_dir)
  if out.exists() and any(out.iterdir()):
    raise ValueError(f"{out} is not empty; write_dataset writes into an absent or empty folder "
                     "(ensure_dataset replaces an earlier synthetic set).")
  out.mkdir(parents=True, exist_ok=True)
  labels = {split: assign_labels(np.random.default_rng([params["seed"], s, _STREAM_LABELS]),
                                 params[f"num_{split}"], params["prevalence"], params["healthy_fraction"])
            for s, split in enumerate(SPLITS)}
  rows: dict[str, dict[str, list[list[Any]]]] = {split: {"labels": [], "metadata": [], "reports": []}
                                                  for split in SPLITS}
  xy = f"[{XY_SPACING}, {XY_SPACING}]"
  total = sum(params[f"num_{split}"] for split in SPLITS)
  for s, split, i, name in tqdm.tqdm(_volumes(params), total=total, desc="synthetic_ct", unit="volume",
                                     disable=not progress, dynamic_ncols=True):
    y = labels[split][i]
    findings = [n for n, positive in zip(ABNORMALITIES, y) if positive]
    rendering = render(np.random.default_rng([params["seed"], s, _STREAM_IMAGE, i]), params["shape"], findings)
    path = out / SPLITS[split][0] / name.rsplit("_", 2)[0] / name.rsplit("_", 1)[0] / f"{name}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, rendering.volume.astype(np.int16))
    text = report(np.random.default_rng([params["seed"], s, _STREAM_TEXT, i]), rendering.details)
    meta = np.random.default_rng([params["seed"], s, _STREAM_META, i])
    rows[split]["labels"].append([name, *y.astype(int).tolist()])
    rows[split]["metadata"].append([name, xy, Z_SPACING, 1, 0, ("M", "F")[int(meta.integers(2))],
                                    f"{int(meta.integers(30, 86)):03d}Y"])
    rows[split]["reports"].append([name, *(text[c] for c in REPORT_COLUMNS[1:])])
  paths = dataset_paths(out)
  columns = {"labels": LABEL_COLUMNS, "metadata": METADATA_COLUMNS, "reports": REPORT_COLUMNS}
  sentence_rows = {}
  for split in SPLITS:
    paths[split]["volumes"].mkdir(exist_ok=True)
    for kind, header in columns.items():
      _write_csv(paths[split][kind], header, rows[split][kind])
    sentence_rows[split] = ct_sentences.build_sentences_csv(paths[split]["reports"], paths[split]["labels"],
                                                            paths[split]["sentences"])[0]
  sentences = [ct_rate.clean_sentence_text(row.text) for row in ct_rate.read_sentences(paths["train"]["sentences"])]
  tokenizer = subword.train_subword(sentences, "bpe", GPT2_VOCAB_SIZE, family="gpt2")
  tokenizer.save(paths["train"]["tokenizer"])
  manifest = {
      "generator": GENERATOR, "version": VERSION, "statement": STATEMENT, "parameters": params,
      "orientation": "SLP: axis 0 inferior -> superior, axis 1 right -> left, axis 2 anterior -> posterior",
      "spacing_mm": list(volumes.CONTRACT_SPACING),
      "arr_0": "int16 Hounsfield units (D, H, W), np.savez_compressed; loaders cast to float32",
      "rendered": list(RENDERED), "never_present": list(NEVER_RENDERED),
      "tokenizer": {"folder": TOKENIZER_DIR, "family": "gpt2", "vocab_size": tokenizer.vocab_size,
                    "endoftext_id": tokenizer.eos_id,
                    "trained_on": f"the {len(sentences)} cleaned sentences of {paths['train']['sentences'].name}"},
      "splits": {split: {"volumes": SPLITS[split][0], "count": params[f"num_{split}"],
                         **{kind: paths[split][kind].name for kind in (*columns, "sentences")},
                         "sentence_rows": sentence_rows[split],
                         "healthy": int((~labels[split].any(1)).sum()),
                         "prevalence": dict(zip(ABNORMALITIES, np.round(labels[split].mean(0), 4).tolist()))
                         if params[f"num_{split}"] else {}}
                 for split in SPLITS},
  }
  (out / "README.md").write_text(_README, encoding="utf-8")
  (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
  return out


def _matches(out: pathlib.Path, params: Mapping[str, Any]) -> bool:
  """Whether ``out`` holds a complete synthetic set of this generator version with ``params``."""
  try:
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
  except (OSError, ValueError):
    return False
  return (isinstance(manifest, dict) and manifest.get("generator") == GENERATOR
          and manifest.get("version") == VERSION and manifest.get("parameters") == params)


def ensure_dataset(out_dir: str | os.PathLike[str], *, progress: bool = False, **params: Any) -> pathlib.Path:
  """``out_dir`` holding the SYNTHETIC set of ``params`` (``write_dataset``'s keywords): returned at once if its
  manifest matches, else generated in a temporary sibling folder and renamed into place (an earlier synthetic
  set there is replaced; any other non-empty folder is refused)."""
  wanted = _parameters(**params)
  out = pathlib.Path(out_dir)
  if _matches(out, wanted):
    return out
  if out.exists() and any(out.iterdir()):
    try:
      generated = json.loads((out / "manifest.json").read_text(encoding="utf-8")).get("generator") == GENERATOR
    except (OSError, ValueError, AttributeError):
      generated = False
    if not generated:
      raise ValueError(f"{out} exists and is not a synthetic_ct data set (no manifest.json of {GENERATOR}); "
                       "refusing to replace it.")
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
  old = tmp.with_name(tmp.name + ".old")
  try:
    write_dataset(tmp, progress=progress, **params)
    if out.exists():
      os.rename(out, old)
    try:
      os.rename(tmp, out)
    except OSError:  # another process put its set there first
      if not _matches(out, wanted):
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
  return out


def main(argv: Sequence[str] | None = None) -> int:
  from rrg_jax import cli  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(prog="python -m input_pipeline.synthetic_ct",
                                   description=__doc__.split("\n\n")[0].replace("**", ""))
  parser.add_argument("--out", required=True, help="data set folder (written unless it already holds this set)")
  parser.add_argument("--seed", type=int, default=DEFAULTS["seed"])
  parser.add_argument("--num_train", type=int, default=DEFAULTS["num_train"])
  parser.add_argument("--num_val", type=int, default=DEFAULTS["num_val"])
  parser.add_argument("--num_test", type=int, default=DEFAULTS["num_test"])
  parser.add_argument("--shape", type=int, nargs=3, default=DEFAULT_SHAPE, metavar=("D", "H", "W"))
  parser.add_argument("--prevalence", type=float, default=DEFAULT_PREVALENCE,
                      help="probability of each rendered abnormality")
  parser.add_argument("--healthy_fraction", type=float, default=DEFAULT_HEALTHY_FRACTION,
                      help="fraction of volumes without any finding")
  args = parser.parse_args(argv)

  def run() -> None:
    out = ensure_dataset(args.out, progress=True, seed=args.seed, num_train=args.num_train, num_val=args.num_val,
                         num_test=args.num_test, shape=args.shape, prevalence=args.prevalence,
                         healthy_fraction=args.healthy_fraction)
    splits = json.loads((out / "manifest.json").read_text(encoding="utf-8"))["splits"]
    print(f"{out}: SYNTHETIC CT set, " + ", ".join(f"{s} {v['count']}" for s, v in splits.items()))

  return cli.run_main(run)


if __name__ == "__main__":
  sys.exit(main())
