"""Prepares one of the R2Gen TFDS datasets: ``python -m input_pipeline.tfds_builders --name=... --manual_dir=...``."""

from __future__ import annotations

import argparse

from input_pipeline import tfds_builders
from input_pipeline.loader import default_tfds_dir


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m input_pipeline.tfds_builders", description=__doc__)
  parser.add_argument("--name", required=True, choices=sorted(tfds_builders.BUILDERS))
  parser.add_argument("--manual_dir", default=None, help="R2Gen-layout folder (cxr_sample: default the sample)")
  parser.add_argument("--data_dir", default=str(default_tfds_dir()), help="TFDS data dir to write to")
  parser.add_argument("--on_bad_record", default="error", choices=("error", "skip"))
  args = parser.parse_args(argv)
  builder = tfds_builders.prepared_builder(args.name, data_dir=args.data_dir, manual_dir=args.manual_dir,
                                           on_bad_record=args.on_bad_record)
  print(f"{args.name}: {builder.data_dir} " + ", ".join(f"{s} {v.num_examples}" for s, v in builder.info.splits.items()))


if __name__ == "__main__":
  main()
