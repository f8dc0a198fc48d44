"""The preamble of the CUDA test files (``test_cuda_backend``, ``test_cuda_storage``,
``test_adafactor_cuda``, ``test_muon_cuda``).

They run where numba-cuda is installed and either a GPU is present or numba's CUDA
simulator is on; the simulator must be chosen before numba.cuda is first imported::

    NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/test_cuda_storage.py

:func:`require_cuda`, called at a test module's top, skips the module otherwise,
saying why.
"""

import importlib.util

import pytest


def require_cuda():
    """``numba.cuda`` where the CUDA tests can run here (a GPU, or the simulator);
    otherwise skips the calling test module (call it at module level)."""
    if importlib.util.find_spec("numba_cuda") is None:
        pytest.skip("numba-cuda is not installed (pip install 'fastopt[cuda]')",
                    allow_module_level=True)
    from numba import cuda
    if not cuda.is_available():
        pytest.skip("no CUDA GPU here; run this file with NUMBA_ENABLE_CUDASIM=1 set to use "
                    "numba's CUDA simulator", allow_module_level=True)
    return cuda
