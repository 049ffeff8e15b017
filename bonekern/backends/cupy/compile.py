"""The CUDA compile checker (a development tool; the run-time path never imports it): the kernels compiled ahead of
time for each GPU architecture without a GPU, and ptxas's resource figures checked against a baseline.

- :func:`~.nvrtc.nvrtc_compile` (:mod:`.nvrtc`) is THE compile, the same function the launcher calls at run
  time; here it runs for sm_80 / sm_90 / sm_100 with no GPU present.
- :func:`nvcc_compile` (``nvcc -cubin -arch=sm_XY -Xptxas -v``), where the CUDA toolkit is installed: a second
  compiler over the same files, for the checks.

``-Xptxas -v`` makes ptxas report, per kernel: registers, spill stores/loads, stack and static shared memory.
:func:`check_resources` turns them into failures (new spills, > 255 registers, shared memory above the
architecture's limit). The figures for sm_80, sm_90 and sm_100 are kept in ``profiles/resources/cuda_sm<XY>.json``
as a baseline; regenerate them after changing a kernel with::

    PYTHONPATH=. python -m bonekern.backends.cupy.compile --write profiles/resources
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from autotune.argtypes import output_dir, positive_int, run_guarded

from .nvrtc import NVRTC_OPTIONS, CompileError, nvrtc_compile
from .sources import KERNEL_FILES, kernels_dir

ARCHS: tuple[int, ...] = (80, 90, 100)
"""The architectures the kernels are checked and baselined for (A100, H100/H200, B200)."""

REGISTER_LIMIT = 255
SHARED_MEMORY_LIMIT: dict[int, int] = {80: 163 * 1024, 90: 227 * 1024, 100: 227 * 1024}
"""Shared memory per block, bytes: sm_80 163 KiB, sm_90 and sm_100 227 KiB (with the opt-in carve-out)."""

REGENERATE = "PYTHONPATH=. python -m bonekern.backends.cupy.compile --write profiles/resources"


@dataclass(frozen=True)
class KernelResources:
    """What ptxas reports for one kernel (bytes, except registers)."""

    registers: int
    spill_stores: int
    spill_loads: int
    stack_bytes: int
    shared_bytes: int


def find_nvcc() -> str | None:
    """nvcc on PATH, else the default toolkit location; None when neither exists."""
    default = Path("/usr/local/cuda/bin/nvcc")
    return shutil.which("nvcc") or (str(default) if default.is_file() else None)


def nvcc_compile(source: str, arch: int, nvcc: str) -> tuple[bytes, str]:
    """Compile kernels/``source`` with ``nvcc -cubin -arch=sm_<arch> -Xptxas -v``; returns (cubin, log)."""
    directory = kernels_dir()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{Path(source).stem}.sm_{arch}.cubin"
        cmd = [nvcc, "-cubin", f"-arch=sm_{arch}", *NVRTC_OPTIONS, "-Xptxas", "-v", f"-I{directory}"]
        cmd += [str(directory.joinpath(source)), "-o", str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise CompileError(f"{' '.join(cmd)} failed:\n{done.stdout}{done.stderr}")
        return out.read_bytes(), done.stdout + done.stderr


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for 'sm_(\d+)'")
_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(log: str) -> dict[str, KernelResources]:
    """Per-kernel figures from a ``ptxas -v`` log (NVRTC's or nvcc's)."""
    out: dict[str, KernelResources] = {}
    parts = _ENTRY.split(log)
    # parts: [preamble, name, arch, body, name, arch, body, ...]
    for name, _arch, body in zip(parts[1::3], parts[2::3], parts[3::3], strict=True):
        spills, used = _SPILLS.search(body), _USED.search(body)
        if spills is None or used is None:
            raise ValueError(f"ptxas log has no resource line for {name}:\n{body}")
        smem = _SMEM.search(body)
        out[name] = KernelResources(
            registers=int(used.group(1)),
            spill_stores=int(spills.group(2)),
            spill_loads=int(spills.group(3)),
            stack_bytes=int(spills.group(1)),
            shared_bytes=int(smem.group(1)) if smem else 0,
        )
    return out


def resource_table(arch: int, compiler: str = "nvrtc", nvcc: str | None = None) -> dict[str, KernelResources]:
    """Figures of every kernel of every file for ``sm_<arch>``, compiling the files concurrently."""

    def one(source: str) -> dict[str, KernelResources]:
        if compiler == "nvrtc":
            _, log = nvrtc_compile(source, arch)
        else:
            _, log = nvcc_compile(source, arch, nvcc or find_nvcc() or "nvcc")
        return parse_ptxas(log)

    table: dict[str, KernelResources] = {}
    with ThreadPoolExecutor(len(KERNEL_FILES)) as pool:
        for part in pool.map(one, KERNEL_FILES):
            table.update(part)
    return dict(sorted(table.items()))


def check_resources(
    table: dict[str, KernelResources], arch: int, baseline: dict[str, KernelResources] | None = None
) -> list[str]:
    """Problems in ``table``: > 255 registers, shared memory over the limit, and spills (any spill if there is no
    baseline; otherwise more spill bytes than the baseline records for that kernel)."""
    problems = []
    for name, res in table.items():
        if res.registers > REGISTER_LIMIT:
            problems.append(f"{name}: {res.registers} registers > {REGISTER_LIMIT}")
        if res.shared_bytes > SHARED_MEMORY_LIMIT[arch]:
            problems.append(f"{name}: {res.shared_bytes} bytes of shared memory > sm_{arch}'s limit")
        allowed = baseline.get(name) if baseline else None
        max_stores = allowed.spill_stores if allowed else 0
        max_loads = allowed.spill_loads if allowed else 0
        if res.spill_stores > max_stores or res.spill_loads > max_loads:
            problems.append(
                f"{name}: spills {res.spill_stores} B stored / {res.spill_loads} B loaded "
                f"(baseline {max_stores} / {max_loads})"
            )
    return problems


def baseline_path(directory: Path, arch: int) -> Path:
    return Path(directory) / f"cuda_sm{arch}.json"


def write_baseline(directory: Path, arch: int, table: dict[str, KernelResources]) -> Path:
    """Store ``table`` (NVRTC figures) as the baseline for ``sm_<arch>``."""
    from cupy_backends.cuda.libs import nvrtc

    major, minor = nvrtc.getVersion()
    document = {
        "arch": f"sm_{arch}",
        "compiler": f"NVRTC {major}.{minor}",
        "options": [*NVRTC_OPTIONS, f"-arch=sm_{arch}", "-Xptxas=-v"],
        "limits": {"registers": REGISTER_LIMIT, "shared_bytes": SHARED_MEMORY_LIMIT[arch]},
        "regenerate": REGENERATE,
    }
    # One line per kernel, so a diff of the baseline reads as a table of what changed.
    head = json.dumps(document, indent=1)[:-2]
    rows = ",\n".join(f"  {json.dumps(name)}: {json.dumps(asdict(res))}" for name, res in table.items())
    path = baseline_path(directory, arch)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'{head},\n "kernels": {{\n{rows}\n }}\n}}\n')
    return path


def read_baseline(directory: Path, arch: int) -> dict[str, KernelResources]:
    document = json.loads(baseline_path(directory, arch).read_text())
    return {name: KernelResources(**fields) for name, fields in document["kernels"].items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", type=output_dir, help="directory to write cuda_sm<arch>.json baselines into")
    parser.add_argument("--arch", type=positive_int, action="append", help="architectures (default: 80, 90 and 100)")
    parser.add_argument("--compiler", choices=("nvrtc", "nvcc"), default="nvrtc")
    args = parser.parse_args(argv)
    failed = False
    for arch in args.arch or ARCHS:
        table = resource_table(arch, args.compiler)
        print(f"sm_{arch} ({args.compiler}): kernel registers spill_stores spill_loads stack shared")
        for name, res in table.items():
            print(f"  {name} {res.registers} {res.spill_stores} {res.spill_loads} {res.stack_bytes} {res.shared_bytes}")
        problems = check_resources(table, arch)
        for problem in problems:
            print(f"  PROBLEM {problem}")
        failed |= bool(problems)
        if args.write:
            if args.compiler != "nvrtc":
                parser.error("baselines hold NVRTC figures (what CuPy compiles with); drop --compiler nvcc")
            print(f"wrote {write_baseline(args.write, arch, table)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(run_guarded(main, prog="python -m bonekern.backends.cupy.compile"))
