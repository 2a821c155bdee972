"""Building a model sets every tensor by name and nothing else (model/uninitialized.py)."""
import subprocess
import sys

import torch

from megatron_msg.config import ModelConfig
from megatron_msg.model import build_model


def test_building_models_imports_neither_dynamo_nor_triton():
    """torch's own init of a meta tensor would import both (~0.5 s, ~100 MB per process)."""
    code = ("import sys, torch\n"
            "from megatron_msg.config import ModelConfig\n"
            "from megatron_msg.model import build_model\n"
            "for arch in ('gpt', 'bert'):\n"
            "    cfg = ModelConfig(arch=arch, hidden=32, ffn=64, heads=2, head_dim=16, layers=2)\n"
            "    with torch.device('meta'):\n"
            "        build_model(cfg, initialize=False)\n"
            "    build_model(cfg, seed=0)\n"
            "print(sorted(m for m in ('torch._dynamo', 'triton') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_tensor_comes_from_the_named_init():
    """Two builds with one seed are equal, and torch's global RNG plays no part."""
    for arch in ("gpt", "bert"):
        cfg = ModelConfig(arch=arch, hidden=32, ffn=64, heads=2, head_dim=16, layers=2)
        torch.manual_seed(1)
        a = build_model(cfg, seed=7).state_dict()
        torch.manual_seed(2)
        b = build_model(cfg, seed=7).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
