"""Handing freed memory back to the OS (glibc), where a peak RSS target depends on it."""
import ctypes
import functools


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
