"""Would a Gram form of the MLA key be faster? Wan-1.3B shape (dc 192, rope key 32), one window of 21 latent frames
at 480x832 (32,760 tokens), 30 layers' worth of inputs, on one GPU.

    PYTHONPATH=. python docs/benchmarks/key_gram_form.py

Today's key (`LatentSelfAttention.keys_values`) is a matrix product k_up(c), then one fused pass that reads it back,
takes its norm for the per-token scale s, and writes [s k_up(c) ; s rot(r)]. The Gram form takes |k_up(c)|^2 from
the latent alone (|W c + b|^2 = |P c|^2 + 2 (W^T b).c + |b|^2 with P^T P = W^T W, a 192x192 product), and then one
matrix product writes the scaled key from [s c, s, s rot(r)] with a block weight: W and b for the content dims,
the identity for the rope dims. It skips one read and one write of the window's content keys.
"""

from __future__ import annotations

import torch

from mlaconvert.inference.bench import mla_variant
from mlaconvert.modeling.attention import LatentSelfAttention
from mlaconvert.modeling.config import preset
from mlaconvert.modeling.rope import Angles, grid_positions

LAYERS, REPLAYS = 30, 20


def gram_key(att: LatentSelfAttention):
    """The Gram form of `att`'s keys as a function of (c, r, cos, sin), its weights derived once."""
    heads, head_dim, nope, rope, dc = att.num_heads, att.head_dim, att.nope_dim, att.rope_dim, att.kv_down.out_features
    w, b = att.k_up.weight.double(), att.k_up.bias.double()
    values, vectors = torch.linalg.eigh(w.T @ w)
    p = (vectors * values.clamp_min(0).sqrt()).T.to(torch.bfloat16)
    wb, bb = (w.T @ b).float(), float(b @ b)
    width = (dc + 1 + rope + 7) // 8 * 8  # a multiple of 8 keeps the product on the aligned bf16 kernels
    block = torch.zeros(heads, head_dim, width, dtype=torch.float64, device=w.device)
    block[:, :nope, :dc] = w.view(heads, nope, dc)
    block[:, :nope, dc] = b.view(heads, nope)
    block[:, nope:, dc + 1 : dc + 1 + rope] = torch.eye(rope, dtype=torch.float64, device=w.device)
    block = block.reshape(heads * head_dim, width).to(torch.bfloat16)

    def keys(c: torch.Tensor, r: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        cf = c.float()
        energy = (c @ p.T).float().pow(2).sum(-1, keepdim=True) + 2 * (cf * wb).sum(-1, keepdim=True) + bb + att.rope_energy(r)
        s = torch.rsqrt(energy / (heads * head_dim) + att.eps)
        pad = s.new_zeros(c.shape[0], width - dc - 1 - rope)
        inputs = torch.cat([cf * s, s, att.rotary.apply(r.float() * s, cos, sin), pad], -1).to(torch.bfloat16)
        return (inputs @ block.T).view(-1, heads, head_dim)

    return keys


def replay_ms(fn, inputs: list[tuple[torch.Tensor, ...]]) -> float:
    """Milliseconds of one CUDA-graph replay of `fn` (compiled) over every layer's inputs."""
    fn = torch.compile(fn)
    for _ in range(3):
        fn(*inputs[0])
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [fn(*args) for args in inputs]
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(REPLAYS):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    del outs
    return start.elapsed_time(end) / REPLAYS


@torch.no_grad()
def main() -> None:
    device = torch.device("cuda")
    config = mla_variant(preset("wan2.1-1.3b"), 192, 32)
    torch.manual_seed(0)
    att = LatentSelfAttention(config, 0).to(device, torch.bfloat16).eval()
    form = att.k_rope_norm
    form.add_(0.3 * torch.randn_like(form) @ torch.randn_like(form).transpose(-1, -2))  # a form unlike the identity
    att.project_key_form()
    angles = Angles.at(grid_positions(21, 30, 52, device=device), config.head_dim)
    cos, sin = att.rotary.cos_sin(angles)
    tokens = angles.cos.shape[0]
    inputs = [
        (torch.randn(tokens, 192, device=device, dtype=torch.bfloat16), torch.randn(tokens, 32, device=device, dtype=torch.bfloat16))
        for _ in range(LAYERS)
    ]
    gram = gram_key(att)
    today = att.keys_values(inputs[0], angles)[0].float()
    other = gram(*inputs[0], cos, sin).float()
    deviation = ((other - today).pow(2).mean().sqrt() / today.pow(2).mean().sqrt()).item()
    print(f"{torch.cuda.get_device_name()}, {tokens} tokens, {LAYERS} layers; Gram form vs today's key: rms deviation {deviation:.4f}")
    print(f"today's key: {replay_ms(lambda c, r: att.keys_values((c, r), angles)[0], inputs):.2f} ms")
    print(f"Gram form:   {replay_ms(lambda c, r: gram(c, r, cos, sin), inputs):.2f} ms")


if __name__ == "__main__":
    main()
