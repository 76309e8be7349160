"""Write a random-weight Wan checkpoint of a preset's shape, laid out and sharded as the Hub's, one tensor at a time.

    python docs/benchmarks/make_random_checkpoint.py --preset wan2.1-14b --layout diffusers -o /data/wan14b-random
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

from mlaconvert.checkpoints.synthetic import LAYOUTS, write_random_checkpoint
from mlaconvert.errors import MlaconvertError
from mlaconvert.modeling.config import PRESETS


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="wan2.1-1.3b", choices=sorted(PRESETS))
    parser.add_argument("--layout", default="wan", choices=LAYOUTS)
    parser.add_argument("--shard-gb", type=float, default=5.0, help="Largest shard in GB (10^9 bytes).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="Replace an existing folder.")
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args()
    tic = time.perf_counter()
    try:
        write_random_checkpoint(PRESETS[args.preset], args.output, layout=args.layout, shard_bytes=int(args.shard_gb * 1e9),
                                dtype=torch.bfloat16, seed=args.seed, force=args.force)
    except MlaconvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"wrote {args.output} in {time.perf_counter() - tic:.0f} s (peak RSS {peak:.2f} GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
