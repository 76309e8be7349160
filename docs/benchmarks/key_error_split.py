"""Where the key error of a conversion comes from: the content rows (latent of width dc) or the rope rows (one
shared rank-1 key per pair across heads). Wan-1.3B shape, random weights, few layers, on the CPU.

    PYTHONPATH=. python docs/benchmarks/key_error_split.py --layers 2 --out docs/benchmarks/key-error-split-cpu.json

The key error `convert` reports is of the pre-norm key W_K x, before any RoPE rotation, so a rotation cannot enter
it; this splits its squared error into the content part and the rope part (each relative to the whole key).
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from mlaconvert.checkpoints.builtin import make_tiny_wan
from mlaconvert.conversion.calibration import calibrate
from mlaconvert.conversion.convert import _attn_weights, dense_layout_keys
from mlaconvert.conversion.factorize import factorize_layer
from mlaconvert.modeling.config import PRESETS, MLAConfig, WanConfig
from mlaconvert.modeling.attention import LatentSelfAttention
from mlaconvert.modeling.model import load_model


@torch.no_grad()
def split(weights: dict[str, torch.Tensor], f, samples, config: WanConfig) -> dict[str, float]:
    heads, head_dim = config.num_heads, config.head_dim
    rope = [p for axis in f.rope_pairs for p in axis]
    content = [p for p in range(head_dim // 2) if p not in set(rope)]
    mla = MLAConfig(dc=(f.weights["kv_down.weight"].shape[0],), rope_dim=len(rope) * 2, nope_dim=head_dim - len(rope) * 2,
                    rope_pairs=(f.rope_pairs,))
    latent = LatentSelfAttention(config.replace(num_layers=1, mla=mla), 0).double()
    latent.load_state_dict({k: v.double() for k, v in f.weights.items()})
    g_k = weights["norm_k.weight"].double().view(heads, head_dim // 2, 2)
    err = {"content": 0.0, "rope": 0.0}
    total = 0.0
    for x, _ in samples:
        x = x.double().reshape(-1, x.shape[-1])
        k = (x @ weights["k.weight"].double().T + weights["k.bias"].double()).view(-1, heads, head_dim // 2, 2)
        k_hat, _ = dense_layout_keys(latent, latent.entries(x), f.rope_pairs, g_k)
        err["content"] += float((k[:, :, content] - k_hat[:, :, content]).pow(2).sum())
        err["rope"] += float((k[:, :, rope] - k_hat[:, :, rope]).pow(2).sum())
        total += float(k.pow(2).sum())
    return {
        "k_error": math.sqrt((err["content"] + err["rope"]) / total),
        "k_error_rope_exact": math.sqrt(err["content"] / total),
        "k_error_content_exact": math.sqrt(err["rope"] / total),
        "rope_share_of_squared_error": err["rope"] / (err["content"] + err["rope"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dc", type=int, nargs="+", default=[64, 128, 192, 256])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    config = PRESETS["wan2.1-1.3b"].replace(num_layers=args.layers)
    state = make_tiny_wan(0, config)
    calib = calibrate(load_model(config, state).eval(), frames=3, height=16, width=16, seed=0)
    rows = []
    for init in ("svd", "asvd"):
        for dc in args.dc:
            per_layer = []
            for i in range(config.num_layers):
                weights = _attn_weights(state, i)
                moment = calib.second_moments[i] if init == "asvd" else None
                f = factorize_layer(weights, num_heads=config.num_heads, dc=dc, rope_dim=32, init=init, second_moment=moment)
                per_layer.append(split(weights, f, calib.samples[i], config))
            row = {"init": init, "dc": dc, **{k: sum(p[k] for p in per_layer) / len(per_layer) for k in per_layer[0]}}
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"device": "this project's 2-core CPU", "config": f"wan2.1-1.3b shape, {args.layers} layers, random weights",
              "rope_dim": 32, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
