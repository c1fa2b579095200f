"""Federated tasks as Python modules in the shape of Flower's quickstart-pytorch ``task.py``.

A task module defines

* ``Net``: the model class (called as ``Net()``, or with the keyword options it names);
* ``load_data(partition_id, num_partitions) -> (trainloader, testloader)``;
* ``train(net, trainloader, epochs, device) -> float`` (the average training loss);
* ``test(net, testloader, device) -> (loss, accuracy)``;
* optionally ``load_centralized_dataset() -> testloader`` for the server's evaluation.

Any of them may take extra keyword parameters (``lr``, ``batch_size``, ``hidden``, ...); the
runner fills those from the config by name (see :class:`BoundTask`). ``fedquant fl``,
``fedquant compare`` and the Flower apps take a task by ``task = "<spec>"``:
a built-in name (:data:`BUILTIN_TASKS`), a dotted module path (``mypkg.task``) or the path
of a ``.py`` file (:func:`load_task_module`). Built-in tasks:

* ``digits-mlp``, ``digits-cnn``: scikit-learn's bundled 8x8 digits (offline);
* ``linreg``: a synthetic linear regression;
* ``synthetic``: LEAF/FedProx Synthetic(alpha, beta) (Li et al., MLSys 2020,
  https://arxiv.org/abs/1812.06127), non-IID by construction, generated (no download);
* ``dataset``: the task of the config's ``dataset`` and ``model`` keys (digits, linreg, a
  local CSV/parquet/saved/image-folder dataset, a Hub dataset; logreg, mlp, cnn, linear).

See docs/tasks.md.
"""

from fedquant.fl.tasks.bound import BoundTask, get_state, set_state
from fedquant.fl.tasks.loader import BUILTIN_TASKS, REQUIRED, load_task_module

__all__ = ["BUILTIN_TASKS", "REQUIRED", "BoundTask", "get_state", "load_task_module",
           "set_state"]
