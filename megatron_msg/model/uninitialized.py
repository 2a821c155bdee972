"""torch's Linear and Embedding without their own initialisation.

Models are built on the meta device and every tensor is then set by name (model/init.py, or
a checkpoint load), so the values torch's ``reset_parameters`` draws are never used.  Drawing
them is not free either: a random fill of a meta tensor runs through torch's Python
reference kernels, which import ``torch._dynamo`` and Triton (about 0.5 s and 100 MB in every
process that builds a model, e.g. msg-reshard computing a layout's ZeRO fragments).
"""
from __future__ import annotations

from torch import nn


class Linear(nn.Linear):
    def reset_parameters(self) -> None:
        pass  # set by model/init.py or a load


class Embedding(nn.Embedding):
    def reset_parameters(self) -> None:
        pass  # set by model/init.py or a load (no padding_idx is used)
