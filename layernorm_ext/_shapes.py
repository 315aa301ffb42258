"""Small helpers shared by the op wrappers."""

import numbers

import torch


def as_normalized_shape(normalized_shape):
    """normalized_shape as torch.nn accepts it (an int or a sequence), as a
    list or tuple (the ops take either). Tuples and lists, what the modules
    pass, go through untouched: the Integral check (an ABC) costs more."""
    if isinstance(normalized_shape, (tuple, list)):
        return normalized_shape
    if isinstance(normalized_shape, numbers.Integral):
        return [int(normalized_shape)]
    return list(normalized_shape)


def stats_dtype(input_dtype: torch.dtype) -> torch.dtype:
    """Dtype of saved statistics: float64 for float64 input, float32 otherwise."""
    return torch.float64 if input_dtype == torch.float64 else torch.float32


def batch_shape(input: torch.Tensor, normalized_shape) -> tuple:
    """The input's leading dims, which index the rows being normalized."""
    return tuple(input.shape[: input.dim() - len(normalized_shape)])


def empty_unless(wanted: bool, like: torch.Tensor, shape) -> torch.Tensor:
    """A fake-kernel output: `shape` with `like`'s dtype and device if wanted, else shape [0]."""
    return like.new_empty(tuple(shape) if wanted else (0,))


def check_same_device(op: str, input: torch.Tensor, **tensors) -> None:
    """The device check of the C++ ops, for calls that dispatch to a fake kernel
    because one tensor is on the meta device and another is not (the meta key
    outranks the CPU's): without it they would return uninitialised memory."""
    for name, t in tensors.items():
        if t is not None and t.device != input.device:
            raise RuntimeError(
                f"{op}: expected {name} on the input's device {input.device}, "
                f"but got {name} on {t.device}"
            )
