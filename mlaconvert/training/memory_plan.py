"""What a fine-tune holds on each GPU, worked out before the first step so a user knows whether their GPU will do.

Weights, gradients and optimizer state are exact counts of the models' tensors. Activations are an estimate: with
activation checkpointing each block keeps its float32 input for the backward pass, and one block at a time is
recomputed with its intermediates (`activation_bytes_per_token`, from the tensors a Wan block saves). The report
keeps the plan beside the measured peak, so every GPU run checks the estimate.

Sharded (FSDP2), each process keeps 1/N of every weight, gradient and moment, and holds whole only the blocks
being run: the current one and the next, gathered ahead, of the larger model, besides the root's small tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mlaconvert.conversion.export import parameter_count
from mlaconvert.devices import GiB
from mlaconvert.modeling.config import WanConfig

MASTER_BYTES = 4  # trained tensors keep float32 master weights, gradients and AdamW's two moments
RESIDUAL_BYTES = 4  # the residual stream is float32 (as in Wan): what each checkpointed block keeps
LABELS = {"teacher_weights": "teacher weights", "student_frozen": "student, frozen tensors",
          "student_trained": "student, trained tensors (float32)", "gradients": "gradients", "optimizer": "AdamW moments",
          "activations": "activations (estimate)", "gathered": "blocks gathered whole (sharded)"}


def activation_bytes_per_token(config: WanConfig, dtype_bytes: int) -> int:
    """Bytes one block keeps per token while it is recomputed for the backward pass: float32 norm and modulation
    outputs (~6 x dim), the dtype's projections, attention and FFN outputs (~10 x dim) and the FFN hidden
    layer before and after its activation (2 x ffn_dim)."""
    return 6 * config.dim * 4 + (10 * config.dim + 2 * config.ffn_dim) * dtype_bytes


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per process, by what holds them."""

    teacher_weights: int
    student_frozen: int  # the tensors the fine-tune does not train, in the compute dtype
    student_trained: int  # float32 master copies of the trained tensors
    gradients: int
    optimizer: int
    activations: int  # of the training forward, or of the own-context rollout's cache where that is larger
    processes: int
    gathered: int = 0  # sharded: the running block and the next one, whole, with the root's tensors

    @property
    def total(self) -> int:
        return sum(getattr(self, key) for key in LABELS)

    def rows(self) -> list[tuple[str, float]]:
        """(what, GiB) for a table, the total last."""
        shown = [key for key in LABELS if key != "gathered" or self.gathered]
        return [*((LABELS[key], getattr(self, key) / GiB) for key in shown), ("total", self.total / GiB)]

    def to_dict(self) -> dict[str, float | int]:
        return {**{f"{key}_gib": round(getattr(self, key) / GiB, 3) for key in LABELS},
                "total_gib": round(self.total / GiB, 3), "processes": self.processes}


def _parameter_counts(config: WanConfig, trained: set[str]) -> dict[str, tuple[int, int]]:
    """(frozen, trained) parameters of a model of `config`, counted on the meta device: of the whole model, of
    its largest block and of what lies outside the blocks."""
    from mlaconvert.modeling.model import WanModel

    with torch.device("meta"):
        params = dict(WanModel(config).named_parameters())

    def count(names: list[str]) -> tuple[int, int]:
        return sum(params[n].numel() for n in names if n not in trained), sum(params[n].numel() for n in names if n in trained)

    blocks = [count([n for n in params if n.startswith(f"blocks.{i}.")]) for i in range(config.num_layers)]
    return {"model": count(list(params)), "block": max(blocks, key=sum), "root": count([n for n in params if not n.startswith("blocks.")])}


def _gathered(ours: dict[str, tuple[int, int]], teacher: WanConfig, dtype_bytes: int) -> int:
    """Bytes of the sharded units held whole at once (`ours`: the student's counts): two blocks of the larger model,
    both roots, and one student block's whole float32 gradients on their way to the reduce-scatter."""
    def unit_bytes(frozen_trained: tuple[int, int]) -> int:
        return frozen_trained[0] * dtype_bytes + frozen_trained[1] * MASTER_BYTES

    theirs = _parameter_counts(teacher, set())
    blocks = 2 * max(unit_bytes(ours["block"]), unit_bytes(theirs["block"]))
    return blocks + unit_bytes(ours["root"]) + unit_bytes(theirs["root"]) + ours["block"][1] * MASTER_BYTES


def memory_plan(
    student: WanConfig,
    teacher: WanConfig,
    trained: list[str],
    *,
    clip_tokens: int,
    rows: int,
    dtype_bytes: int,
    processes: int = 1,
    sharded: bool = False,
    accumulate: int = 1,
    checkpointing: bool = True,
    layer_outputs: bool = False,
    rollout: tuple[int, int, int] = (0, 0, 0),
) -> MemoryPlan:
    """The plan of one process training `rows` clips at once (its micro-batch), each `clip_tokens` tokens through
    the student's forward (teacher forcing doubles a clip: the clean copy runs alongside); `layer_outputs` when
    the layer loss keeps every self-attention output of student and teacher. `rollout` = (rows, cached tokens,
    bytes per value) of the own-context rollout, which runs without gradients before the training forward.
    Each process holds every weight (DDP, with its gradient buckets besides when there are several) or, `sharded`,
    its 1/processes share of them and the units gathered whole; sharded micro-batches before a step's last one
    (`accumulate`) keep their whole gradients, reduced only with the last."""
    counts = _parameter_counts(student, set(trained))
    frozen, trained_count = counts["model"]
    teacher_count = parameter_count(teacher)
    share = processes if sharded else 1
    master = -(-trained_count // share) * MASTER_BYTES
    block = activation_bytes_per_token(student, dtype_bytes)
    # Checkpointed, each block keeps its input and one block at a time is recomputed; else every block keeps all.
    per_token = student.num_layers * RESIDUAL_BYTES * student.dim + block if checkpointing else student.num_layers * block
    if layer_outputs:
        per_token += 2 * student.num_layers * student.dim * dtype_bytes
    own_rows, cached_tokens, value_bytes = rollout
    cache = own_rows * cached_tokens * student.num_layers * student.kv_values_per_token() * value_bytes
    return MemoryPlan(
        teacher_weights=-(-teacher_count // share) * dtype_bytes,
        student_frozen=-(-frozen // share) * dtype_bytes,
        student_trained=master,
        gradients=master * (2 if processes > 1 and not sharded else 1)
        + (trained_count * MASTER_BYTES if sharded and processes > 1 and accumulate > 1 else 0),
        optimizer=2 * master,
        activations=max(rows * clip_tokens * per_token, cache),
        processes=processes,
        gathered=_gathered(counts, teacher, dtype_bytes) if sharded and processes > 1 else 0,
    )
