"""The cache of freed CPU output memory.

The CPU ops write their large outputs (the normalized tensor, the input
gradient, the fused sum; 256 KiB and up) into memory taken from a cache of
blocks that earlier outputs freed, because fresh memory costs a page fault
every 4 KiB the first time it is written: several times the normalization
itself. Like torch's CUDA caching allocator, it keeps idle blocks for reuse
instead of returning them to the OS, up to a limit on idle bytes:
``LAYERNORM_EXT_CPU_CACHE_MB`` (read at the first op call; default 128,
``0`` turns caching off) or :func:`set_cpu_cache_limit`. Blocks come in size
classes, eight per doubling, so that a freed block also serves requests a
little larger than the one it was made for (it wastes at most an eighth of
itself), and growing sizes find blocks.
"""

from ._loader import ensure_loaded


def cpu_cache_info() -> dict:
    """The cache's state: ``cached_bytes`` (idle blocks held now),
    ``limit_bytes``, and ``hits`` / ``misses`` (cacheable allocations served
    from the cache / freshly allocated) since the process started."""
    return dict(ensure_loaded().cpu_cache_info())


def empty_cpu_cache() -> int:
    """Returns every idle cached block to the OS (like ``torch.cuda.empty_cache``):
    the blocks are unmapped, so the process's resident memory drops at once;
    memory held by live tensors is unaffected. Returns the bytes released."""
    return int(ensure_loaded().empty_cpu_cache())


def set_cpu_cache_limit(limit_bytes: int) -> None:
    """Sets the most idle memory the cache may hold, releasing the oldest
    blocks above it; ``0`` turns caching off."""
    ensure_loaded().set_cpu_cache_limit(int(limit_bytes))
