"""The model: the Wan2.1 DiT with dense or latent (MLA) self-attention, its config and presets, 3D RoPE, the masks of
chunked and teacher-forcing forwards, and the sink + ring-buffer KV cache. Every later stage of the pipeline builds,
loads, converts, trains or runs what is defined here.
"""
