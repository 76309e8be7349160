"""Checkpoints larger than memory: safetensors read one tensor at a time and written one tensor at a time.

`LazyStateDict` is a read-only mapping over (sharded) safetensors files: a tensor is read when it is looked up and
forgotten when the caller drops it, and its dtype and shape are known without reading it. `write_safetensors`
writes a file from a list of names, dtypes and shapes and a function that makes each tensor when its turn comes:
the header (every offset follows from the shapes) first, then the tensors, so no more than one is held at a time.
The format is the one the safetensors library reads and writes (an 8-byte little-endian header length, a JSON
header of dtype, shape and data offsets, padded with spaces to 8 bytes, then the raw little-endian bytes).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from mlaconvert.errors import MlaconvertError

DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64", torch.int64: "I64",
          torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
          torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.uint16: "U16", torch.uint32: "U32",
          torch.uint64: "U64"}
BY_NAME = {v: k for k, v in DTYPES.items()}


class LazyStateDict(Mapping[str, torch.Tensor]):
    """Tensors of safetensors files, each read when looked up; `spec(key)` gives its dtype and shape unread."""

    def __init__(self, sources: Mapping[str, tuple[Path, str]]):
        self._sources = dict(sources)  # our key -> (file, its key in the file)
        self._specs: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        by_file: dict[Path, list[str]] = {}
        for key, (path, _) in self._sources.items():
            by_file.setdefault(path, []).append(key)
        for path, keys in by_file.items():
            with _opened(path) as f:
                for key in keys:
                    part = _read(path, lambda: f.get_slice(self._sources[key][1]))
                    if part.get_dtype() not in BY_NAME:
                        raise MlaconvertError(f"'{path}': tensor '{key}' has dtype {part.get_dtype()}, which mlaconvert cannot read")
                    self._specs[key] = (BY_NAME[part.get_dtype()], tuple(part.get_shape()))

    @classmethod
    def of_files(cls, paths: Mapping[str, Path] | Path) -> LazyStateDict:
        """Every tensor of one file, or of shards given as {key: shard} like an index's weight_map."""
        if isinstance(paths, Path):
            with _opened(paths) as f:
                return cls({key: (paths, key) for key in f.keys()})
        return cls({key: (path, key) for key, path in paths.items()})

    def renamed(self, names: Mapping[str, str]) -> LazyStateDict:
        """The same tensors under other names ({old: new}); tensors left out of `names` are dropped."""
        return LazyStateDict({new: self._sources[old] for old, new in names.items()})

    def spec(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        return self._specs[key]

    def __getitem__(self, key: str) -> torch.Tensor:
        path, name = self._sources[key]
        with _opened(path) as f:
            return _read(path, lambda: f.get_tensor(name))

    def __contains__(self, key: object) -> bool:  # the default would read the tensor
        return key in self._sources

    def __iter__(self) -> Iterator[str]:
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)


def _read(path: Path, read: Callable[[], Any]) -> Any:
    """A read from an open safetensors file, its failure one line (an index naming a tensor its shard lacks, say)."""
    try:
        return read()
    except SafetensorError as e:
        raise MlaconvertError(f"could not read '{path}': {e}") from e


class _opened:
    """safe_open with the one-line errors of a bad file."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):  # noqa: ANN204 - safetensors' handle has no public type
        try:
            self.handle = safe_open(self.path, framework="pt")
            return self.handle.__enter__()
        except SafetensorError as e:
            raise MlaconvertError(f"could not read '{self.path}': file is truncated or not a safetensors file ({e})") from e
        except OSError as e:
            raise MlaconvertError(f"could not read '{self.path}': {e.strerror or e}") from e

    def __exit__(self, *exc: object) -> None:
        self.handle.__exit__(*exc)


def shard_plan(sizes: dict[str, int], shard_bytes: int) -> list[list[str]]:
    """Keys in order, cut into shards of at most `shard_bytes` (a tensor larger than that is a shard alone)."""
    shards: list[list[str]] = [[]]
    used = 0
    for key, size in sizes.items():
        if shards[-1] and used + size > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += size
    return shards


def write_safetensors(path: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]], make: Callable[[str], torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> None:
    """A safetensors file of the tensors `specs` names, in that order, each made by `make(name)` when it is written."""
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, dtype, shape in specs:
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name, dtype, shape in specs:
            tensor = make(name)
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"{name}: made {tensor.dtype} {tuple(tensor.shape)}, announced {dtype} {tuple(shape)}")
            f.write(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())


class Overlaid(Mapping[str, torch.Tensor]):
    """`base` without the keys `drop` names, with the tensors of `extra` on top: a converted state dict whose
    untouched tensors stay wherever `base` keeps them (on disk, for a LazyStateDict)."""

    def __init__(self, base: Mapping[str, torch.Tensor], drop: Callable[[str], bool], extra: Mapping[str, torch.Tensor]):
        self._base, self._extra = base, extra
        self._keys = [k for k in base if not drop(k) and k not in self._extra] + list(self._extra)
        self._kept = set(self._keys)

    def spec(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        return tensor_spec(self._extra if key in self._extra else self._base, key)

    def __contains__(self, key: object) -> bool:
        return key in self._kept

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self._extra:
            return self._extra[key]
        if key not in self._kept:
            raise KeyError(key)
        return self._base[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class Prefixed(Mapping[str, torch.Tensor]):
    """Several state dicts as one, each under its prefix ({"blocks.0.self_attn.": layer 0's tensors, ...}); a
    tensor is looked up in its own mapping only when asked for, and moved to the CPU."""

    def __init__(self, parts: Mapping[str, Mapping[str, torch.Tensor]]):
        self._where = {prefix + key: (part, key) for prefix, part in parts.items() for key in part}

    def spec(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        part, name = self._where[key]
        return tensor_spec(part, name)

    def __getitem__(self, key: str) -> torch.Tensor:
        part, name = self._where[key]
        return part[name].detach().to("cpu").contiguous()

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def tensor_spec(state_dict: Mapping[str, torch.Tensor], key: str) -> tuple[torch.dtype, tuple[int, ...]]:
    """dtype and shape of one tensor, without reading it where the mapping can say (LazyStateDict, Overlaid)."""
    spec = getattr(state_dict, "spec", None)
    if spec is not None:
        return spec(key)
    tensor = state_dict[key]
    return tensor.dtype, tuple(tensor.shape)


def tensor_nbytes(state_dict: Mapping[str, torch.Tensor], key: str) -> int:
    dtype, shape = tensor_spec(state_dict, key)
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def total_numel(state_dict: Mapping[str, torch.Tensor]) -> int:
    """Parameters in a state dict, read from the specs alone where it can."""
    return sum(math.prod(tensor_spec(state_dict, key)[1]) for key in state_dict)
