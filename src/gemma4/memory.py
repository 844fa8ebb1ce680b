"""Handing freed memory back to the OS (glibc), where a peak RSS target depends on it."""
import ctypes
import functools
import os


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None


def return_freed_heap() -> None:
    """Give the C heap's free pages back to the OS. glibc keeps freed memory for reuse, so a prefill's
    activations stayed resident while the KV-shared layers' weights were paged in after them (the peak RSS
    of an int4 E2B prefill is the activations plus every weight). Costs about a millisecond."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _native_bf16() -> bool:
    from . import hardware

    try:
        return hardware.native_bf16()
    except ValueError:  # a bad GEMMA4_BF16_GEMM: said clearly where it is used, not at import
        return False


def unpool_large_buffers(threshold: int = 1 << 20) -> None:
    """Have glibc give every allocation of `threshold` bytes or more its own mapping, returned to the OS when
    freed. By default glibc raises that threshold to the largest block freed so far (up to 32 MB), after
    which a prefill's prompt-sized tensors come from its heap, whose freed pieces stay resident: the peak RSS
    of a 512-token E2B prefill was 11 MB higher in bf16 and ~35 MB in int4 (fp32 activations). The price is
    a page fault per 4 kB of each fresh buffer, ~2% of a prefill's time once the products reuse their fp32
    buffers (kernels.scratch); a 256 kB threshold saved 25 MB more in int4 but cost 9% of its prefill.
    Not done where bf16 is native: activations are bf16 there (half the bytes to keep) and prefill's GEMMs several
    times faster, so the page faults cost 9-33% of a prefill for 3-48 MB of peak RSS (README "CPU paths").
    A user's MALLOC_MMAP_THRESHOLD_ wins."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or _native_bf16():
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, threshold)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
