"""layernorm_ext: fast, exact LayerNorm, RMSNorm and BatchNorm kernels for PyTorch.

Drop-in replacements for torch.nn's normalization layers and functions,
computed by the extension's C++/OpenMP (CPU) and CUDA kernels, registered as
torch ops under ``torch.ops.layernorm_ext`` (autograd, torch.compile and
fake tensors supported).
"""

from torch.fx import wrap as _fx_wrap

from . import _loader

_loader.use_installed_build(__path__)

from ._loader import build_info, ensure_loaded, load_jit  # noqa: E402

ensure_loaded()

from .batch_norm import BatchNorm1d, BatchNorm2d, BatchNorm3d, batch_norm  # noqa: E402
from .convert import replace_norms  # noqa: E402
from .fused_add import fused_add_layer_norm, fused_add_rms_norm  # noqa: E402
from .layer_norm import LayerNorm, layer_norm  # noqa: E402
from .rms_norm import RMSNorm, rms_norm  # noqa: E402
from .sync_batch_norm import SyncBatchNorm  # noqa: E402
from . import _vmap  # noqa: E402,F401  (the ops' batching rules)

# torch.fx.symbolic_trace records the functional wrappers as calls when
# traced code reaches them through the package (layernorm_ext.rms_norm(...));
# fx.wrap applies to the names in one module's globals, and the modules'
# forward reach them through their own module's (see layer_norm.py).
for _name in ("batch_norm", "fused_add_layer_norm", "fused_add_rms_norm", "layer_norm", "rms_norm"):
    _fx_wrap(_name)
del _name

__version__ = "0.1.0"

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "LayerNorm",
    "RMSNorm",
    "SyncBatchNorm",
    "batch_norm",
    "build_info",
    "fused_add_layer_norm",
    "fused_add_rms_norm",
    "layer_norm",
    "load_jit",
    "replace_norms",
    "rms_norm",
]
