"""bonekern: fused kernels for Bone / Bat (Block-Affine adaptation; PEFT's MiSS).

Public API:

- :func:`bone_linear` — the adapted linear layer, differentiable, any backend;
- :func:`bat_linear_quantized` — bat over a quantised (bitsandbytes, torchao, hqq) or dense base weight, formed
  a chunk of rows at a time; :func:`weight_source` / :class:`WeightSource` read such weights by rows;
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
from .quant import WeightSource, weight_source
from .quant_ops import bat_linear_quantized
from .variants import VARIANTS, AdapterSpec

__version__ = "0.1.0"

__all__ = [
    "BACKEND_NAMES",
    "VARIANTS",
    "AdapterSpec",
    "BackendUnavailableError",
    "BoneLinear",
    "WeightSource",
    "adapter_output",
    "available_backends",
    "bat_linear_quantized",
    "bone_linear",
    "delta_weight",
    "merge",
    "reference",
    "unmerge",
    "weight_source",
]
