"""Multi-process training: `torchrun --nproc_per_node=2 -m gloronet train` (gloo on CPU) gives
the same model as one process at the same global batch.

Rank r takes batch slots r, r+2, … of each global batch (strided shards of one permutation), and
DDP averages the ranks' gradients, so every optimizer step sees the single-process gradient up to
summation order.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from gloronet import checkpoint
from gloronet.config import build_config
from gloronet.train import train

from test_train import data_dir, small  # noqa: F401  (fixture and config helper)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_two_gloo_processes_match_one(tmp_path, data_dir):  # noqa: F811
    cfg = small(data_dir, epochs=1, train_limit=256, test_limit=64, batch_size=64)
    train(build_config(None, cfg), tmp_path / "one", progress=False)

    overrides = [f"--{k}={v}" for k, v in cfg.items() if not isinstance(v, dict)]
    overrides.append("--train_epsilon={kind: linear, start_factor: 0.1, end_factor: 1.0, ramp_fraction: 0.5}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [
        str(__import__("pathlib").Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           f"--master_addr=127.0.0.1", f"--master_port={_free_port()}",
           "-m", "gloronet", "train", "--out", str(tmp_path / "two"), "-q", *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    one, two = checkpoint.load_model(tmp_path / "one"), checkpoint.load_model(tmp_path / "two")
    # Adam divides by sqrt(v): a gradient that is ~0 on one side of a summation-order difference
    # can move a single weight by up to lr; a wrong sharding moves most weights by ~lr (2e-3).
    for (k, a), b in zip(one.state_dict().items(), two.state_dict().values()):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-3, atol=2e-4, msg=k)
            assert (a - b).abs().mean() < 1e-6, k



    torch.manual_seed(0)  # the seed train() used before building the model
    init = checkpoint.load_model(tmp_path / "one").state_dict()
    fresh = __import__("gloronet").models.create("2c2f", (1, 28, 28), 10, 0.3).state_dict()
    moved = max((init[k] - fresh[k]).abs().max().item() for k in fresh if fresh[k].is_floating_point() and "weight" in k)
    assert moved > 1e-3, "training did not move the weights: the comparison would be vacuous"
