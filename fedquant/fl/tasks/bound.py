"""A task module bound to its options: how the runners call ``Net``, ``load_data``, ``train``
and ``test``.

The options are the run's config (``fedquant fl``'s TOML keys and ``task_args`` table, or a
Flower run config; a ``-`` in a key reads as ``_``). A task function receives, besides its
leading arguments, every keyword parameter it names that the options set: ``train(net,
trainloader, epochs, device, lr=0.01)`` gets the config's ``lr``; ``Net(hidden=64)`` gets
``hidden``. ``train`` may also name ``seed`` (the client's seed for the round, from the FL
protocol) and ``Net`` is built under ``torch.manual_seed(seed)`` without touching the
caller's RNG state, so every client and the server start from the same model.

Example::

    task = BoundTask("digits-mlp", {"hidden": 64, "lr": 0.1})
    net = task.net(seed=0)
    trainloader, testloader = task.load_data(partition_id=0, num_partitions=10)
    loss = task.train(net, trainloader, epochs=1, device="cpu", seed=7)
    print(task.test(net, testloader, "cpu"))
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn

from fedquant.fl import task as fl_task
from fedquant.fl.tasks.loader import load_task_module

_MISSING = object()


def get_state(net: nn.Module) -> dict[str, np.ndarray]:
    """The model's ``state_dict`` as CPU numpy arrays (copies)."""
    return {k: v.detach().to("cpu").numpy().copy() for k, v in net.state_dict().items()}


def set_state(net: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Load numpy `arrays` (a full ``state_dict``) into `net`, on the net's own devices."""
    net.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in arrays.items()})


def loader_inputs(loader: Any) -> torch.Tensor:
    """All inputs of a DataLoader of (x, y) batches (or of dict batches), stacked."""
    dataset = getattr(loader, "dataset", None)
    if isinstance(dataset, torch.utils.data.TensorDataset):
        return dataset.tensors[0]
    parts = []
    for batch in loader:
        if isinstance(batch, list | tuple):
            parts.append(torch.as_tensor(batch[0]))
        elif isinstance(batch, Mapping):
            x = next((v for k, v in batch.items() if k not in ("label", "labels", "y")), None)
            if x is None:
                raise ValueError("the trainloader's dict batches have no input column")
            parts.append(torch.as_tensor(x))
        else:
            raise ValueError(f"the trainloader yields {type(batch).__name__} batches; "
                             "expected (x, y) tuples or dicts")
    if not parts:
        raise ValueError("the trainloader is empty")
    return torch.cat(parts)


class BoundTask:
    """A task module (or its spec, :func:`load_task_module`) with the run's options."""

    def __init__(self, task: str | ModuleType, options: Mapping[str, Any] | None = None):
        self.module = load_task_module(task) if isinstance(task, str) else task
        self.spec = task if isinstance(task, str) else task.__name__
        self.options = {str(k).replace("-", "_"): v for k, v in (options or {}).items()}

    def _call(self, name: str, lead: tuple, named: Mapping[str, Any],
              fallback: tuple[str, ...] = ()) -> Any:
        """module.name(*lead, ...) with the keyword parameters it names filled from `named`
        and the options; a required parameter with another name takes the next unused
        value of `fallback` (``train(net, loader, num_epochs, dev)`` still works)."""
        fn = getattr(self.module, name)
        try:
            params = [p for p in inspect.signature(fn).parameters.values()
                      if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        except (TypeError, ValueError):  # no signature (a builtin): positional only
            return fn(*lead, *(named[k] for k in fallback))
        args, kwargs = list(lead), {}
        used = {p.name for p in params[len(lead):] if p.name in named}
        spare = [k for k in fallback if k not in used]
        for p in params[len(lead):]:
            value = named.get(p.name, self.options.get(p.name, _MISSING))
            if value is _MISSING and p.default is p.empty:
                if not spare:
                    raise ValueError(f"task {self.spec!r}: {name}() needs the parameter "
                                     f"{p.name!r}, which the config does not set")
                value = named[spare.pop(0)]
            if value is _MISSING:
                continue
            if p.kind == p.POSITIONAL_ONLY:
                args.append(value)
            else:
                kwargs[p.name] = value
        return fn(*args, **kwargs)

    def net(self, seed: int = 0) -> nn.Module:
        """A fresh ``Net``, initialized under ``torch.manual_seed(seed)``."""
        net = fl_task.seeded(lambda: self._call("Net", (), {"seed": seed}), seed)
        if not isinstance(net, nn.Module):
            raise ValueError(f"task {self.spec!r}: Net() returned {type(net).__name__}, "
                             "expected a torch.nn.Module")
        return net

    def load_data(self, partition_id: int, num_partitions: int) -> tuple[Any, Any]:
        """(trainloader, testloader) of one partition; ValueError for an empty one."""
        out = self._call("load_data", (partition_id, num_partitions),
                         {"num_partitions": num_partitions})
        if not (isinstance(out, tuple | list) and len(out) == 2):
            raise ValueError(f"task {self.spec!r}: load_data() returned {type(out).__name__}; "
                             "expected (trainloader, testloader)")
        if num_examples(out[0]) < 1:
            raise ValueError(f"task {self.spec!r}: partition {partition_id} of "
                             f"{num_partitions} is empty")
        return out[0], out[1]

    def train(self, net: nn.Module, trainloader: Any, epochs: int, device: str | torch.device,
              seed: int = 0) -> float:
        """Local training; returns the average training loss (finite)."""
        loss = float(self._call("train", (net, trainloader),
                                {"epochs": epochs, "device": device, "seed": seed},
                                ("epochs", "device")))
        if not math.isfinite(loss):
            raise ValueError(f"task {self.spec!r}: training loss is {loss} (diverged? lower "
                             "the learning rate)")
        return loss

    def test(self, net: nn.Module, testloader: Any, device: str | torch.device,
             ) -> tuple[float, float]:
        """(loss, accuracy) of `net` on `testloader`."""
        out = self._call("test", (net, testloader), {"device": device}, ("device",))
        if not (isinstance(out, tuple | list) and len(out) == 2):
            raise ValueError(f"task {self.spec!r}: test() returned {out!r}; expected "
                             "(loss, accuracy)")
        return float(out[0]), float(out[1])

    def central_testloader(self, num_partitions: int) -> Any:
        """The server's test split: ``load_centralized_dataset()`` where the module defines
        it, else the testloader of partition 0."""
        if callable(getattr(self.module, "load_centralized_dataset", None)):
            return self._call("load_centralized_dataset", (),
                              {"num_partitions": num_partitions})
        return self.load_data(0, num_partitions)[1]

    def calibration_x(self, calib_size: int, seed: int) -> torch.Tensor:
        """`calib_size` training inputs for final-model PTQ: a seeded random subset of the
        trainloader of ``load_data(0, 1)`` (the whole training pool of a partitioned dataset;
        never a test split)."""
        x = loader_inputs(self.load_data(0, 1)[0])
        rows = fl_task.calibration_rows(len(x), calib_size, seed)
        return x[torch.as_tensor(rows)].reshape(len(rows), -1).to(torch.float32)

    def quantize_final(self, net: nn.Module, testloader: Any, device: str | torch.device,
                       bits: int, method: str = "spfq", calib_size: int = 256,
                       seed: int = 0) -> dict:
        """Post-training quantization of the final global model `net` (nn.Linear layers;
        :func:`fedquant.fl.task.quantize_net`), measured with the task's ``test``."""
        fl_task.check_ptq(bits, method, calib_size)
        calib_x = self.calibration_x(calib_size, seed)
        return fl_task.quantize_net(net, calib_x, bits, method,
                                    lambda m: self.test(m, testloader, device), seed)


def num_examples(loader: Any) -> int:
    """The number of examples behind a DataLoader (``len(loader.dataset)``)."""
    dataset = getattr(loader, "dataset", None)
    return len(dataset) if dataset is not None else sum(len(b[0]) for b in loader)

