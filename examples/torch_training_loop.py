"""A plain PyTorch training loop with kldiv's loss, checked against ``torch.nn.functional.kl_div``.

A tiny softmax model learns target distributions with SGD. The same model is trained twice
from the same start: once with ``kldiv.KLDivergence()`` and once with PyTorch's own
``F.kl_div`` on log-probabilities of the same clipped data (kldiv clips both inputs to
``[1e-7, 1]``, as Keras does). The losses and parameters of the two runs agree step for step.

Run it::

    python examples/torch_training_loop.py            # CPU, and CUDA where a GPU is
    python examples/torch_training_loop.py --compile  # the loss step under torch.compile
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F

import kldiv

EPS = kldiv.EPSILON


def reference_loss(y_true: torch.Tensor, y_pred: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Keras' KL divergence with PyTorch's own ``F.kl_div`` (per-sample sum, weighted mean)."""
    t = y_true.clamp(EPS, 1.0)
    p = y_pred.clamp(EPS, 1.0)
    per_sample = F.kl_div(p.log(), t, reduction="none").sum(-1)  # t * (log t - log p)
    return (per_sample * weight).sum() / per_sample.numel()


def make_data(n: int, features: int, classes: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, features, generator=g)
    y = torch.softmax(3 * torch.randn(n, classes, generator=g), dim=-1)
    y[: n // 4] = F.one_hot(y[: n // 4].argmax(-1), classes).float()  # some exact 0s and 1s
    w = torch.rand(n, generator=g)
    return x.to(device), y.to(device), w.to(device)


def train(device: str = "cpu", steps: int = 30, compile: bool = False) -> dict[str, list[float]]:
    """Train the same model with kldiv and with ``F.kl_div``; return both loss curves."""
    dev = torch.device(device)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    model = model.to(dev)
    twin = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.5)
    x, y, w = make_data(64, 8, 4, dev)
    loss_fn = kldiv.KLDivergence()

    def loss_step(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return loss_fn(y, torch.softmax(model(x), dim=-1), sample_weight=w)

    if compile:
        loss_step = torch.compile(loss_step, fullgraph=True)  # no graph breaks in kldiv

    history: dict[str, list[float]] = {"kldiv": [], "torch": []}
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_step(x, y, w)
        loss.backward()
        opt.step()

        twin_opt.zero_grad()
        ref = reference_loss(y, torch.softmax(twin(x), dim=-1), w)
        ref.backward()
        twin_opt.step()

        history["kldiv"].append(loss.item())
        history["torch"].append(ref.item())
    history["max_param_diff"] = [
        max((a - b).abs().max().item() for a, b in zip(model.parameters(), twin.parameters(), strict=True))
    ]
    return history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--compile", action="store_true", help="torch.compile the loss step")
    args = parser.parse_args()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        h = train(device, args.steps, args.compile)
        print(f"{device}: loss {h['kldiv'][0]:.6f} -> {h['kldiv'][-1]:.6f} "
              f"(F.kl_div: {h['torch'][0]:.6f} -> {h['torch'][-1]:.6f}); "
              f"largest parameter difference {h['max_param_diff'][0]:.2e}")
        torch.testing.assert_close(h["kldiv"], h["torch"], rtol=1e-4, atol=1e-6)
        assert h["kldiv"][-1] < h["kldiv"][0], "the loss did not go down"


if __name__ == "__main__":
    main()
