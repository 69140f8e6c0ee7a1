"""Peak traced memory of one call, for the tests that memory does not grow with the corpus."""

import tracemalloc


def traced_peak(fn, *args, **kwargs) -> int:
    """tracemalloc's peak over fn(*args, **kwargs): every Python object and numpy buffer allocated meanwhile
    (memory-mapped files are not allocations, so their pages do not count)."""
    tracemalloc.start()
    try:
        fn(*args, **kwargs)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
