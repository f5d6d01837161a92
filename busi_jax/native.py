"""Builds, caches and registers the project's C++ XLA kernels (``busi_jax/csrc``).

A kernel is compiled on first use with the machine's C++ compiler
(``g++ -O3 -march=native``, so the code uses whatever vector units this CPU
has) against the XLA FFI headers that ship with jaxlib, cached under
``$BUSI_JAX_CACHE`` (default ``~/.cache/busi_jax``) keyed by a hash of the
source, the compiler, the flags, the jax version and the CPU's feature flags,
and registered as a ``jax.ffi`` target for the CPU. Nothing is downloaded.
The build writes to a temporary file and renames it into place, so an
interrupted or concurrent build never leaves a half-written library.

Only models configured with ``wgrad='native'``, ``'native_bf16'`` or ``'native_amx'`` call
this; the default (``'xla'``) needs no compiler.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax

SOURCE_DIR = Path(__file__).resolve().parent / "csrc"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")

# kernel name -> (source file, exported handler symbol, jax.ffi target name)
KERNELS = {
    "conv_wgrad": ("conv_wgrad.cc", "BusiConvWgrad", "busi_conv_wgrad"),
    "conv_amx": ("conv_amx.cc", "BusiConvAmx", "busi_conv_amx"),
    "conv_amx_wgrad": ("conv_amx.cc", "BusiConvAmxWgrad", "busi_conv_amx_wgrad"),
    "conv_amx_affine_relu": ("conv_amx.cc", "BusiConvAmxAffineRelu", "busi_conv_amx_affine_relu"),
    "conv_amx_concat_affine_relu": (
        "conv_amx.cc",
        "BusiConvAmxConcatAffineRelu",
        "busi_conv_amx_concat_affine_relu",
    ),
    "conv_amx_concat": ("conv_amx.cc", "BusiConvAmxConcat", "busi_conv_amx_concat"),
    "conv_amx_pack": ("conv_amx.cc", "BusiConvAmxPack", "busi_conv_amx_pack"),
    "conv_amx_concat_wgrad": (
        "conv_amx.cc",
        "BusiConvAmxConcatWgrad",
        "busi_conv_amx_concat_wgrad",
    ),
    "bn_relu_forward": ("batch_norm.cc", "BusiBnReluForward", "busi_bn_relu_forward"),
    "bn_relu_backward": ("batch_norm.cc", "BusiBnReluBackward", "busi_bn_relu_backward"),
    "max_pool_backward": ("max_pool.cc", "BusiMaxPoolBackward", "busi_max_pool_backward"),
}


class NativeBuildError(RuntimeError):
    """A native kernel could not be compiled or loaded."""


def cache_dir() -> Path:
    """Where compiled kernels live (``$BUSI_JAX_CACHE`` or ``~/.cache/busi_jax``)."""
    root = os.environ.get("BUSI_JAX_CACHE")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg).expanduser() / "busi_jax" if xdg else Path.home() / ".cache" / "busi_jax"


def _compiler() -> str:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    raise NativeBuildError(
        "model.wgrad='native' compiles a C++ kernel on first use and needs a C++ compiler, "
        "but none of $CXX, g++, c++, clang++ is on PATH; install one (Debian: apt install g++) "
        "or set model.wgrad='xla'"
    )


def cpu_flags() -> str:
    """The CPU's ``flags`` line from ``/proc/cpuinfo`` (else its machine name)."""
    # Part of the build key: -march=native output is only valid on a CPU with
    # the same features.
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build(name: str) -> Path:
    source_name, _, _ = KERNELS[name]
    source = SOURCE_DIR / source_name
    if not source.is_file():
        raise NativeBuildError(f"{source}: kernel source is missing from the installed package")
    cxx = _compiler()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout
    # The kernels' shared headers are part of what gets compiled.
    headers = [h.read_text() for h in sorted(SOURCE_DIR.glob("*.h"))]
    key = hashlib.sha256(
        "\0".join(
            [source.read_text(), *headers, cxx, version, " ".join(FLAGS), jax.__version__]
            + [cpu_flags()]
        ).encode()
    ).hexdigest()[:16]
    # Named after the source: kernels sharing a source share one library.
    out = cache_dir() / f"{source.stem}-{key}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{source.stem}-", suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cxx, *FLAGS, "-isystem", jax.ffi.include_dir(), str(source), "-o", tmp]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise NativeBuildError(
                f"{source}: compiling the native kernel failed ({' '.join(cmd)}):\n"
                + proc.stderr[-2000:]
            )
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


@functools.cache
def load(name: str) -> str:
    """Builds (once per machine) and registers kernel ``name``; returns its jax.ffi target.

    Raises:
      NativeBuildError: no compiler, a failed build, or a library that will not load.
      KeyError: ``name`` is not one of :data:`KERNELS`.
    """
    _, symbol, target = KERNELS[name]
    path = _build(name)
    try:
        library = ctypes.cdll.LoadLibrary(str(path))
    except OSError as e:
        raise NativeBuildError(
            f"{path}: cannot load the compiled kernel ({e}); delete it to rebuild"
        )
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    return target
