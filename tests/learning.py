"""A minimal optimisation loop for the model zoo's learning tests (the real trainer is
fer_core.training; these tests only prove each network *can* learn its task)."""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from fer_core.models import FERModel


def fit(
    model: FERModel,
    loss_fn: Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor]], torch.Tensor],
    batches: Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]],
    steps: int,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
) -> list[float]:
    """Adam for ``steps`` batches of (input, targets); returns the loss curve."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    losses = []
    for _, (x, targets) in zip(range(steps), batches):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model.forward_train(x), targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def epochs(x: torch.Tensor, targets: dict[str, torch.Tensor], batch_size: int, seed: int = 0):
    """Endless shuffled mini-batches over in-memory tensors."""
    g = torch.Generator().manual_seed(seed)
    n = len(x)
    while True:
        order = torch.randperm(n, generator=g)
        for i in range(0, n - batch_size + 1, batch_size):
            idx = order[i : i + batch_size]
            yield x[idx], {k: v[idx] for k, v in targets.items()}
