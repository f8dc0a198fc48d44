"""Adafactor on the CUDA backend: refused (no kernels for the factored passes yet), before
anything is written.  Run with NUMBA_ENABLE_CUDASIM=1 where there is no GPU."""

import numpy as np
import pytest

import fastopt
from fastopt import backends


def test_cuda_refuses_adafactor_before_writing():
    """On the CUDA backend (the simulator: NUMBA_ENABLE_CUDASIM=1) Adafactor is refused
    with the missing feature named; nothing is allocated."""
    if "cuda" not in backends.available():
        pytest.skip("no CUDA backend here (run with NUMBA_ENABLE_CUDASIM=1)")
    from numba import cuda
    p = cuda.to_device(np.ones((4, 3), np.float32))
    with pytest.raises(NotImplementedError, match="factored rule Adafactor"):
        fastopt.Adafactor([p], backend="cuda")
    with pytest.raises(NotImplementedError, match="factored rule Adafactor"):
        fastopt.functional.adafactor_(p, cuda.to_device(np.ones((4, 3), np.float32)),
                                      cuda.to_device(np.zeros((4, 1), np.float32)),
                                      cuda.to_device(np.zeros((1, 3), np.float32)), step=1,
                                      backend="cuda")
    assert (p.copy_to_host() == 1).all()
