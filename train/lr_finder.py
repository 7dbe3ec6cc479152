"""Leslie Smith's learning-rate range test, as fastai's ``lr_find``.

Train for ``num_it`` steps while the rate grows exponentially from ``start_lr`` to ``end_lr``,
record the smoothed loss, stop once it diverges, and suggest a rate: fastai's "valley" (default)
and "steep" (steepest descent). The model and optimiser are restored afterwards.
:func:`run` feeds it a training loader's batches, the loss averaged over a DDP job's ranks.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from ich.models import unwrap
from train.data import BatchLoader
from train.distributed import sum_across, world_size

__all__ = ["LRFindResult", "lr_find", "valley", "steep", "restored", "run", "plot"]


@dataclass
class LRFindResult:
    lrs: list[float]
    losses: list[float]  # exponentially smoothed, debiased
    valley: float
    steep: float

    @property
    def suggestion(self) -> float:
        return self.valley


def _trimmed(lrs: list[float], losses: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Drop the first tenth (noise at tiny rates) and last five points (divergence), as fastai."""
    skip = len(lrs) // 10
    end = max(skip + 2, len(lrs) - 5)
    return np.asarray(lrs[skip:end]), np.asarray(losses[skip:end])


def valley(lrs: list[float], losses: list[float]) -> float:
    """fastai's ``valley``: a rate well inside the longest stretch of falling loss.

    Finds the longest decreasing subsequence of the loss curve and returns the rate at
    start + 1/3 + 1/6 of its length, which is robust to a noisy curve.
    """
    lr, loss = _trimmed(lrs, losses)
    n = len(loss)
    lds = [1] * n
    max_start = max_end = 0
    for i in range(1, n):
        for j in range(i):
            if loss[i] < loss[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end = i
                max_start = max_end - lds[max_end]
    sections = (max_end - max_start) / 3
    return float(lr[max_start + int(sections) + int(sections / 2)])


def steep(lrs: list[float], losses: list[float]) -> float:
    """The rate where the loss falls fastest per log-rate step."""
    lr, loss = _trimmed(lrs, losses)
    grads = np.diff(loss) / np.diff(np.log(lr))
    return float(lr[int(np.argmin(grads))])


def lr_find(
    step: Callable[[float], float],
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_it: int = 100,
    stop_div: bool = True,
    beta: float = 0.98,
) -> LRFindResult:
    """Run the range test; ``step(lr)`` must set the rate, train one batch and return its loss."""
    if num_it < 10:
        raise ValueError(f"num_it must be at least 10, got {num_it}")
    lrs: list[float] = []
    losses: list[float] = []
    avg, best = 0.0, math.inf
    for i in range(num_it):
        lr = start_lr * (end_lr / start_lr) ** (i / (num_it - 1))
        loss = step(lr)
        if not math.isfinite(loss):
            break
        avg = beta * avg + (1 - beta) * loss
        smooth = avg / (1 - beta ** (i + 1))
        lrs.append(lr)
        losses.append(smooth)
        best = min(best, smooth)
        if stop_div and smooth > 4 * best:
            break
    if len(lrs) < 10:
        raise RuntimeError(f"the loss diverged after {len(lrs)} steps: lower start_lr (now {start_lr:g})")
    return LRFindResult(lrs, losses, valley(lrs, losses), steep(lrs, losses))


@contextmanager
def restored(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Put the model's and optimiser's state back afterwards (the range test is only a probe)."""
    model_state = copy.deepcopy(model.state_dict())
    optim_state = copy.deepcopy(optimizer.state_dict())
    try:
        yield
    finally:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)


def run(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: BatchLoader,
    train_batch: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    num_it: int,
) -> LRFindResult:
    """The range test on ``loader``'s batches; ``train_batch(images, target)`` takes one step, returning its loss."""
    stream = loader.forever(first_epoch=10_000)  # its own shuffles, leaving the training epochs' as they are

    def step(lr: float) -> float:
        for group in optimizer.param_groups:
            group["lr"] = lr
        images, target, _ = next(stream)
        return sum_across(train_batch(images, target))[0].item() / world_size()

    model.train()
    with restored(unwrap(model), optimizer):
        return lr_find(step, num_it=num_it)


def plot(result: LRFindResult, path: str | os.PathLike, title: str = "Learning-rate range test") -> None:
    """Write the loss-vs-rate curve with both suggestions as a standalone plotly HTML file."""
    import plotly.graph_objects as go

    fig = go.Figure(go.Scatter(x=result.lrs, y=result.losses, mode="lines", name="smoothed loss"))
    for name, lr, colour in (("valley", result.valley, "green"), ("steep", result.steep, "red")):
        loss = result.losses[result.lrs.index(lr)]
        fig.add_trace(
            go.Scatter(x=[lr], y=[loss], mode="markers", name=f"{name} {lr:.2e}", marker=dict(size=12, color=colour))
        )
    fig.update_layout(title=title, xaxis=dict(type="log", title="learning rate"), yaxis_title="loss")
    fig.write_html(path, include_plotlyjs=True)
