"""bonekern: fused kernels for Bone / Bat (Block-Affine adaptation; PEFT's MiSS).

Public API:

- :func:`bone_linear` — the adapted linear layer, differentiable, any backend;
- :func:`adapter_output` — the bone/mini adapter term alone, to add to any base layer's output (quantised too);
- :func:`delta_weight`, :func:`merge`, :func:`unmerge` — fold the adapter into the weight and back;
- :class:`BoneLinear` — an ``nn.Module`` wrapping a frozen linear layer with a trainable block;
- :mod:`bonekern.reference` — the einsum specification every backend is tested against;
- ``torch.ops.bonekern.*`` — the custom ops underneath (see :mod:`bonekern.ops`).
"""

from . import reference
from .backends import BACKEND_NAMES, available_backends
from .errors import BackendUnavailableError
from .functional import adapter_output, bone_linear, delta_weight, merge, unmerge
from .modules import BoneLinear
from .variants import VARIANTS, AdapterSpec

__version__ = "0.1.0"

__all__ = [
    "BACKEND_NAMES",
    "VARIANTS",
    "AdapterSpec",
    "BackendUnavailableError",
    "BoneLinear",
    "adapter_output",
    "available_backends",
    "bone_linear",
    "delta_weight",
    "merge",
    "reference",
    "unmerge",
]
