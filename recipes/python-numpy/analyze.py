#!/usr/bin/env python3
"""analyze: summary statistics of a column of numbers (a file, or generated with --demo N)."""
import argparse
import sys

import numpy as np


def main() -> int:
    p = argparse.ArgumentParser(prog="analyze", description=__doc__)
    p.add_argument("file", nargs="?", help="text file with one number per line")
    p.add_argument("--demo", type=int, metavar="N", help="use N deterministic samples instead of a file")
    a = p.parse_args()
    if a.demo:
        x = np.random.default_rng(42).normal(10.0, 2.0, a.demo)
    elif a.file:
        x = np.loadtxt(a.file, ndmin=1)
    else:
        p.print_help()
        return 0
    print(f"n={x.size} mean={x.mean():.3f} std={x.std():.3f} numpy={np.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
