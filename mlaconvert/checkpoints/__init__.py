"""Where weights come from and how they are laid out: SOURCE resolution (Hub repos, folders, files, the shipped
`builtin:` models in builtin/), the checkpoint formats (native Wan, diffusers, training .pt, exports) and the tensor
names that map one onto another. The first stage of every command: it turns a SOURCE into a config and a state dict.
"""
