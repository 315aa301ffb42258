"""``replace_norms``: switch an existing model's torch.nn norm layers to layernorm_ext's."""

import torch


def _replacements() -> dict:
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


def replace_norms(module: torch.nn.Module) -> torch.nn.Module:
    """Make every torch.nn norm layer in ``module`` compute with layernorm_ext's kernels.

    Every submodule (``module`` included, at any depth, inside Sequential,
    ModuleList, ModuleDict or any other container) whose type is exactly
    ``torch.nn.LayerNorm``, ``RMSNorm``, ``BatchNorm1d``, ``BatchNorm2d``,
    ``BatchNorm3d`` or ``SyncBatchNorm`` becomes an instance of the
    layernorm_ext class of the same name. The conversion is in place: each
    layer stays the same object and only its class changes (our classes
    override ``forward`` only and add no state). So its parameters (the same
    ``Parameter`` objects, so optimizers already holding them keep working),
    buffers, device, dtype, hooks, train/eval mode, ``state_dict`` keys and any
    reference to it held elsewhere are all kept, and its outputs equal
    torch's up to rounding.

    Our LayerNorm, RMSNorm and BatchNorm classes subclass torch's, so
    ``isinstance`` checks keep passing. Our SyncBatchNorm subclasses torch's
    BatchNorm base class, not ``torch.nn.SyncBatchNorm``: that is what lets
    DistributedDataParallel accept it in a CPU model, and it means
    ``isinstance(m, torch.nn.SyncBatchNorm)`` is False after the conversion.

    Left as they are: layers that are already layernorm_ext's, and subclasses
    of torch's norm classes that are not exactly those classes (they may
    override ``forward`` or add state we would not know about), such as a not
    yet initialized ``LazyBatchNorm1d`` (run it once first: it then becomes a
    ``torch.nn.BatchNorm1d``).

    Returns ``module`` (converted, if it is itself a norm layer).
    """
    replacements = _replacements()
    for submodule in module.modules():
        ours = replacements.get(type(submodule))
        if ours is not None:
            submodule.__class__ = ours
    return module
