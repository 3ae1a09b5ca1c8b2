"""torch baselines: ``F.embedding_bag`` (dense and ``sparse=True``), Adam and SparseAdam steps."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from experiments.bench.problems import Problem


class TorchInputs:
    """The problem's arrays as torch tensors (int64 ids/offsets, as torch prefers)."""

    def __init__(self, p: Problem):
        self.weight = torch.from_numpy(p.weight)
        self.ids = torch.from_numpy(p.ids.astype(np.int64))
        self.offsets = torch.from_numpy(p.offsets.astype(np.int64))
        self.cotangent = torch.from_numpy(p.cotangent)
        self.targets = torch.from_numpy(p.targets)


def forward(t: TorchInputs, mode: str) -> Callable[[], Any]:
    def f():
        with torch.no_grad():
            return F.embedding_bag(t.ids, t.weight, t.offsets, mode=mode)

    return f


def fwd_bwd(t: TorchInputs, mode: str, sparse: bool) -> Callable[[], Any]:
    """Forward + ``backward(cotangent)``; returns the (dense or sparse COO) weight gradient."""
    w = t.weight.clone().requires_grad_(True)

    def f():
        w.grad = None
        out = F.embedding_bag(t.ids, w, t.offsets, mode=mode, sparse=sparse)
        out.backward(t.cotangent)
        return w.grad

    return f


#: torch's dense Adam implementations (its default on CPU is the per-tensor loop)
ADAM_VARIANTS = ("default", "foreach", "fused")


def train_step(
    t: TorchInputs, mode: str, sparse: bool, lr: float, variant: str = "default"
) -> tuple[Callable[[], Any], Any]:
    """One step of ``mean((embedding_bag - targets)**2)`` with Adam (dense; ``variant`` one of
    :data:`ADAM_VARIANTS`) or SparseAdam."""
    w = torch.nn.Parameter(t.weight.clone())
    if sparse:
        opt = torch.optim.SparseAdam([w], lr=lr)
    else:
        kw: dict[str, Any] = {"default": {}, "foreach": {"foreach": True},
                              "fused": {"fused": True}}[variant]
        opt = torch.optim.Adam([w], lr=lr, **kw)

    def f():
        opt.zero_grad(set_to_none=True)
        out = F.embedding_bag(t.ids, w, t.offsets, mode=mode, sparse=sparse)
        loss = torch.mean((out - t.targets) ** 2)
        loss.backward()
        opt.step()
        return loss

    return f, (w, opt)
