"""``python -m bfprune.data fetch DIR``: the standard MNIST / CIFAR-10 files into a folder.

The files come through tensorflow-datasets' download cache (no TensorFlow needed) and land in
the layout ``load_dataset`` reads, so ``BFPRUNE_DATA_DIR=DIR`` (or ``--data_dir=DIR``) works
anywhere afterwards. Errors are one line on stderr and exit status 1.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from bfprune import data

PROG = "python -m bfprune.data"


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0].strip("`"))
  commands = parser.add_subparsers(dest="command", required=True)
  fetch = commands.add_parser(
      "fetch", help="download (or take from tfds's cache) and write the standard files into DIR")
  fetch.add_argument("dir", metavar="DIR", help="folder to write mnist/ and cifar10/ into")
  fetch.add_argument("--dataset", choices=("all", "mnist", "cifar10"), default="all",
                     help="which dataset (default: all; CIFAR-10 is a 162 MiB download)")
  args = parser.parse_args(argv)
  names = ("mnist", "cifar10") if args.dataset == "all" else (args.dataset,)
  for name in names:
    try:
      folder = data.fetch(name, args.dir)
    except (data.DataError, OSError) as e:
      print(f"{PROG} fetch: error: {name}: {' '.join(str(e).split())}", file=sys.stderr)
      return 1
    print(f"{name}: standard files in {folder}")
  print(f"use them with BFPRUNE_DATA_DIR={args.dir} (or --data_dir={args.dir})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
