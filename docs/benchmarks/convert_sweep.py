"""Conversion sweep on random weights of the Wan-1.3B shape with few layers: mean measured errors per (init, dc).

    PYTHONPATH=. python docs/benchmarks/convert_sweep.py --layers 2 --out docs/benchmarks/convert-sweep-cpu.json

Weights are drawn as the built-in model draws them (`make_tiny_wan`, seed 0); calibration is convert's default.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

from mlaconvert.checkpoints.builtin import make_tiny_wan
from mlaconvert.checkpoints.formats import Checkpoint
from mlaconvert.conversion.convert import ConvertSettings, convert_model
from mlaconvert.modeling.config import PRESETS

ERRORS = ("k_error", "k_normed_error", "v_error", "attn_error")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dc", type=int, nargs="+", default=[64, 128, 192])
    parser.add_argument("--init", nargs="+", default=["svd", "asvd"])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    config = PRESETS["wan2.1-1.3b"].replace(num_layers=args.layers)
    checkpoint = Checkpoint(config=config, state_dict=make_tiny_wan(0, config), format="native", files=[], info={})
    rows = []
    for init in args.init:
        for dc in args.dc:
            start = time.perf_counter()
            conversion = convert_model(checkpoint, ConvertSettings(dc=dc, rope_dim=32, init=init))
            measured = [layer["measured"] for layer in conversion.layers]
            row = {"init": init, "dc": dc, "seconds": round(time.perf_counter() - start, 1)}
            row.update({k: float(np.mean([m[k] for m in measured])) for k in ERRORS if k in measured[0]})
            rows.append(row)
            print(json.dumps(row), flush=True)
    device = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    result = {"device": device, "config": "wan2.1-1.3b shape", "layers": args.layers, "rope_dim": 32, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
