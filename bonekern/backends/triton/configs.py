"""Every tunable Triton config, in one place: the autotuner reads :func:`candidate_configs`, dispatch reads
:func:`default_config` when nothing is tuned. A config is a JSON-serialisable dict (strategy, tile sizes,
``num_warps``, ``num_stages``); the kernel modules accept exactly the dicts produced here.
"""

from __future__ import annotations

from ..base import Config, OpProblem


def bone_forward_configs(problem: OpProblem) -> list[Config]:
    """Candidates for bone/mini forward, default first."""
    raise NotImplementedError("bone forward Triton configs are being written")


def bone_backward_configs(problem: OpProblem) -> list[Config]:
    """Candidates for bone/mini backward, default first."""
    raise NotImplementedError("bone backward Triton configs are being written")


def bat_forward_configs(problem: OpProblem) -> list[Config]:
    """Candidates for bat forward, default first."""
    raise NotImplementedError("bat forward Triton configs are being written")


def bat_backward_configs(problem: OpProblem) -> list[Config]:
    """Candidates for bat backward, default first."""
    raise NotImplementedError("bat backward Triton configs are being written")


_BY_OP = {
    "bone_forward": bone_forward_configs,
    "bone_backward": bone_backward_configs,
    "bat_forward": bat_forward_configs,
    "bat_backward": bat_backward_configs,
}


def candidate_configs(problem: OpProblem) -> list[Config]:
    """Every config the autotuner may time for ``problem``; the first one is the default."""
    return _BY_OP[problem.op](problem)


def default_config(problem: OpProblem) -> Config:
    """The config used when nothing is tuned."""
    return candidate_configs(problem)[0]
