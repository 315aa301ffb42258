"""``replace_norms``: switch an existing model's norm layers to layernorm_ext's."""

import collections
import logging
import re
from typing import Iterable

import torch

from . import model_norms

_log = logging.getLogger("layernorm_ext")

# Layers the report lists as left alone (only the report: a layer is
# converted by its exact class, never by what it looks like).
_TORCH_NORM_BASES = (
    torch.nn.modules.batchnorm._NormBase,
    torch.nn.LayerNorm,
    torch.nn.RMSNorm,
    torch.nn.GroupNorm,
    torch.nn.LocalResponseNorm,
)


def _torch_replacements() -> dict:
    """torch.nn class -> our drop-in subclass of it."""
    # Imported when called: the package's __init__ imports this module while
    # it is still importing the classes.
    from . import BatchNorm1d, BatchNorm2d, BatchNorm3d, LayerNorm, RMSNorm, SyncBatchNorm

    return {
        torch.nn.LayerNorm: LayerNorm,
        torch.nn.RMSNorm: RMSNorm,
        torch.nn.BatchNorm1d: BatchNorm1d,
        torch.nn.BatchNorm2d: BatchNorm2d,
        torch.nn.BatchNorm3d: BatchNorm3d,
        torch.nn.SyncBatchNorm: SyncBatchNorm,
    }


def _is_ours(cls: type) -> bool:
    return cls.__module__.split(".")[0] == "layernorm_ext"


def _looks_like_a_norm(cls: type) -> bool:
    # LlamaRMSNorm, LayerNorm2dFp32, BatchNormAct2d, GroupNorm1, RMSNormGated.
    return issubclass(cls, _TORCH_NORM_BASES) or bool(
        re.search(r"Norm(Act)?(\d+d?)?(Fp32)?(Gated)?$", cls.__name__)
    )


def replace_norms(module: torch.nn.Module, exclude: Iterable[type] = ()) -> torch.nn.Module:
    """Make the norm layers in ``module`` compute with layernorm_ext's kernels.

    Converted, at any depth (``module`` included, inside Sequential,
    ModuleList, ModuleDict or any other container), each layer whose type is
    exactly:

    - ``torch.nn.LayerNorm``, ``RMSNorm``, ``BatchNorm1d``, ``BatchNorm2d``,
      ``BatchNorm3d`` or ``SyncBatchNorm``: it becomes an instance of the
      layernorm_ext class of the same name;
    - one of the Hugging Face transformers and timm classes listed in
      ``layernorm_ext/model_norms.py``: the RMSNorm of Llama, Qwen2/3,
      Mistral, Phi3 and the other models that share its code (144 classes),
      Gemma's (``1 + weight``), T5's, the ones that multiply by the weight in
      float32 (GPT-OSS, OLMo2, ...), and timm's ``LayerNorm``,
      ``LayerNormFp32``, ``LayerNorm2d``, ``LayerNorm2dFp32``, ``RmsNorm`` and
      ``BatchNormAct2d``. It becomes an instance of our subclass of its class,
      which computes what the original computes (its float32 arithmetic and
      its roundings, in the same order) with our kernels.

    The conversion is in place: each layer stays the same object and only its
    class changes (our classes override ``forward`` only and add no state).
    So its parameters (the same ``Parameter`` objects, so optimizers already
    holding them keep working), buffers, device, dtype, hooks, train/eval
    mode, ``state_dict`` keys (``save_pretrained``/``from_pretrained`` and
    timm checkpoints load both ways) and any reference to it held elsewhere
    are all kept, and its outputs equal the original's up to rounding.

    Our torch.nn classes subclass torch's, so ``isinstance`` checks keep
    passing. Our SyncBatchNorm subclasses torch's BatchNorm base class, not
    ``torch.nn.SyncBatchNorm``: that is what lets DistributedDataParallel
    accept it in a CPU model, and it means ``isinstance(m,
    torch.nn.SyncBatchNorm)`` is False after the conversion.

    Left as they are: classes in ``exclude``, layers that are already
    layernorm_ext's, and every other class, subclasses of the classes above
    included (they may override ``forward`` or add state we would not know
    about), such as a not yet initialized ``LazyBatchNorm1d`` (run it once
    first: it then becomes a ``torch.nn.BatchNorm1d``).

    What was converted and what was left alone is logged, counted by class,
    at INFO level on the ``layernorm_ext`` logger.

    Returns ``module`` (converted, if it is itself a norm layer).
    """
    exclude = frozenset(exclude)
    torch_replacements = _torch_replacements()
    converted = collections.Counter()
    left_alone = collections.Counter()
    for submodule in module.modules():
        cls = type(submodule)
        if _is_ours(cls):
            continue
        ours = None
        if cls not in exclude:
            ours = torch_replacements.get(cls) or model_norms.converted_class(cls)
        if ours is not None:
            submodule.__class__ = ours
            converted[cls.__qualname__] += 1
        elif _looks_like_a_norm(cls):
            left_alone[cls.__qualname__] += 1
    if _log.isEnabledFor(logging.INFO):
        _log.info(
            "replace_norms converted %s; left alone %s",
            _count_by_class(converted),
            _count_by_class(left_alone),
        )
    return module


def _count_by_class(counts: collections.Counter) -> str:
    if not counts:
        return "nothing"
    return ", ".join(f"{count} {name}" for name, count in sorted(counts.items()))
