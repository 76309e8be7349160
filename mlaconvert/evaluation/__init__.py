"""Measuring what a model does: the built-in bouncing-balls world (the truth, its captions and their embedder), the
health figures read off its frames, teacher agreement, and `eval`: rollouts after a true prefix vs the truth and the
teacher, per horizon. The last stage of the pipeline.
"""
