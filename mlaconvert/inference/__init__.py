"""Running a model: the streaming few-step rollout through the KV cache and the `sample` job, prompts -> umT5
embeddings on the way in, streaming VAE decode and mp4 on the way out, and `bench`, dense vs MLA on the same device.
"""
