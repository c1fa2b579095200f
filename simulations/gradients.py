"""Real gradients of the digits model, as a DME input ("digits-grad").

The vector is the concatenation of the minibatch gradients (batch 32) of a small MLP on
scikit-learn's bundled digits (the training split of the ``digits-mlp`` FL task,
:func:`fedquant.simulations.digits_mlp.load_digits_data`), taken along a short SGD run,
truncated to length d: every
coordinate is a real gradient entry, with the heavy-tailed, structured layout real updates
have (many near-zero weights of always-dark pixels, large output-layer entries).
"""

from __future__ import annotations

import torch
from torch import nn

from fedquant.simulations.common import one_thread
from fedquant.simulations.digits_mlp import load_digits_data, make_mlp


def digits_gradient(d: int, seed: int, batch: int = 32, lr: float = 0.1) -> torch.Tensor:
    """A float32 vector of d real gradient entries, reproducible from seed."""
    if d < 1:
        raise ValueError(f"d must be positive, got {d}")
    data = load_digits_data(seed=seed % 2**32)
    model = make_mlp(hidden=(64,), seed=seed % 2**32)
    g = torch.Generator().manual_seed(seed % 2**63)
    parts, have = [], 0
    with one_thread():
        while have < d:
            idx = torch.randint(len(data.y_train), (batch,), generator=g)
            model.zero_grad()
            nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx]).backward()
            grads = [p.grad.detach().reshape(-1).clone() for p in model.parameters()]
            with torch.no_grad():  # one SGD step, so later gradients come from a trained-ish model
                for p, gr in zip(model.parameters(), grads, strict=True):
                    p -= lr * gr.view_as(p)
            flat = torch.cat(grads)
            parts.append(flat)
            have += flat.numel()
    return torch.cat(parts)[:d].to(torch.float32)
