"""The kernels the floating-point error model assumes (:mod:`gloronet.fp`), and how they are kept.

The error model covers IEEE float32 / float64 arithmetic in which every dense / conv output is a
sum of its products in any order (FMA, wider accumulators, flush-to-zero allowed). It does not
cover reduced-precision inner products (TF32, bf16, the 3M complex product) nor Winograd / FFT
convolutions, whose rounding is not that of a sum of products. PyTorch picks kernels through
*process-wide* settings, so :func:`sound_kernels` sets them for the whole process while any sound
pass runs (torch has no per-thread form of them):

* reference counted, under one lock: the first section to open saves the user's settings and
  sets the sound ones, the last to close restores the saved ones; in between, nothing is
  restored, so no sound pass ever runs on the user's kernels because another thread finished;
* while a section is open, other threads' code also runs with IEEE float32 and without cuDNN
  (never less accurate; maybe slower);
* a managed setting changed while a section is open (another thread assigning torch's flags) is
  taken as the user's new choice — it is what the last section restores — the sound value is put
  back at once, and every section open then raises :class:`KernelSettingsChanged` when it ends,
  so no certificate or eval output comes from a pass that may have run on other kernels. A change
  made and undone between two section entries / exits cannot be seen: change torch's precision
  settings from another thread only while no sound pass runs, or change the per-backend parents
  (``torch.backends.mkldnn.fp32_precision`` …), which the sections override without conflict;
* "restored exactly": every getter reads as before. A precision leaf that read the same as its
  parent is restored as inheriting it (torch's getters cannot tell an explicit equal value from
  inheritance), so a later change of the parent reaches it, as it did before.

Environment and build (:func:`environment_problem`, :func:`onednn_fpmath_relaxed`,
:func:`winograd_depthwise_build`): oneDNN creates its float32 primitives with the default
fp-math mode of ``ONEDNN_DEFAULT_FPMATH_MODE`` / ``DNNL_DEFAULT_FPMATH_MODE`` (bf16 / tf32 compute
on CPUs that have it); when one was ever seen relaxed in this process the sections route around
oneDNN (ATen's im2col + BLAS kernels). ARM builds with NEON send float32 depthwise 3×3 stride-1
convolutions to PyTorch's Winograd kernel, which no flag turns off: there the layers sum those
taps themselves (:mod:`gloronet.nn.depthwise`). Settings that reduce float32 precision and
that nothing here can override make certification refuse, naming the variable:
``TORCH_ALLOW_TF32_CUBLAS_OVERRIDE`` and ``NVIDIA_TF32_OVERRIDE`` (CUDA), ``MKL_BLAS_COMPUTE_MODE``
(oneMKL's alternative GEMM modes). ``torch.set_flush_denormal`` is covered by the model (the ``λ``
terms of :mod:`gloronet.fp`).
"""
from __future__ import annotations

import contextlib
import functools
import os
import platform
import threading
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

_X86 = ("x86_64", "amd64", "i386", "i686", "x86")
_ARM = ("aarch64", "arm64", "riscv64")  # NEON / RISC-V vector builds


class KernelSettingsChanged(RuntimeError):
    """A managed torch setting changed while a sound pass ran: its result may not be certified."""


# --------------------------------------------------------------------------- environment and build
FPMATH_VARIABLES = ("ONEDNN_DEFAULT_FPMATH_MODE", "DNNL_DEFAULT_FPMATH_MODE")


def machine() -> str:
    """The CPU architecture (``platform.machine()``, lower case); a function so tests can fake it."""
    return platform.machine().lower()


def onednn_fpmath_value(environ: Mapping[str, str]) -> str | None:
    """``NAME=value`` of the first oneDNN default fp-math variable that allows down-conversions
    (anything set other than ``strict``), or None when oneDNN computes float32 strictly."""
    for name in FPMATH_VARIABLES:
        value = environ.get(name, "").strip()
        if value and value.lower() != "strict":
            return f"{name}={value}"
    return None


def _initial_environ() -> dict[str, str]:
    """The environment the process started with (Linux), which oneDNN may already have read."""
    try:
        with open("/proc/self/environ", "rb") as f:
            pairs = [p.split(b"=", 1) for p in f.read().split(b"\0") if b"=" in p]
        return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}
    except OSError:
        return {}


# oneDNN reads its default fp-math mode once, when it first needs it: a relaxed value seen at any
# time (at start, at import, at any section entry) is kept for the life of the process.
_relaxed_fpmath: list[str] = [v for v in (onednn_fpmath_value(_initial_environ()), onednn_fpmath_value(os.environ)) if v]


def onednn_fpmath_relaxed() -> str | None:
    """The relaxed oneDNN fp-math setting seen in this process (sticky), or None."""
    now = onednn_fpmath_value(os.environ)
    if now and now not in _relaxed_fpmath:
        _relaxed_fpmath.append(now)
    return _relaxed_fpmath[0] if _relaxed_fpmath else None


def onednn_allowed() -> bool:
    """Whether sound passes may run on oneDNN: on x86-64 (where PyTorch asks it for direct
    convolutions; elsewhere it may hand them to Arm Compute Library's Winograd) with strict fp-math."""
    return machine() in _X86 and onednn_fpmath_relaxed() is None


def winograd_depthwise_build(arch: str | None = None) -> bool:
    """True on ARM and RISC-V builds (``arch``, default :func:`machine`), where PyTorch sends float32
    depthwise 3×3 stride-1 convolutions to its NEON / RVV Winograd kernel (``Winograd3x3Depthwise``)
    whatever the settings."""
    arch = (machine() if arch is None else arch).lower()
    return arch in _ARM or arch.startswith("arm")


def environment_problem(device_type: str, environ: Mapping[str, str] | None = None) -> str | None:
    """A one-line reason why float32 passes on ``device_type`` may compute in reduced precision
    whatever torch's settings (None when nothing is known to): see the module docstring."""
    env = os.environ if environ is None else environ
    mode = env.get("MKL_BLAS_COMPUTE_MODE", "").strip()
    if mode and mode.lower() != "standard":
        return f"MKL_BLAS_COMPUTE_MODE={mode} lets oneMKL compute matrix products in reduced precision"
    if device_type == "cuda":
        override = env.get("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "").strip()
        if override and override.lower() not in ("0", "false", "off", "no"):
            return f"TORCH_ALLOW_TF32_CUBLAS_OVERRIDE={override} makes cuBLAS use TF32 for float32 products"
        nvidia = env.get("NVIDIA_TF32_OVERRIDE", "").strip()
        if nvidia and nvidia != "0":
            return f"NVIDIA_TF32_OVERRIDE={nvidia} (only 0 is defined) may let NVIDIA libraries use TF32"
    return None


def check_environment(device_type: str) -> None:
    """Raise ``RuntimeError`` (one line, naming the variable) if :func:`environment_problem`."""
    problem = environment_problem(device_type)
    if problem:
        raise RuntimeError(f"cannot certify: {problem}; unset it (README, 'What a certificate promises')")


# --------------------------------------------------------------------------- the managed settings
@dataclass(frozen=True)
class _Setting:
    name: str
    get: Callable[[], object]  # the value in effect
    set: Callable[[object], None]
    sound: object
    own: Callable[[], object]  # the value to restore (a leaf's own setting, not its parent's)


_C_GET = getattr(torch._C, "_get_fp32_precision_getter", None)
_C_SET = getattr(torch._C, "_set_fp32_precision_setter", None)


def _precision_leaf(backend: str, op: str, obj) -> _Setting:
    """A per-backend fp32 precision leaf (``torch.backends.<b>.<op>.fp32_precision``), read and
    set through torch's C functions where it has them (a section opens at every eval forward)."""
    if _C_GET is not None and _C_SET is not None:
        get = functools.partial(_C_GET, backend, op)
        set_ = functools.partial(_C_SET, backend, op)
    else:
        get, set_ = (lambda: obj.fp32_precision), (lambda v: setattr(obj, "fp32_precision", v))

    def own():
        value = get()
        if _C_GET is None or value == "none":
            return value
        try:
            inherited = _C_GET(backend, "all")
        except RuntimeError:
            return value
        return "none" if value == inherited else value

    return _Setting(f"{backend}.{op}.fp32_precision", get, set_, "ieee", own)


def _flag(name: str, c_name: str | None, obj, attr: str, sound) -> _Setting:
    """A backend flag, through torch's C getter / setter ``_get_<c_name>`` where present."""
    c_get = getattr(torch._C, f"_get_{c_name}", None) if c_name else None
    c_set = getattr(torch._C, f"_set_{c_name}", None) if c_name else None
    if c_get is not None and c_set is not None:
        return _Setting(name, c_get, c_set, sound, c_get)
    get = lambda: getattr(obj, attr)  # noqa: E731
    return _Setting(name, get, lambda v: setattr(obj, attr, v), sound, get)


_MANAGED: dict[bool, list[_Setting]] = {}


def _managed() -> list[_Setting]:
    """The settings a sound section sets, for this build and environment (built once per
    :func:`onednn_allowed` value)."""
    allowed = onednn_allowed()
    if allowed not in _MANAGED:
        b = torch.backends
        out = []
        leaves = [("cuda", "matmul", getattr(b.cuda, "matmul", None)), ("cuda", "conv", getattr(b.cudnn, "conv", None)),
                  ("cuda", "rnn", getattr(b.cudnn, "rnn", None)), ("mkldnn", "matmul", getattr(b.mkldnn, "matmul", None)),
                  ("mkldnn", "conv", getattr(b.mkldnn, "conv", None)), ("mkldnn", "rnn", getattr(b.mkldnn, "rnn", None))]
        leaves = [(be, op, obj) for be, op, obj in leaves if obj is not None and hasattr(obj, "fp32_precision")]
        if leaves:  # the per-backend API (never read the legacy flags then: they may raise)
            out += [_precision_leaf(be, op, obj) for be, op, obj in leaves]
        else:
            out += [_flag("cuda.matmul.allow_tf32", None, b.cuda.matmul, "allow_tf32", False),
                    _flag("cudnn.allow_tf32", None, b.cudnn, "allow_tf32", False),
                    _Setting("float32_matmul_precision", torch.get_float32_matmul_precision,
                             torch.set_float32_matmul_precision, "highest", torch.get_float32_matmul_precision)]
        out.append(_flag("cudnn.enabled", "cudnn_enabled", b.cudnn, "enabled", False))  # may pick Winograd / FFT
        if not allowed:
            out.append(_flag("mkldnn.enabled", "mkldnn_enabled", b.mkldnn, "enabled", False))
        if getattr(torch._C, "_get_nnpack_enabled", None) is not None:  # Winograd / FFT on the CPU
            out.append(_flag("nnpack.enabled", "nnpack_enabled", b.nnpack, "enabled", False))
        _MANAGED[allowed] = out
    return _MANAGED[allowed]


class _Section:
    """The process-wide state of the open sound sections (all fields guarded by ``lock``)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.depth = 0
        self.settings: list[_Setting] = []
        self.saved: dict[str, object] = {}
        self.epoch = 0  # bumped whenever a foreign change is found while sections are open

    def _absorb_foreign(self) -> bool:
        """Keep any managed setting changed from outside as the user's choice, re-set the sound
        value; True if there was one."""
        changed = [s for s in self.settings if s.get() != s.sound]
        for s in changed:
            self.saved[s.name] = s.own()
            s.set(s.sound)
        if changed:
            self.epoch += 1
        return bool(changed)

    def enter(self) -> int:
        with self.lock:
            if self.depth == 0:
                self.settings = _managed()
                self.saved = {s.name: s.own() for s in self.settings}
                try:
                    for s in self.settings:
                        s.set(s.sound)
                except Exception:
                    self._restore()
                    raise
            else:
                self._absorb_foreign()
            self.depth += 1
            return self.epoch

    def leave(self, epoch: int) -> bool:
        """Close one section; True if the settings changed under it."""
        with self.lock:
            self._absorb_foreign()
            tainted = self.epoch != epoch
            self.depth -= 1
            if self.depth == 0:
                self._restore()
            return tainted

    def _restore(self) -> None:
        for s in reversed(self.settings):
            s.set(self.saved[s.name])
        self.settings, self.saved = [], {}


_SECTION = _Section()


@contextlib.contextmanager
def sound_kernels():
    """Run the enclosed code on the kernels the error model assumes (see the module docstring):
    float32 inner products in IEEE float32 on every backend, cuDNN and NNPACK off, oneDNN only on
    x86-64 with strict fp-math. Safe under concurrent callers and nesting; the user's settings
    come back exactly once no section is open. Raises :class:`KernelSettingsChanged` at exit if a
    managed setting was changed from outside while this section was open.

    A ``GloroNet`` in eval mode runs its forward pass (and ``certify``) inside this context; wrap
    other code (e.g. ``net.body`` called alone) in it to get the same kernels.
    """
    epoch = _SECTION.enter()
    ok = False
    try:
        yield
        ok = True
    finally:
        tainted = _SECTION.leave(epoch)
    if ok and tainted:
        raise KernelSettingsChanged(
            "torch's kernel settings were changed while a sound forward pass ran (another thread?): "
            "its result is not the certified program; change them only while no sound pass runs"
        )


def no_autocast(device_type: str):
    """Autocast off for ``device_type`` (a no-op where torch has no autocast for it)."""
    available = getattr(torch.amp, "is_autocast_available", lambda t: t in ("cpu", "cuda"))
    return torch.autocast(device_type=device_type, enabled=False) if available(device_type) else contextlib.nullcontext()
