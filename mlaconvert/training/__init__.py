"""Training: distillation of a converted model from its dense teacher (`finetune`: settings, objective, clips, the
resumable run folder, torchrun processes, the before/after report) and training the built-in world model from
scratch (`pretrain`). Runs after conversion and before sampling and evaluation.
"""
