"""Tensors <-> arrays: what fastopt's engine sees of torch tensors, and back.

CPU tensors are viewed through ``tensor.numpy()`` (shared memory; bfloat16 through
``t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)``), CUDA tensors through
``__cuda_array_interface__`` (the CUDA backend's ``as_param``; bfloat16 as its
``bfloat16(t.view(torch.int16))`` bits).  Under numba's CUDA simulator a CPU tensor
is shown to the CUDA backend through ``__cuda_array_interface__`` (:class:`HostCAI`).
"""

import numpy as np
import torch

from ..sparse import RowSparse
from .hugepages import advise_once

STRIDED = torch.strided
SPARSE = torch.sparse_coo
FLOATS = (torch.float32, torch.float64, torch.bfloat16)


def cuda_simulator():
    from ..backends import cuda as cb
    return bool(cb.cuda is not None and cb._SIM)


class HostCAI:
    """Numba's CUDA simulator only: a CPU tensor's memory shown through
    ``__cuda_array_interface__`` (the simulator's device pointers are host pointers)."""

    def __init__(self, t):
        self._t = t
        self.__cuda_array_interface__ = {
            "data": (t.data_ptr(), False), "shape": tuple(t.shape), "strides": None,
            "typestr": np.dtype(t.numpy().dtype).str, "version": 2}


def host_array(t):
    """A NumPy view of a CPU tensor (bfloat16 as ``ml_dtypes.bfloat16``)."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        from ..storage import bf16
        return t.view(torch.int16).numpy().view(bf16())
    return t.numpy()


def array(t, backend, where):
    """The array through which ``backend`` updates tensor ``t`` in place (checked:
    a dense, contiguous float32/float64/bfloat16 tensor on the backend's device)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"optimizer can only optimize Tensors, but one of the params is "
                        f"{torch.typename(t)}")
    if t.layout is not STRIDED:
        raise TypeError(f"{where}: a {t.layout} tensor; fastopt updates dense (strided) tensors")
    if t.dtype not in FLOATS:
        raise TypeError(f"{where}: dtype {t.dtype} is not supported (float32, float64 or "
                        "bfloat16; float16's 5-bit exponent under- and overflows updates)")
    if not t.is_contiguous():
        raise ValueError(f"{where}: the tensor is not contiguous (strides {t.stride()}); "
                         "fastopt updates contiguous memory in place")
    t = t.detach()
    if backend.memory == "device":
        if t.is_cuda or (t.device.type == "cpu" and cuda_simulator()):
            return device_array(t, backend, where)
        raise TypeError(f"{where}: a {t.device} tensor, but backend 'cuda' updates CUDA "
                        "tensors; move the model to the GPU or use a CPU backend")
    if t.device.type != "cpu":
        raise TypeError(f"{where}: a {t.device} tensor needs backend='cuda' (or 'auto'); "
                        f"backend {backend.name!r} runs on the CPU")
    return backend.as_param(host_array(t), where)


def device_array(t, backend, where):
    bits = t.dtype == torch.bfloat16
    if bits:
        t = t.view(torch.int16)
    src = t if t.is_cuda else HostCAI(t)
    if bits:
        from ..backends.cuda import bfloat16
        return backend.as_param(bfloat16(src), where)
    return backend.as_param(src, where)


def tensor(a, like):
    """The torch tensor sharing array ``a``'s memory (state made by the engine), on
    ``like``'s device."""
    if isinstance(a, np.ndarray):
        if str(a.dtype) == "bfloat16":
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(a)
    from ..backends.cuda import is_bf16_state
    t = torch.as_tensor(a, device=like.device)
    return t.view(torch.bfloat16) if is_bf16_state(a) else t


def grad(g, p, param_array, backend, i):
    """A gradient for the engine: an array (dense), a :class:`fastopt.RowSparse`
    (sparse COO with one sparse dimension, not densified) or None."""
    if g is None:
        return None
    where = f"gradient {i}"
    if g.layout is STRIDED:
        if g.device != p.device:
            raise ValueError(f"{where} is on {g.device}, the parameter on {p.device}")
        if not g.is_contiguous():
            with torch.no_grad():
                g = g.contiguous()
        if backend.memory == "device":
            return device_array(g.detach(), backend, where)
        return host_array(g).reshape(param_array.shape) if g.dtype == p.dtype \
            else host_array(g)
    if g.layout is not SPARSE:
        raise TypeError(f"{where}: layout {g.layout} is not supported (dense, or sparse COO "
                        "with one sparse dimension)")
    if g.sparse_dim() != 1 or tuple(g.shape) != tuple(p.shape):
        raise ValueError(f"{where}: a sparse COO gradient of shape {tuple(g.shape)} with "
                         f"sparse_dim={g.sparse_dim()}; fastopt takes row-sparse gradients "
                         f"(sparse_dim=1, the parameter's shape {tuple(p.shape)}), as "
                         "nn.Embedding(sparse=True) produces")
    if g.requires_grad:
        g = g.detach()
    idx, vals = g._indices(), g._values()     # (1, nnz) and (nnz, ...): views
    if not vals.is_contiguous():
        vals = vals.contiguous()
    if idx.is_cuda:          # the CUDA backend takes row-sparse values from the host
        idx, vals = idx.cpu(), vals.cpu()
    elif backend.memory == "host":   # torch's allocator gives no huge pages (hugepages.py)
        advise_once(param_array)
    # the indices and values as they are (views, not coalesced: the row plan sums
    # the duplicates in order of appearance)
    return RowSparse(idx.numpy()[0], host_array(vals))
