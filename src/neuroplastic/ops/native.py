"""Fused CPU kernels for the GPT's eager hot path, built from C++ on first use.

``csrc/cpu_kernels.cpp`` registers ``torch.ops.neuroplastic.rms_norm`` and
``torch.ops.neuroplastic.rope_qkv_`` (float32/float64, CPU), each with a C++ autograd node:
RMSNorm in one pass forward and one backward (the PyTorch forms make three and four), RoPE
rotating queries and keys in place on ``c_attn``'s output. Neither the forward nor the
backward runs Python, which at small sizes is most of the saving. Under ``torch.compile``
(which cannot trace in-place ops returning views) RoPE is ``rope_qkv``, the same kernel
writing new q/k/v tensors, with fake and gradient formulas registered here
(``rope_qkv_backward``: one kernel into ``c_attn``'s layout); RMSNorm is left to inductor,
which fuses it well. Measured in docs/BENCHMARKS.md (``benchmarks/vs_nanogpt.py``; its
``--torch-forms`` column is the same model on the PyTorch forms).

The kernels are compiled once per CPU type, Python and torch version with
``torch.utils.cpp_extension.load`` (a C++ compiler and ninja; about 20 s on 2 cores) into
``$NEUROPLASTIC_NATIVE_DIR`` or ``~/.cache/neuroplastic/native/``; later processes load the
built library in milliseconds. Where the build fails (no compiler, Windows, a read-only
cache), one warning says so and the model runs on its PyTorch forms, which compute the same
thing (the tests compare both, and run gradcheck on the kernels in float64). Setting the
environment variable ``NEUROPLASTIC_NO_NATIVE=1`` skips them.

:func:`native_ops` returns the kernels or ``None``; :func:`native_usable` says whether
a tensor can take the kernels (CPU, float32/float64, not under ``torch.compile``, which
fuses the PyTorch forms itself).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

__all__ = ["NATIVE_DTYPES", "NativeOps", "native_build_dir", "native_for_compile", "native_disabled", "native_ops", "native_usable"]

SOURCE = Path(__file__).with_name("csrc") / "cpu_kernels.cpp"
# -march=native on x86-64 Linux: measured at 4L/128 sizes (768 rows, 1 thread), RMSNorm
# fwd+bwd 160 -> 105 us and the RoPE node fwd+bwd 700 -> 300 us against the SSE2 baseline.
# The build folder is keyed by the CPU's model and flags, so a home directory shared by
# different machines never loads a library built for another instruction set.
_X86_LINUX = sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")
CFLAGS = ("-O3", "-fopenmp-simd") + (("-march=native",) if _X86_LINUX else ())
NATIVE_DTYPES = (torch.float32, torch.float64)  # what the kernels compute in

_lock = threading.Lock()
_state: dict[str, object] = {}
_enabled = True  # see native_disabled


class NativeOps(NamedTuple):
    """The loaded kernels (see the C++ source for their contracts)."""

    rms_norm: Callable  # (x, weight, eps) -> y
    rope_qkv_: Callable  # (qkv (B, T, 3, nh, hd), cos (T, hd/2), sin, interleaved) -> q, k, v
    rope_qkv: Callable  # the same, functional: q, k, v as new (B, T, nh, hd) tensors (compile)


def _cpu_signature() -> bytes:
    """The CPU's model name and feature flags (Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        info = "".join(dict.fromkeys(lines))  # the same lines repeat per core
    except OSError:
        info = ""
    return (info or f"{platform.machine()} {platform.processor()}").encode()


def native_build_dir() -> Path:
    """Where the library is built: one folder per source, compiler flags, CPU, Python and
    torch version."""
    tag = hashlib.sha256(SOURCE.read_bytes() + " ".join(CFLAGS).encode() + _cpu_signature()).hexdigest()[:12]
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    torch_v = torch.__version__.replace("+", "_")
    root = os.environ.get("NEUROPLASTIC_NATIVE_DIR") or Path.home() / ".cache" / "neuroplastic" / "native"
    return Path(root) / f"{py}-torch{torch_v}-{tag}"


def _disabled() -> bool:
    return os.environ.get("NEUROPLASTIC_NO_NATIVE", "").strip().lower() not in ("", "0", "false", "no")


def _library_name(build_dir: Path) -> str:
    return "neuroplastic_native_" + build_dir.name.rsplit("-", 1)[1]


def _build() -> NativeOps:
    """Load the built library, or build it first (once per build folder; a failed build
    is remembered there, so later processes do not spend the compile again)."""
    if sys.platform == "win32":
        raise RuntimeError("the native kernels are built on Linux and macOS only")
    build_dir = native_build_dir()
    name = _library_name(build_dir)
    library, built, failed = build_dir / f"{name}.so", build_dir / "built", build_dir / "failed"
    if built.is_file() and library.is_file():
        torch.ops.load_library(str(library))  # no compiler, no ninja: a few milliseconds
    elif failed.is_file():
        raise RuntimeError(f"{failed.read_text().strip()} (an earlier build; delete {build_dir} to retry)")
    else:
        build_dir.mkdir(parents=True, exist_ok=True)
        print(f"neuroplastic: building the fused CPU kernels once into {build_dir} (about 20 s)",
              file=sys.stderr, flush=True)
        try:
            _compile(name, build_dir)
        except Exception as err:
            with contextlib.suppress(OSError):
                failed.write_text(_first_error(err) + "\n")
            raise
        # the marker last: a process that starts while another is still linking builds
        # (or waits on torch's lock) instead of loading a half-written library
        built.write_text(torch.__version__ + "\n")
    try:
        _register_compile_formulas()
        _state["compile"] = True
    except Exception as err:  # an older torch.library: compiled models keep the PyTorch forms
        _state["compile"] = False
        warnings.warn(f"neuroplastic: the fused RoPE kernel is not offered to torch.compile ({err})",
                      RuntimeWarning, stacklevel=2)
    # the OpOverloads, not the packets: no overload resolution per call
    ops = torch.ops.neuroplastic
    return NativeOps(ops.rms_norm.default, ops.rope_qkv_.default, ops.rope_qkv.default)


def _register_compile_formulas() -> None:
    """What torch.compile needs to put ``rope_qkv`` in its graph: the outputs' shapes (fake
    tensors) and the gradient (``rope_qkv_backward``, one kernel into qkv's layout)."""

    def fake(qkv, cos, sin, interleaved):
        B, T, _, nh, hd = qkv.shape
        return tuple(qkv.new_empty(B, T, nh, hd) for _ in range(3))

    def fake_backward(gq, gk, gv, cos, sin, interleaved):
        B, T, nh, hd = gq.shape
        return gq.new_empty(B, T, 3, nh, hd)

    def setup_context(ctx, inputs, output):
        _, cos, sin, ctx.interleaved = inputs
        ctx.save_for_backward(cos, sin)

    def backward(ctx, gq, gk, gv):
        cos, sin = ctx.saved_tensors
        like = next(g for g in (gq, gk, gv) if g is not None)
        gq, gk, gv = (torch.zeros_like(like) if g is None else g for g in (gq, gk, gv))
        grad = torch.ops.neuroplastic.rope_qkv_backward.default(gq, gk, gv, cos, sin, ctx.interleaved)
        return grad, None, None, None

    torch.library.register_fake("neuroplastic::rope_qkv")(fake)
    torch.library.register_fake("neuroplastic::rope_qkv_backward")(fake_backward)
    torch.library.register_autograd("neuroplastic::rope_qkv", backward, setup_context=setup_context)


def _compile(name: str, build_dir: Path) -> None:
    from torch.utils.cpp_extension import load

    path = os.environ.get("PATH", "")
    if shutil.which("ninja") is None:  # the pip package's binary, when the venv is not activated
        with contextlib.suppress(ImportError):
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + path
    try:
        load(name=name, sources=[str(SOURCE)], extra_cflags=list(CFLAGS),
             build_directory=str(build_dir), is_python_module=False, verbose=False)
    finally:
        os.environ["PATH"] = path


def _first_error(err: BaseException) -> str:
    """The compiler's first error line, else the message's first line."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or [type(err).__name__])[0][:300]


def native_ops() -> NativeOps | None:
    """The kernels (:class:`NativeOps`) once built and loaded, else ``None``
    (disabled, or the build failed: warned once)."""
    if "ops" in _state:
        return _state["ops"]
    with _lock:
        if "ops" not in _state:
            ops = None
            if not _disabled():
                try:
                    ops = _build()
                except Exception as err:  # no compiler / ninja, a compile error, a read-only cache
                    warnings.warn(
                        f"neuroplastic: the fused CPU kernels could not be built ({_first_error(err)}); "
                        "the model runs on its PyTorch forms (same results, slower at small "
                        "sizes). Set NEUROPLASTIC_NO_NATIVE=1 to skip the attempt.",
                        RuntimeWarning,
                        stacklevel=3,
                    )
            _state["ops"] = ops
    return _state["ops"]


@torch.compiler.assume_constant_result
def native_for_compile() -> bool:
    """Whether torch.compile may put the kernels' functional forms in its graph: built,
    switched on, and their fake/gradient formulas registered (builds them on the first
    call). For code that torch.compile traces: the result is a constant of the graph."""
    return _enabled and native_ops() is not None and bool(_state.get("compile"))


@contextlib.contextmanager
def native_disabled():
    """Within the block, models take their PyTorch forms (an A/B in one process: the
    benchmarks and tests use it). Not thread-safe: it flips a module-wide switch."""
    global _enabled
    previous, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = previous


def native_usable(x: torch.Tensor) -> bool:
    """True when ``x`` can go through the kernels: a CPU float32/float64 tensor, eager
    (not being traced by ``torch.compile``), the kernels built, and not inside
    :func:`native_disabled`."""
    return (
        _enabled
        and x.device.type == "cpu"
        and x.dtype in NATIVE_DTYPES
        and not torch.compiler.is_compiling()
        and native_ops() is not None
    )
