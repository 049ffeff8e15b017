"""Helpers shared by the tests: random problems and comparisons against the float64 reference
(:mod:`.problems`), tiny local models (:mod:`.models`), and the repository's paths (:data:`ROOT`)."""

from pathlib import Path

from .problems import *  # noqa: F403
from .problems import __all__ as _problems_all

ROOT = Path(__file__).resolve().parents[2]
"""The repository's top folder (pyproject.toml, bonekern/, tests/, ...)."""

__all__ = ["ROOT", *_problems_all]
