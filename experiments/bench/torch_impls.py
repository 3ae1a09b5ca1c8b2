"""torch baselines: ``F.embedding_bag`` (dense and ``sparse=True``), Adam and SparseAdam steps."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from experiments.bench.problems import Problem


#: ``config.torch_device`` values: ``auto`` runs torch where JAX runs (``cuda`` when JAX's backend
#: is ``gpu`` and this torch build sees a CUDA device, else ``cpu``)
DEVICES = ("auto", "cpu", "cuda")


def resolve_device(requested: str, jax_backend: str) -> str:
    """The torch device the baselines run on: ``"cpu"`` or ``"cuda"``.

    Raises:
      ValueError: ``requested`` is not one of :data:`DEVICES`, or is ``"cuda"`` while this torch
        build sees no CUDA device.
    """
    if requested not in DEVICES:
        raise ValueError(f"config.torch_device must be one of {DEVICES}; got {requested!r}. For "
                         "example --config.torch_device=auto (torch runs where JAX runs).")
    if requested == "auto":
        return "cuda" if jax_backend == "gpu" and torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"config.torch_device='cuda', but torch {torch.__version__} sees no CUDA "
                         "device (a CPU build, or no GPU). Use --config.torch_device=cpu.")
    return requested


def synchronize(device: str) -> None:
    """Waits for the work queued on ``device`` (a no-op on the CPU, where torch runs synchronously)."""
    if device != "cpu":
        torch.cuda.synchronize(device)


class TorchInputs:
    """The problem's arrays as torch tensors on ``device`` (int64 ids/offsets, as torch prefers)."""

    def __init__(self, p: Problem, device: str = "cpu"):
        def put(x: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(x).to(device)

        self.weight = put(p.weight)
        self.ids = put(p.ids.astype(np.int64))
        self.offsets = put(p.offsets.astype(np.int64))
        self.cotangent = put(p.cotangent)
        self.targets = put(p.targets)
        synchronize(device)


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
