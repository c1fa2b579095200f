"""Finding a task module by built-in name, dotted path or ``.py`` file path.

Example::

    module = load_task_module("digits-mlp")          # built-in
    module = load_task_module("mypkg.task")          # importable module
    module = load_task_module("experiments/task.py") # a file anywhere
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

#: built-in task name -> module
BUILTIN_TASKS: dict[str, str] = {
    "digits-mlp": "fedquant.fl.tasks.digits_mlp",
    "digits-cnn": "fedquant.fl.tasks.digits_cnn",
    "linreg": "fedquant.fl.tasks.linreg",
    "synthetic": "fedquant.fl.tasks.synthetic",
    "dataset": "fedquant.fl.tasks.dataset",
}
#: what every task module defines
REQUIRED = ("Net", "load_data", "train", "test")
_SHAPE = ("a task module defines Net (the model class), load_data(partition_id, "
          "num_partitions) -> (trainloader, testloader), train(net, trainloader, epochs, "
          "device) -> float and test(net, testloader, device) -> (loss, accuracy)")


def _is_path(spec: str) -> bool:
    return spec.endswith(".py") or "/" in spec or "\\" in spec


def _from_file(spec: str) -> ModuleType:
    path = Path(spec).expanduser().resolve()
    if not path.is_file():
        raise ValueError(f"task file {spec!r} does not exist (resolved to {str(path)!r}); "
                         "give the path of a .py file, a dotted module path or a built-in "
                         f"task {sorted(BUILTIN_TASKS)}")
    if path.suffix != ".py":
        raise ValueError(f"task file {spec!r} is not a .py file")
    name = f"fedquant_task_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[name]
        raise ValueError(f"task file {spec!r} failed to import: "
                         f"{type(err).__name__}: {err}") from err
    return module


def _from_dotted(spec: str) -> ModuleType:
    try:
        return importlib.import_module(spec)
    except ModuleNotFoundError as err:
        if err.name is not None and spec.startswith(err.name):
            raise ValueError(f"task {spec!r} is not a built-in task {sorted(BUILTIN_TASKS)}, "
                             "an importable module (dotted path) or a .py file") from err
        raise ValueError(f"task module {spec!r} failed to import: {err}") from err
    except Exception as err:
        raise ValueError(f"task module {spec!r} failed to import: "
                         f"{type(err).__name__}: {err}") from err


@functools.lru_cache(maxsize=32)
def load_task_module(spec: str) -> ModuleType:
    """The task module `spec` (built-in name, dotted path or .py path), checked for the
    four names of :data:`REQUIRED`; ValueError names what is missing."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"task must be a built-in task {sorted(BUILTIN_TASKS)}, a dotted "
                         f"module path or a .py file path, got {spec!r}")
    spec = spec.strip()
    if spec in BUILTIN_TASKS:
        module = importlib.import_module(BUILTIN_TASKS[spec])
    elif _is_path(spec):
        module = _from_file(spec)
    else:
        module = _from_dotted(spec)
    missing = [name for name in REQUIRED if not callable(getattr(module, name, None))]
    if missing:
        raise ValueError(f"task {spec!r} ({getattr(module, '__file__', module.__name__)}) does "
                         f"not define {', '.join(missing)}; {_SHAPE}")
    return module
