"""Kernel control under concurrency, the environment and the build (issue 19, items 1–2).

Oracles: torch's own getters read before and after (the user's settings must come back exactly);
a probe layer inside the body that reads the settings in effect during every forward pass, with a
check written here (every precision leaf IEEE, cuDNN and NNPACK off) independent of
gloronet.kernels; oneDNN's own verbose log of the primitives it creates; float64 references.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import gloronet
from gloronet import fp, kernels
from gloronet.nn import Flatten, LipConv2d, LipLinear, MinMax, Sequential
from gloronet.nn import depthwise
from gloronet.nn.base import error_model_of, lipschitz_bound_of
from gloronet.nn.reshape import _Isometry

pytestmark = pytest.mark.usefixtures("single_thread")
B = torch.backends
_GET = getattr(torch._C, "_get_fp32_precision_getter", None)
_SET = getattr(torch._C, "_set_fp32_precision_setter", None)
_NODES = [("generic", "all"), ("cuda", "all"), ("mkldnn", "all"), ("cuda", "matmul"), ("cuda", "conv"),
          ("cuda", "rnn"), ("mkldnn", "matmul"), ("mkldnn", "conv"), ("mkldnn", "rnn")]
needs_precision_api = pytest.mark.skipif(_GET is None, reason="this torch has no per-backend fp32_precision API")


def _snapshot() -> dict:
    """Everything a user can read about the kernel settings."""
    out = {f"{be}.{op}": _GET(be, op) for be, op in _NODES} if _GET else {}
    out.update(cudnn=B.cudnn.enabled, mkldnn=B.mkldnn.enabled, nnpack=torch._C._get_nnpack_enabled())
    try:  # raises once the legacy and the per-backend APIs were both used
        out["matmul_precision"] = torch.get_float32_matmul_precision()
    except RuntimeError as e:
        out["matmul_precision"] = str(e)[:40]
    return out


def _sound_now() -> bool:
    """The settings the error model needs, read directly (not through gloronet.kernels)."""
    leaves = [B.cuda.matmul, B.cudnn.conv, B.cudnn.rnn, B.mkldnn.matmul, B.mkldnn.conv, B.mkldnn.rnn]
    return (all(leaf.fp32_precision == "ieee" for leaf in leaves) and not B.cudnn.enabled
            and not torch._C._get_nnpack_enabled())


@pytest.fixture
def user_settings():
    """Non-default user settings (a parent, explicit leaves, cuDNN on), put back exactly afterwards."""
    if _GET is None:
        pytest.skip("this torch has no per-backend fp32_precision API")
    raw = {}
    for be, op in _NODES:  # own values: a node reading like its parent inherits it
        parent = None if be == "generic" else ("generic", "all") if op == "all" else (be, "all")
        v = _GET(be, op)
        raw[(be, op)] = "none" if parent and v == _GET(*parent) else v
    cudnn, mkldnn = B.cudnn.enabled, B.mkldnn.enabled
    _SET("generic", "all", "bf16")
    B.mkldnn.conv.fp32_precision = "tf32"
    B.cuda.matmul.fp32_precision = "tf32"
    B.cudnn.enabled = True
    yield
    for be, op in _NODES:
        _SET(be, op, raw[(be, op)])
    B.cudnn.enabled, B.mkldnn.enabled = cudnn, mkldnn


class _Probe(_Isometry):
    """The identity, recording whether the sound settings were in effect when it ran (and
    optionally waiting for a gate, to interleave threads deterministically)."""

    derived_attributes = ("seen", "gate", "inside")  # instrumentation, never the map

    def __init__(self, seen: list, gate: threading.Event | None = None, inside: threading.Event | None = None):
        super().__init__()
        self.seen, self.gate, self.inside = seen, gate, inside

    def forward(self, x):
        self.seen.append(_sound_now())
        if self.inside is not None:
            self.inside.set()
            self.gate.wait(timeout=30)
            self.seen.append(_sound_now())
        return x


def _net(seen, gate=None, inside=None):
    torch.manual_seed(0)
    body = Sequential(_Probe(seen), LipConv2d(1, 4, 3, input_size=(6, 6)), MinMax(), _Probe(seen, gate, inside),
                      Flatten(), LipLinear(144, 8), MinMax())
    return gloronet.GloroNet(body, LipLinear(8, 3), 0.1).eval()


# --------------------------------------------------------------------------- concurrency
def _hammer(net, x, ref, errors, n=25):
    try:
        for k in range(n):
            assert torch.equal(net(x), ref)
            if k % 8 == 0:
                net.certify(x)
    except Exception as e:  # noqa: BLE001 - reported by the main thread
        errors.append(e)


@needs_precision_api
def test_eight_threads_leave_the_users_settings_exactly(user_settings):
    """8 threads × 25 eval forwards (and certify): every pass ran on the sound settings, and once
    all finished every getter reads exactly what the user had set (main leaked IEEE / cuDNN off)."""
    seen = []
    net = _net(seen)
    x = torch.rand(5, 1, 6, 6)
    ref = net(x)
    before = _snapshot()
    assert before["mkldnn.conv"] == "tf32" and before["cudnn"] is True and not _sound_now()
    errors = []
    threads = [threading.Thread(target=_hammer, args=(net, x, ref, errors)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert len(seen) >= 2 * 8 * 25 and all(seen)
    assert _snapshot() == before


@needs_precision_api
def test_a_thread_toggling_a_parent_setting_never_reaches_a_sound_pass(user_settings):
    """While 6 threads run eval forwards, another flips the generic fp32 precision (the parent
    the user sets with ``torch.backends.mkldnn.fp32_precision``) 300 times: every pass still ran
    on IEEE leaves, and the state afterwards is the user's — including the leaves that inherit
    the parent (restored as inheriting, so the parent's last value reaches them)."""
    seen = []
    net = _net(seen)
    x = torch.rand(5, 1, 6, 6)
    ref = net(x)
    before = _snapshot()
    errors, stop = [], threading.Event()

    def toggle():
        for k in range(300):
            B.mkldnn.fp32_precision = "ieee" if k % 2 == 0 else "bf16"
        stop.set()

    threads = [threading.Thread(target=_hammer, args=(net, x, ref, errors, 15)) for _ in range(6)]
    threads.append(threading.Thread(target=toggle))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert stop.is_set() and not errors, errors[:1]
    assert all(seen)
    assert _snapshot() == before  # toggled an even number of times: bf16 again
    B.mkldnn.fp32_precision = "ieee"  # the inheriting leaves follow the parent, as before any pass
    assert B.mkldnn.matmul.fp32_precision == "ieee" and B.mkldnn.conv.fp32_precision == "tf32"


@needs_precision_api
def test_a_leaf_changed_during_a_pass_is_reported_and_kept(user_settings):
    """Thread A's pass is held open; the main thread sets a managed leaf to bf16; thread B starts a
    pass (it re-sets IEEE and runs on it); A then finishes: A raises KernelSettingsChanged (its
    pass may have run on bf16), B returns; afterwards the user's new value is kept."""
    seen_a, seen_b = [], []
    gate, inside = threading.Event(), threading.Event()
    net_a, net_b = _net(seen_a, gate, inside), _net(seen_b)
    x = torch.rand(2, 1, 6, 6)
    ref_b = net_b(x)
    before = _snapshot()
    outcome = {}

    def run_a():
        try:
            net_a(x)
            outcome["a"] = "returned"
        except kernels.KernelSettingsChanged as e:
            outcome["a"] = e

    a = threading.Thread(target=run_a)
    a.start()
    assert inside.wait(timeout=30)
    B.mkldnn.matmul.fp32_precision = "bf16"  # from outside, while A's section is open
    assert torch.equal(net_b(x), ref_b) and all(seen_b)
    gate.set()
    a.join()
    assert isinstance(outcome["a"], kernels.KernelSettingsChanged), outcome
    after = _snapshot()
    assert after.pop("mkldnn.matmul") == "bf16"
    before.pop("mkldnn.matmul")
    assert after == before


@needs_precision_api
def test_nesting_and_exceptions_restore_once(user_settings):
    before = _snapshot()
    with pytest.raises(ValueError, match="inner"):
        with fp.sound_kernels():
            with kernels.sound_kernels():
                assert _sound_now()
            assert _sound_now()  # the outer section is still open
            raise ValueError("inner")
    assert _snapshot() == before


# --------------------------------------------------------------------------- environment
@pytest.mark.parametrize("env,relaxed", [
    ({}, None), ({"ONEDNN_DEFAULT_FPMATH_MODE": "STRICT"}, None), ({"ONEDNN_DEFAULT_FPMATH_MODE": ""}, None),
    ({"ONEDNN_DEFAULT_FPMATH_MODE": "BF16"}, "ONEDNN_DEFAULT_FPMATH_MODE=BF16"),
    ({"ONEDNN_DEFAULT_FPMATH_MODE": "tf32"}, "ONEDNN_DEFAULT_FPMATH_MODE=tf32"),
    ({"DNNL_DEFAULT_FPMATH_MODE": "any"}, "DNNL_DEFAULT_FPMATH_MODE=any"),
    ({"ONEDNN_DEFAULT_FPMATH_MODE": "strict", "DNNL_DEFAULT_FPMATH_MODE": "f16"}, "DNNL_DEFAULT_FPMATH_MODE=f16"),
])
def test_onednn_fpmath_decision(env, relaxed):
    assert kernels.onednn_fpmath_value(env) == relaxed


def test_relaxed_fpmath_routes_sound_passes_around_onednn(monkeypatch):
    """Once a relaxed fp-math value is seen (it is sticky: oneDNN reads it once), sound sections
    turn oneDNN off and put it back after; the certified pass still gives the same logits."""
    seen = []
    net = _net(seen)
    x = torch.rand(3, 1, 6, 6)
    ref = net(x)
    assert B.mkldnn.enabled and kernels.onednn_allowed() == (kernels.machine() in ("x86_64", "amd64"))
    monkeypatch.setattr(kernels, "_relaxed_fpmath", [])
    monkeypatch.setenv("ONEDNN_DEFAULT_FPMATH_MODE", "bf16")
    with kernels.sound_kernels():
        assert not B.mkldnn.enabled
    monkeypatch.delenv("ONEDNN_DEFAULT_FPMATH_MODE")
    with kernels.sound_kernels():
        assert not B.mkldnn.enabled  # still: oneDNN may have read it already
    assert B.mkldnn.enabled
    torch.testing.assert_close(net(x), ref, rtol=1e-5, atol=1e-6)


_VERBOSE_SCRIPT = textwrap.dedent("""
    import sys, torch, torch.nn.functional as F
    import gloronet
    from gloronet.nn import Flatten, LipConv2d, LipLinear, MinMax, Sequential
    torch.manual_seed(0)
    net = gloronet.GloroNet(Sequential(LipConv2d(3, 16, 3, input_size=(8, 8)), MinMax(), Flatten(),
                                       LipLinear(1024, 16)), LipLinear(16, 4), 0.1).eval()
    x = torch.rand(4, 3, 8, 8)
    net.lipschitz_bound()
    print("@@ sound", flush=True)
    net(x); net.certify(x)
    print("@@ plain", flush=True)
    F.conv2d(x, torch.randn(8, 3, 3, 3))
    print("@@ end", flush=True)
""")


@pytest.mark.skipif(kernels.machine() not in ("x86_64", "amd64") or not B.mkldnn.is_available(),
                    reason="oneDNN on x86-64 only")
def test_onednn_never_runs_in_bf16_fpmath_for_a_sound_pass(tmp_path):
    """A fresh process with ONEDNN_DEFAULT_FPMATH_MODE=BF16 and oneDNN's verbose log: the sound
    forward and certify create no oneDNN primitive at all, while a plain conv in the same process
    does, with ``fpmath:bf16`` (so the log would show one in the sound part)."""
    script = tmp_path / "probe.py"
    script.write_text(_VERBOSE_SCRIPT)
    env = dict(os.environ, ONEDNN_DEFAULT_FPMATH_MODE="BF16", ONEDNN_VERBOSE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(Path(gloronet.__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    log = out.stdout
    sound = log[log.index("@@ sound"):log.index("@@ plain")]
    plain = log[log.index("@@ plain"):log.index("@@ end")]
    assert "primitive,exec" not in sound
    assert any("convolution" in line and "fpmath:bf16" in line for line in plain.splitlines())


def test_environment_refusals_name_the_variable(monkeypatch):
    assert kernels.environment_problem("cpu", {}) is None
    assert kernels.environment_problem("cpu", {"MKL_BLAS_COMPUTE_MODE": "standard"}) is None
    assert "MKL_BLAS_COMPUTE_MODE=FLOAT_TO_BF16" in kernels.environment_problem("cpu", {"MKL_BLAS_COMPUTE_MODE": "FLOAT_TO_BF16"})
    cuda = {"TORCH_ALLOW_TF32_CUBLAS_OVERRIDE": "1"}
    assert kernels.environment_problem("cpu", cuda) is None  # a CUDA variable, a CPU model
    assert "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1" in kernels.environment_problem("cuda", cuda)
    assert kernels.environment_problem("cuda", {"TORCH_ALLOW_TF32_CUBLAS_OVERRIDE": "0"}) is None
    assert kernels.environment_problem("cuda", {"NVIDIA_TF32_OVERRIDE": "0"}) is None
    assert "NVIDIA_TF32_OVERRIDE=1" in kernels.environment_problem("cuda", {"NVIDIA_TF32_OVERRIDE": "1"})
    net = _net([])
    x = torch.rand(2, 1, 6, 6)
    net.certify(x)
    monkeypatch.setenv("MKL_BLAS_COMPUTE_MODE", "FLOAT_TO_BF16")
    for call in (lambda: net.certify(x), net.lipschitz_bound, net.lipschitz_constant):
        with pytest.raises(RuntimeError, match="MKL_BLAS_COMPUTE_MODE=FLOAT_TO_BF16") as info:
            call()
        assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- build: depthwise Winograd
@pytest.mark.parametrize("arch,expected", [("x86_64", False), ("AMD64", False), ("aarch64", True), ("arm64", True),
                                           ("armv7l", True), ("riscv64", True)])
def test_winograd_depthwise_build_decision(arch, expected):
    assert kernels.winograd_depthwise_build(arch) is expected


def test_winograd_shapes_are_the_ones_pytorch_sends_there():
    assert depthwise.winograd_shape(4, (8, 1, 3, 3), 1, 4)
    assert depthwise.winograd_shape(1, (16, 1, 3, 3), 1, 1)  # one input channel: MNIST's first layer
    assert not depthwise.winograd_shape(4, (8, 1, 3, 3), 2, 4)
    assert not depthwise.winograd_shape(4, (8, 2, 3, 3), 1, 2)
    assert not depthwise.winograd_shape(4, (8, 1, 5, 5), 1, 4)


@pytest.mark.parametrize("c_in,c_out,groups,pad", [(4, 8, 4, "same"), (1, 6, 1, "same"), (3, 3, 3, 1), (2, 4, 2, "valid")])
def test_faked_arm_build_sums_depthwise_taps_within_the_error_model(monkeypatch, c_in, c_out, groups, pad):
    """On a faked ARM build the eval forward of a depthwise 3×3 stride-1 layer never calls
    F.conv2d (the Winograd path), computes the same map, and its float32 error stays within the
    layer's error model (float64 reference from the same weights); on x86 it does call it."""
    torch.manual_seed(1)
    layer = LipConv2d(c_in, c_out, 3, padding=pad, groups=groups, input_size=(9, 9)).eval()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape))
        layer.bias.copy_(10 * torch.randn(c_out))
    calls = []
    real = F.conv2d
    monkeypatch.setattr(F, "conv2d", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.cat([torch.randn(3, c_in, 9, 9), 1e3 * torch.randn(3, c_in, 9, 9)])
    with torch.no_grad():
        layer(x)
        assert calls or kernels.winograd_depthwise_build()
        calls.clear()
        monkeypatch.setattr(kernels, "machine", lambda: "aarch64")
        y = layer(x)
    assert not calls
    pads = layer.pads((9, 9))
    with torch.no_grad():
        ref = F.conv2d(F.pad(x.double(), pads), layer.weight.double(), layer.bias.double(), groups=groups)
        lip = lipschitz_bound_of(layer)
    model = error_model_of(layer, (c_in, 9, 9), torch.float32, lip)
    err = (y.double() - ref).flatten(1).norm(dim=1)
    assert (err <= model.rel * x.double().flatten(1).norm(dim=1) + model.abs).all()
    assert float(err.max()) > 0  # rounding happened: the comparison is not vacuous


def test_faked_arm_build_certifies_a_depthwise_net(monkeypatch):
    monkeypatch.setattr(kernels, "machine", lambda: "aarch64")
    torch.manual_seed(2)
    body = Sequential(LipConv2d(1, 4, 3, input_size=(6, 6)), MinMax(), LipConv2d(4, 4, 3, groups=4, input_size=(6, 6)),
                      Flatten(), LipLinear(144, 6))
    net = gloronet.GloroNet(body, LipLinear(6, 3), 0.05).eval()
    x = torch.rand(4, 1, 6, 6)
    cert = net.certify(x)
    assert torch.isfinite(cert.radius).all() and bool((cert.radius > 0).any())
    assert not math.isnan(float(cert.radius.sum()))
