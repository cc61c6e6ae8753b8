"""Issue 20: ``gloronet export`` of the AOL / SLL / BRO nets and of BRONet, in onnxruntime.

Per family net: the ONNX model's logits equal ``net.eval()(x)`` to float tolerance and its
certificates are ``net.certify(x, arithmetic="exact")``'s except at ties, with every float-sound
certificate kept (:func:`test_export._check_certificates`). The derived weights run as constants:
a BRO convolution's ONNX graph holds its applied (materialised, rounded) circular kernel bit for
bit and no FFT (the weights ``K`` bounds, not the runtime's re-derivation of them).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from gloronet.export import export_model
from gloronet.nn import BROConv2d
from test_aol_sll import _family_net
from test_bro_conv import _bro_net
from test_bronet import _tiny
from test_export import _check_certificates

pytestmark = pytest.mark.usefixtures("single_thread")
NETS = {  # all on 2×6×6 inputs, 3 classes
    "aol-sll-bro-dense": lambda: _family_net(3),
    "bro-conv": lambda: _bro_net(3),
    "bronet": lambda: _tiny((2, 6, 6), "bro", seed=3),
}


@pytest.mark.parametrize("name", NETS)
def test_onnx_export_of_a_family_net(name, tmp_path):
    pytest.importorskip("onnxscript")
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    net = NETS[name]()
    if net.config is None:  # built by hand: export reads the input shape from the config
        net.config = {"in_shape": [2, 6, 6]}
    x = torch.randn(64, 2, 6, 6, generator=torch.Generator().manual_seed(4))
    net.epsilon = float(net.certify(x, arithmetic="exact").radius.median())  # a real mix of certified and not
    path, _ = export_model(net, tmp_path / "m.onnx", "onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, bottom = (torch.from_numpy(a) for a in session.run(None, {"x": x.numpy()}))
    with torch.no_grad():
        torch.testing.assert_close(logits, net(x), rtol=0, atol=1e-5)
    ours = _check_certificates(net, x, logits, bottom)
    assert 0 < int(ours.sum()) < len(x)

    model = onnx.load(str(path))
    assert not {n.op_type for n in model.graph.node} & {"DFT", "STFT"}
    constants = [onnx.numpy_helper.to_array(t) for t in model.graph.initializer]
    for layer in (m for m in net.modules() if isinstance(m, BROConv2d)):
        assert _holds(constants, layer.applied_kernel().numpy())


def _holds(constants: list, kernel: np.ndarray) -> bool:
    """``kernel`` is in the graph bit for bit: one constant, or consecutive constants that are its
    input-channel chunks (the chunks :func:`gloronet.nn.accumulate.conv2d` sums)."""
    parts = [c for c in constants if c.ndim == 4 and c.shape[0] == kernel.shape[0] and c.shape[2:] == kernel.shape[2:]]
    return any(np.array_equal(np.concatenate(parts[i:j], axis=1), kernel)
               for i in range(len(parts)) for j in range(i + 1, len(parts) + 1))
