"""mlaconvert: dense causal video DiTs -> Multi-Head Latent Attention with a latent KV cache."""

__version__ = "0.1.0"
