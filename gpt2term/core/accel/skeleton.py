"""A model's skeleton on the "meta" device, built without running its initialisers, for loading weights into.

Loading a checkpoint builds the modules on "meta" and then fills them with the saved weights. Under torch's
device context every initialiser (`nn.init.normal_`, `Tensor.normal_`, ...) still runs on the meta tensors,
through Python reference kernels whose first call imports TorchDynamo: seconds of a cold start spent on numbers
that are thrown away. Here the in-place calls on meta tensors are skipped (they have no values to fill).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

try:  # torch.utils._device.DeviceContext: verified on torch 2.13.0
    from torch.utils._device import DeviceContext as _DeviceContext
except ImportError:  # pragma: no cover - an older or newer torch: the plain device context
    _DeviceContext = None


if _DeviceContext is not None:

    class _MetaWithoutInit(_DeviceContext):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            first = args[0] if args else (kwargs or {}).get("tensor")  # nn.init passes it by name
            name = getattr(func, "__name__", "")
            in_place = name.endswith("_") and not name.endswith("__")  # normal_, fill_; not __get__, __setitem__
            if in_place and isinstance(first, torch.Tensor) and first.is_meta:
                return first  # an initialiser on a tensor that holds no values
            return super().__torch_function__(func, types, args, kwargs)


@contextlib.contextmanager
def meta_device() -> Iterator[None]:
    """`with torch.device("meta")`, minus the initialisers' cost."""
    if _DeviceContext is None:
        with torch.device("meta"):
            yield
        return
    with _MetaWithoutInit(torch.device("meta")):
        yield
