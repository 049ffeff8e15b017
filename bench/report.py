"""Everything the bench prints or writes: the environment header, the tables, JSON, CSV and the plot."""

from __future__ import annotations

import csv
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

import bonekern

from .runner import ROUNDS

MIB = 1 << 20

_CUPY_DISTRIBUTIONS = ("cupy-cuda13x", "cupy-cuda12x", "cupy-cuda11x", "cupy")


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return commit + (" (uncommitted changes)" if dirty else "")


def environment(device: torch.device) -> dict[str, Any]:
    """Where and with what the numbers were measured."""
    cupy = next(((d, v) for d in _CUPY_DISTRIBUTIONS if (v := _version(d))), (None, None))
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "cpu": _cpu_name(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "cupy": f"{cupy[1]} ({cupy[0]})" if cupy[0] else None,
        "peft": _version("peft"),
        "bonekern": bonekern.__version__,
        "git_commit": _git_commit(),
    }
    return env


def header_lines(env: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    where = f"GPU {env['gpu']} (CUDA {env['cuda']}), " if env["gpu"] else ""
    versions = ", ".join(
        f"{name} {env[name] or 'not installed'}" for name in ("torch", "triton", "cupy", "peft", "bonekern")
    )
    return [
        f"bonekern bench | suite {settings['suite']} | {env['date']}",
        f"device: {env['device']}: {where}CPU {env['cpu']}, {env['torch_threads']} torch threads "
        f"of {env['cpu_cores']} logical cores",
        f"versions: {versions}, python {env['python']} | git {env['git_commit']}",
        f"timing: median [p20-p80] of calls calibrated to {settings['budget_s']:g} s per measurement "
        f"(at least {settings['min_repeats']}), implementations interleaved over {ROUNDS} rounds, "
        + ("CUDA events, L2 flushed before each call" if env["gpu"] else "perf_counter"),
        f"bonekern autotune: BONEKERN_AUTOTUNE={settings.get('autotune', '1')} (see --autotune)",
        "TFLOP/s, GB/s: the method's FLOPs and compulsory bytes (bench/costs.py) / fwd+bwd median",
        "peak: most bytes alive at once during fwd+bwd, allocated in the call (inputs and parameters excluded; "
        + ("torch.cuda.max_memory_allocated)" if env["gpu"] else "CPU allocator reports via the profiler)"),
        "kept: storages autograd saves for backward (saved_tensors_hooks, parameters excluded)",
        "ratios: this implementation / PEFT MiSS or / the frozen linear layer (below 1: faster or smaller)",
    ]


def _ms(v: float) -> str:
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def _mib(v: float) -> str:
    return f"{v / MIB:.1f}"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _check_cell(r: dict[str, Any]) -> str:
    if r.get("check_reference"):
        return "others checked vs this"
    if "check_ok" not in r:
        return "-"
    word = "ok" if r["check_ok"] else "MISMATCH"
    return f"{word} {r['check_max_rel_err']:.0e} vs {r['check_vs']}"


_COLUMNS = (
    ("impl", "<"),
    ("fwd ms [p20-p80]", "<"),
    ("fwd+bwd ms [p20-p80]", "<"),
    ("TFLOP/s", ">"),
    ("GB/s", ">"),
    ("peak MiB", ">"),
    ("kept MiB", ">"),
    ("time/peft", ">"),
    ("time/linear", ">"),
    ("peak/peft", ">"),
    ("peak/linear", ">"),
    ("check", "<"),
)


# Hand-written, not tabulate or rich: a few lines vs a new dependency (rich.table alone imports in ~20 ms here).
def _row(cells: list[str], widths: list[int]) -> str:
    if len(cells) < len(_COLUMNS):  # an implementation that did not run: its name and a footnote
        return f"  {cells[0]:<{widths[0]}}  {cells[1]}"
    padded = (f"{v:{align}{w}}" for v, (_, align), w in zip(cells, _COLUMNS, widths, strict=True))
    return ("  " + "  ".join(padded)).rstrip()


def case_title(r: dict[str, Any]) -> str:
    bias = " + bias" if r["bias"] else ""
    variant = r["variant"] + (f" (mini_r {r['mini_r']})" if r["mini_r"] else "")
    if r.get("dropout"):
        variant += f", dropout {r['dropout']:g}"
    return (
        f"{r['model']} {r['layers']}: x ({r['tokens']}, {r['in_features']}), W ({r['out_features']}, "
        f"{r['in_features']}){bias} | {variant}, r = {r['r']} | {r['dtype']} | {r['device']}"
    )


def tables(records: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """One table per case (in the order the records come), and footnotes giving each distinct not-run reason."""
    reasons: dict[tuple[str, str, str], int] = {}
    lines: list[str] = []
    cases: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        cases.setdefault(r["case_id"], []).append(r)
    for rows in cases.values():
        cells = []
        for r in rows:
            if r["status"] != "ok":
                key = (r["impl"], r["status"], r["reason"])
                note = reasons.setdefault(key, len(reasons) + 1)
                cells.append([r["label"], f"{r['status']} [{note}]"])
                continue
            cells.append(
                [
                    r["label"],
                    f"{_ms(r['fwd_median_ms'])} [{_ms(r['fwd_p20_ms'])}-{_ms(r['fwd_p80_ms'])}]",
                    f"{_ms(r['fwdbwd_median_ms'])} [{_ms(r['fwdbwd_p20_ms'])}-{_ms(r['fwdbwd_p80_ms'])}]",
                    f"{r['fwdbwd_tflops']:.3f}",
                    f"{r['fwdbwd_gbps']:.1f}",
                    _mib(r["peak_bytes"]),
                    _mib(r["kept_bytes"]),
                    _x(r.get("time_vs_peft")),
                    _x(r.get("time_vs_linear")),
                    _x(r.get("peak_vs_peft")),
                    _x(r.get("peak_vs_linear")),
                    _check_cell(r),
                ]
            )
        full = [c for c in cells if len(c) == len(_COLUMNS)]
        widths = [max([len(h)] + [len(c[i]) for c in full]) for i, (h, _) in enumerate(_COLUMNS)]
        widths[0] = max([widths[0]] + [len(c[0]) for c in cells])

        lines += ["", case_title(rows[0]), _row([h for h, _ in _COLUMNS], widths)]
        lines += [_row(c, widths) for c in cells]
    notes = [f"[{n}] {impl} {status}: {reason}" for (impl, status, reason), n in reasons.items()]
    return lines, notes


def write_json(path: str, env: dict[str, Any], settings: dict[str, Any], records: list[dict[str, Any]]) -> None:
    Path(path).write_text(json.dumps({"environment": env, "settings": settings, "results": records}, indent=1))


CSV_SKIP = ("kept_tensors",)


def write_csv(path: str, records: list[dict[str, Any]]) -> None:
    """One row per (case, implementation); the union of the records' fields, lists left out."""
    fields: list[str] = []
    for r in records:
        fields += [k for k in r if k not in fields and k not in CSV_SKIP]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)


def _plot_label(r: dict[str, Any]) -> str:
    mini = f" mini_r {r['mini_r']}" if r["mini_r"] else ""
    return f"{r['model']}\n{r['layers']}\n{r['variant']} r {r['r']}{mini}\n{r['dtype']}, M {r['tokens']}"


def write_plot(path: str, records: list[dict[str, Any]], title: str) -> None:
    """Two panels: fwd+bwd median time and peak memory, one group of bars per case, one bar per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r["status"] == "ok"]
    cases = list(dict.fromkeys(r["case_id"] for r in ok))
    impls = list(dict.fromkeys(r["impl"] for r in ok))
    by_key = {(r["case_id"], r["impl"]): r for r in ok}
    fig, axes = plt.subplots(2, 1, figsize=(max(8.0, 1.6 * len(cases) * max(1, len(impls)) / 3), 8), squeeze=False)
    width = 0.8 / max(1, len(impls))
    panels = (
        ("fwdbwd_median_ms", 1.0, "forward+backward, median ms"),
        ("peak_bytes", 1 / MIB, "peak memory during fwd+bwd, MiB"),
    )
    for ax, (key, scale, ylabel) in zip(axes[:, 0], panels, strict=True):
        for j, impl in enumerate(impls):
            xs, ys = [], []
            for i, case in enumerate(cases):
                r = by_key.get((case, impl))
                if r is not None:
                    xs.append(i + (j - (len(impls) - 1) / 2) * width)
                    ys.append(r[key] * scale)
            label = next(r["label"] for r in ok if r["impl"] == impl)
            ax.bar(xs, ys, width, label=label if impl != "lora" else "lora (matched params)")
        ax.set_ylabel(ylabel)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([_plot_label(next(r for r in ok if r["case_id"] == c)) for c in cases], fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=8, ncol=min(len(impls), 4))
    axes[0, 0].set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
