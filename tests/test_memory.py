"""busi_jax.memory: freed blocks stay in the process, so reusing them costs no page faults."""

import subprocess
import sys
import textwrap

import pytest

# Run in a fresh interpreter: the settings only take before JAX starts its
# backend, which the rest of the test session has done long ago.
_SCRIPT = textwrap.dedent(
    """
    import ctypes, resource, sys
    from busi_jax import memory
    applied = memory.keep_freed_memory() if sys.argv[1] == "keep" else None
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size = 96 << 20  # Above glibc's largest mmap threshold (32 MB).
    faults = []
    for _ in range(4):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        p = libc.malloc(size)
        ctypes.memset(p, 1, size)  # Touch every page, as a train step does.
        libc.free(p)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    import jax, jax.numpy as jnp
    jax.block_until_ready(jnp.ones(2) + 1)
    late = memory.keep_freed_memory.__wrapped__()
    print(applied, faults[-1], late)
    """
)


def _run(mode: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, check=True
    )
    return out.stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_reuses_large_blocks_without_page_faults():
    applied, faults, late = _run("keep")
    assert applied == "True"
    # The third reuse of a 96 MB block: its pages are still mapped.
    assert int(faults) < 100
    # Once JAX's backend is up the arena limit cannot take: it says so.
    assert late == "False"
    _, plain_faults, _ = _run("plain")
    # Without it glibc maps and unmaps the block every time: 24,576 pages.
    assert int(plain_faults) > 10_000
