"""The CUDA C++ sources of the CuPy backend and the names of the kernels they define.

The ``.cu`` files live in ``kernels/`` inside this package and are read with :mod:`importlib.resources`. Each file
instantiates its templates as ``extern "C"`` kernels named ``bk_<family>_<pair>_<variant>``:

- ``family``: what the kernel computes (:data:`FAMILIES` says which file defines it and which variants exist);
- ``pair``: storage and accumulation types, e.g. ``bf16_f32`` (:data:`TYPE_PAIRS`, the list
  ``BK_FOR_EACH_TYPE_PAIR`` in ``common.cuh`` instantiates);
- ``variant``: ``scalar`` / ``vec16`` (element-wise or 16-byte vector memory access) or a GEMM tile ``t<BM>x<BN>``
  (the host derives the grid from BM and BN).

The compile-check tests compare this list with the entry points ptxas reports, so the two cannot drift apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

import torch

BLOCK_THREADS = 256
"""Threads per block of every kernel (``bk::kBlockThreads`` in common.cuh; each kernel's ``__launch_bounds__``)."""

KERNEL_FILES: tuple[str, ...] = ("group_sum.cu", "bone.cu", "bat.cu", "adapter.cu")
"""The translation units, each compiled into one module."""

_DTYPE_SUFFIX = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32", torch.float64: "f64"}

TYPE_PAIRS: tuple[tuple[torch.dtype, torch.dtype], ...] = (
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.float32, torch.float32),
    (torch.float16, torch.float64),
    (torch.bfloat16, torch.float64),
    (torch.float32, torch.float64),
    (torch.float64, torch.float64),
)
"""(storage dtype, accumulation dtype) pairs every kernel is built for."""


@dataclass(frozen=True)
class KernelFamily:
    """One templated kernel: the file defining it and the variants it is instantiated for."""

    source: str
    variants: tuple[str, ...]


FAMILIES: dict[str, KernelFamily] = {
    "group_sum": KernelFamily("group_sum.cu", ("scalar", "vec16")),
    "bone_add_adapter": KernelFamily("bone.cu", ("t64x64", "t32x32")),
    "bone_write_adapter": KernelFamily("bone.cu", ("t64x64", "t32x32")),
    "bone_add_grouped": KernelFamily("bone.cu", ("scalar", "vec16")),
    "bat_weight": KernelFamily("bat.cu", ("t64x64", "t128x16")),
    "bat_block_grad": KernelFamily("bat.cu", ("t64x64", "t32x32")),
    "adapter_group_sum": KernelFamily("adapter.cu", ("dropout",)),
    "adapter_spread": KernelFamily("adapter.cu", ("plain", "dropout")),
}


def type_pair(storage: torch.dtype, accumulate: torch.dtype) -> str:
    """The kernel-name suffix for a (storage, accumulation) dtype pair, e.g. ``"bf16_f32"``."""
    if (storage, accumulate) not in TYPE_PAIRS:
        raise ValueError(f"no CUDA kernel is built for storage {storage} with accumulation {accumulate}")
    return f"{_DTYPE_SUFFIX[storage]}_{_DTYPE_SUFFIX[accumulate]}"


def kernel_name(family: str, storage: torch.dtype, accumulate: torch.dtype, variant: str) -> str:
    """The ``extern "C"`` name of one instantiation, e.g. ``bk_group_sum_bf16_f32_vec16``."""
    if variant not in FAMILIES[family].variants:
        raise ValueError(f"kernel {family!r} has variants {FAMILIES[family].variants}; got {variant!r}")
    return f"bk_{family}_{type_pair(storage, accumulate)}_{variant}"


def kernel_names(source: str | None = None) -> list[str]:
    """Every kernel defined by ``source`` (a file of :data:`KERNEL_FILES`), or by all of them."""
    return [
        kernel_name(family, storage, acc, variant)
        for family, spec in FAMILIES.items()
        if source is None or spec.source == source
        for storage, acc in TYPE_PAIRS
        for variant in spec.variants
    ]


def tile_shape(variant: str) -> tuple[int, int]:
    """(BM, BN) of a GEMM tile variant ``t<BM>x<BN>``."""
    match = re.fullmatch(r"t(\d+)x(\d+)", variant)
    if match is None:
        raise ValueError(f"not a tile variant: {variant!r}")
    return int(match.group(1)), int(match.group(2))


def kernels_dir():
    """The package directory holding the ``.cu`` / ``.cuh`` files (a Traversable; a real directory when installed)."""
    return resources.files(__package__).joinpath("kernels")


_INCLUDE = re.compile(r'^#include "([^"]+)"[^\n]*$', re.MULTILINE)


def load_source(filename: str) -> str:
    """The text of ``kernels/<filename>`` with its local ``#include "..."`` headers inlined (each once).

    One self-contained string is what NVRTC compiles (no include path is needed at run time); ``#line`` markers keep
    compiler messages pointing at the original files.
    """
    seen: set[str] = set()

    def expand(name: str) -> str:
        text = kernels_dir().joinpath(name).read_text()

        def include(match: re.Match) -> str:
            header = match.group(1)
            if header in seen:
                return ""
            seen.add(header)
            line = text.count("\n", 0, match.start()) + 2
            return f'#line 1 "{header}"\n{expand(header)}\n#line {line} "{name}"'

        return _INCLUDE.sub(include, text)

    return expand(filename)
