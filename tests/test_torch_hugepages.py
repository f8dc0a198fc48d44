"""fastopt.torch asks for huge pages on large tables that take sparse gradients
(fastopt/torch/hugepages.py): a hint that never changes a value."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastopt.torch as ft  # noqa: E402
from fastopt.torch import hugepages  # noqa: E402


def test_advise_keeps_contents():
    t = torch.randn(1 << 22, 8)                          # 128 MiB
    before = t.clone()
    ok = hugepages.advise(t.data_ptr(), t.numel() * 4)
    assert isinstance(ok, bool)
    assert torch.equal(t, before)
    assert hugepages.advise(t.data_ptr(), 4096) is False  # no whole huge page inside


@pytest.mark.parametrize("rows,expected", [(1 << 17, 1), (1 << 10, 0)])
def test_adapter_advises_large_sparse_tables_once(rows, expected, monkeypatch):
    calls = []
    monkeypatch.setattr(hugepages, "advise", lambda addr, n: calls.append((addr, n)))
    monkeypatch.setattr(hugepages, "_DONE", set())
    emb = torch.nn.Embedding(rows, 64, sparse=True)
    ref = emb.weight.detach().clone()
    opt = ft.Adam(emb.parameters(), lr=0.1)
    ids = torch.tensor([3, 5, 3])
    for _ in range(3):
        opt.zero_grad()
        emb(ids).sum().backward()
        opt.step()
    assert len(calls) == expected
    if expected:
        assert calls[0] == (emb.weight.data_ptr(), rows * 64 * 4)
    changed = (emb.weight.detach() != ref).any(dim=1)
    assert changed.nonzero().flatten().tolist() == [3, 5]


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("FASTOPT_HUGEPAGES", "0")
    t = np.zeros(1 << 24, dtype=np.float32)
    assert hugepages.advise(t.ctypes.data, t.nbytes) is False
