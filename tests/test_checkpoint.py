"""fastopt.checkpoint: bit-exact round trips, resumed trajectories, corruption,
mismatches, atomic writes (no temporary files left behind)."""

import json
import math
import os
import struct
import zipfile

import numpy as np
import pytest

import fastopt
from fastopt import checkpoint, lr_scheduler


class FakeOpt:
    """Stand-in optimizer with torch-like state_dict/load_state_dict that checks
    name, groups, shapes and dtypes before changing anything."""

    def __init__(self, params, name="FakeAdam", lr=1e-3):
        self.name = name
        self.params = params
        self.defaults = {"lr": lr, "betas": (0.9, 0.999), "eps": 1e-8}
        self.param_groups = [dict(self.defaults, params=list(range(len(params))))]
        self.state = {}

    def fill(self, seed=0):
        rng = np.random.default_rng(seed)
        for i, p in enumerate(self.params):
            self.state[i] = {"step": 3 + i, "exp_avg": rng.standard_normal(p.shape).astype(p.dtype),
                             "exp_avg_sq": rng.random(p.shape).astype(p.dtype),
                             "mu_product": [0.1 + i / 3, math.inf, -0.0, 5e-324][i % 4]}
        self.state[0]["nan_scalar"] = math.nan
        return self

    def state_dict(self):
        return {"version": 1, "optimizer": self.name,
                "state": {i: {k: (v.copy() if isinstance(v, np.ndarray) else v)
                              for k, v in st.items()} for i, st in self.state.items()},
                "param_groups": [dict(g) for g in self.param_groups]}

    def load_state_dict(self, sd):
        if sd["optimizer"] != self.name or sd["version"] != 1:
            raise ValueError("wrong optimizer")
        if len(sd["param_groups"]) != len(self.param_groups):
            raise ValueError("wrong groups")
        for i, st in sd["state"].items():
            p = self.params[i]
            for k, v in st.items():
                if isinstance(v, np.ndarray) and (v.shape != p.shape or v.dtype != p.dtype):
                    raise ValueError(f"state {k} of {i}: {v.dtype}{v.shape} vs "
                                     f"{p.dtype}{p.shape}")
        self.state = {i: {k: (v.copy() if isinstance(v, np.ndarray) else v)
                          for k, v in st.items()} for i, st in sd["state"].items()}
        for g, new in zip(self.param_groups, sd["param_groups"]):
            g.clear()
            g.update(new)


def params(dtype_mix=True):
    rng = np.random.default_rng(42)
    return [rng.standard_normal((17, 9)).astype(np.float32),
            rng.standard_normal(31).astype(np.float64 if dtype_mix else np.float32),
            rng.standard_normal((2, 3, 4)).astype(np.float32)]


def bits(x):
    return struct.pack("<d", x) if isinstance(x, float) else x


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for ga, gb in zip(sa["param_groups"], sb["param_groups"]):
        for k in ga:
            assert type(ga[k]) is type(gb[k]), k
    assert sa["state"].keys() == sb["state"].keys()
    for i in sa["state"]:
        assert sa["state"][i].keys() == sb["state"][i].keys()
        for k, v in sa["state"][i].items():
            w = sb["state"][i][k]
            if isinstance(v, np.ndarray):
                assert v.dtype == w.dtype and v.shape == w.shape
                assert v.tobytes() == w.tobytes()
            else:
                assert type(v) is type(w) and bits(v) == bits(w), (i, k, v, w)


def listdir(d):
    return sorted(os.listdir(d))


# --------------------------------------------------------------------- round trip

def test_round_trip_bit_exact(tmp_path):
    src = FakeOpt(params()).fill()
    src.param_groups[0]["lr"] = 0.1 + 0.2  # not a short decimal
    path = tmp_path / "ckpt.npz"
    checkpoint.save(path, src)
    assert listdir(tmp_path) == ["ckpt.npz"]
    dst = FakeOpt(params())
    assert checkpoint.load(path, dst) == {}
    assert_same_state(src, dst)
    assert dst.param_groups[0]["betas"] == (0.9, 0.999)  # tuple restored
    assert math.isnan(dst.state[0]["nan_scalar"])
    # plain numpy can read it; arrays under state/<i>/<name>, header is JSON
    with np.load(path) as z:
        assert set(z.files) >= {"__header__", "state/0/exp_avg", "state/2/exp_avg_sq"}
        assert z["state/1/exp_avg"].dtype == np.float64
        header = json.loads(z["__header__"].tobytes())
    assert header["format"] == "fastopt-checkpoint" and header["format_version"] == 1
    assert header["optimizer"] == "FakeAdam"
    assert {m["key"] for m in header["arrays"]} == {f"state/{i}/{n}" for i in range(3)
                                                      for n in ("exp_avg", "exp_avg_sq")}
    assert all(len(m["sha256"]) == 64 for m in header["arrays"])
    with zipfile.ZipFile(path) as zf:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())


def test_extra_and_overwrite(tmp_path):
    path = str(tmp_path / "c")  # any name: no .npz appended
    extra = {"epoch": 7, "loss": [0.25, math.inf, -1e-300], "cfg": {"betas": (0.9, 0.99)},
             "$weird": None, "ids": {1: "a", 2: "b"}, "flag": True}
    checkpoint.save(path, FakeOpt(params()).fill(1), extra={"old": 1})
    checkpoint.save(path, FakeOpt(params()).fill(2), extra=extra)  # overwrite in place
    assert listdir(tmp_path) == ["c"]
    dst = FakeOpt(params())
    got = checkpoint.load(path, dst)
    assert got == extra and type(got["cfg"]["betas"]) is tuple
    assert_same_state(FakeOpt(params()).fill(2), dst)


@pytest.mark.parametrize("bad", [{"a": np.ones(3)}, {"a": object()}, {"a": 1j}, [1, 2]])
def test_extra_must_be_json_able(tmp_path, bad):
    with pytest.raises(TypeError):
        checkpoint.save(tmp_path / "x.npz", FakeOpt(params()).fill(), extra=bad)
    assert listdir(tmp_path) == []


def test_file_mode_follows_umask(tmp_path):
    path = tmp_path / "m.npz"
    checkpoint.save(path, FakeOpt(params()).fill())
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask


# ----------------------------------------------------------------------- scheduler

def _sched_cases():
    return {
        "cosine": lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=10, eta_min=1e-5),
        "plateau": lambda o: lr_scheduler.ReduceLROnPlateau(o, patience=1),
        "sequential": lambda o: lr_scheduler.SequentialLR(
            o, [lr_scheduler.LinearLR(o, 0.1, total_iters=3),
                lr_scheduler.MultiStepLR(o, [4, 4, 9])], milestones=[3]),
        "onecycle": lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=40),
    }


def _step(s, t):
    if isinstance(s, lr_scheduler.ReduceLROnPlateau):
        s.step([1.0, 0.9, 0.95, 0.97, 0.99, 0.8][t % 6])
    else:
        s.step()


@pytest.mark.parametrize("name", list(_sched_cases()))
def test_scheduler_resume(tmp_path, name):
    make = _sched_cases()[name]
    o = FakeOpt(params())
    s = make(o)
    full = []
    for t in range(30):
        _step(s, t)
        full.append((o.param_groups[0]["lr"], o.param_groups[0]["betas"]))
    o1 = FakeOpt(params())
    s1 = make(o1)
    for t in range(12):
        _step(s1, t)
    checkpoint.save(tmp_path / "s.npz", o1, scheduler=s1, extra={"t": 12})
    o2 = FakeOpt(params())
    s2 = make(o2)
    assert checkpoint.load(tmp_path / "s.npz", o2, scheduler=s2) == {"t": 12}
    rest = []
    for t in range(12, 30):
        _step(s2, t)
        rest.append((o2.param_groups[0]["lr"], o2.param_groups[0]["betas"]))
    assert rest == full[12:]


def test_scheduler_mismatch_changes_nothing(tmp_path):
    o = FakeOpt(params()).fill()
    checkpoint.save(tmp_path / "a.npz", o, scheduler=lr_scheduler.StepLR(o, 3))
    checkpoint.save(tmp_path / "b.npz", o)
    dst = FakeOpt(params())
    s = lr_scheduler.ExponentialLR(dst, 0.5)
    before = dst.state_dict()
    with pytest.raises(ValueError, match="StepLR"):
        checkpoint.load(tmp_path / "a.npz", dst, scheduler=s)
    with pytest.raises(ValueError, match="no scheduler"):
        checkpoint.load(tmp_path / "b.npz", dst, scheduler=s)
    assert_same_state(dst, _with(before))
    # a scheduler saved but not asked for is ignored
    checkpoint.load(tmp_path / "a.npz", dst)
    assert_same_state(o, dst)


def test_scheduler_load_failure_rolls_back_optimizer(tmp_path):
    class Bad(lr_scheduler.StepLR):
        def load_state_dict(self, sd):
            raise RuntimeError("boom")

    o = FakeOpt(params()).fill()
    checkpoint.save(tmp_path / "a.npz", o, scheduler=Bad(o, 3))
    dst = FakeOpt(params()).fill(9)
    s = Bad(dst, 3)
    before = dst.state_dict()
    with pytest.raises(RuntimeError, match="boom"):
        checkpoint.load(tmp_path / "a.npz", dst, scheduler=s)
    assert_same_state(dst, _with(before))


def _with(sd):
    f = FakeOpt(params())
    f.load_state_dict(sd)
    return f


# ------------------------------------------------------------------ bad files

@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "ok.npz"
    checkpoint.save(path, FakeOpt(params()).fill())
    return path


def _load_fails(path, match, exc=ValueError):
    dst = FakeOpt(params()).fill(5)
    before = dst.state_dict()
    with pytest.raises(exc, match=match) as info:
        checkpoint.load(path, dst)
    assert_same_state(dst, _with(before))
    return info


def test_truncated_file(saved):
    data = saved.read_bytes()
    for cut in (len(data) // 2, len(data) - 10, 100):
        saved.write_bytes(data[:cut])
        info = _load_fails(saved, "not a valid fastopt checkpoint")
        assert str(saved) in str(info.value)


def test_flipped_bytes_anywhere_are_detected(saved):
    data = bytearray(saved.read_bytes())
    with np.load(saved) as z:
        needle = z["state/1/exp_avg"].tobytes()[:64]
    at = bytes(data).find(needle)
    assert at > 0
    positions = [at + 3, at + 40, len(data) // 3, len(data) - 30]
    for pos in positions:
        bad = bytearray(data)
        bad[pos] ^= 0x10
        saved.write_bytes(bytes(bad))
        _load_fails(saved, str(saved))


def test_checksum_mismatch_with_valid_zip(tmp_path, saved):
    """An array altered consistently (zip CRC ok): only the SHA-256 catches it."""
    with np.load(saved) as z:
        entries = {k: z[k] for k in z.files}
    entries["state/2/exp_avg"] = entries["state/2/exp_avg"].copy()
    entries["state/2/exp_avg"].flat[5] += 1
    forged = tmp_path / "forged.npz"
    np.savez(forged, **entries)
    _load_fails(forged, "SHA-256")


def _rewrite(src, dst, header_fn=None, drop=(), add=None):
    with np.load(src) as z:
        entries = {k: z[k] for k in z.files}
    header = json.loads(entries.pop("__header__").tobytes())
    if header_fn:
        header_fn(header)
    for k in drop:
        entries.pop(k)
    entries.update(add or {})
    entries["__header__"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    np.savez(dst, **entries)
    return dst


@pytest.mark.parametrize("change,match", [
    (dict(header_fn=lambda h: h.update(format="other")), "format"),
    (dict(header_fn=lambda h: h.update(format_version=2)), "version"),
    (dict(header_fn=lambda h: h.update(optimizer="FakeSGD")), "FakeSGD"),
    (dict(drop=["state/0/exp_avg"]), "missing"),
    (dict(add={"state/9/x": np.ones(2)}), "unexpected"),
    (dict(header_fn=lambda h: h["arrays"][0].update(shape=[1, 2])), "manifest"),
    (dict(header_fn=lambda h: h["arrays"][0].update(dtype="<f8")), "manifest"),
    (dict(header_fn=lambda h: h.pop("arrays")), "manifest"),
    (dict(header_fn=lambda h: h.pop("state_dict")), "state_dict"),
])
def test_header_and_manifest_checks(tmp_path, saved, change, match):
    _load_fails(_rewrite(saved, tmp_path / "bad.npz", **change), match)


def test_not_a_checkpoint(tmp_path):
    p = tmp_path / "plain.npz"
    np.savez(p, a=np.ones(3))
    _load_fails(p, "__header__")
    t = tmp_path / "text.npz"
    t.write_text("hello")
    _load_fails(t, "not a valid")
    h = tmp_path / "badjson.npz"
    np.savez(h, __header__=np.frombuffer(b"{not json", np.uint8))
    _load_fails(h, "not a valid")
    with pytest.raises(FileNotFoundError):
        checkpoint.load(tmp_path / "missing.npz", FakeOpt(params()))


def test_wrong_optimizer_shapes_and_dtypes(saved):
    dst = FakeOpt(params(), name="FakeSGD")
    with pytest.raises(ValueError, match="FakeAdam"):
        checkpoint.load(saved, dst)
    other = params()
    other[0] = np.zeros((9, 17), np.float32)
    with pytest.raises(ValueError, match="shape|\\(9, 17\\)"):
        checkpoint.load(saved, FakeOpt(other))
    # float64 state into float32 parameters: refused by the optimizer, never cast
    with pytest.raises(ValueError, match="float64"):
        checkpoint.load(saved, FakeOpt(params(dtype_mix=False)))


# ---------------------------------------------------------------- atomic writes

def test_failed_replace_leaves_no_temp_and_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "c.npz"
    checkpoint.save(path, FakeOpt(params()).fill(1))
    old = path.read_bytes()

    def boom(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(checkpoint.os, "replace", boom)
    with pytest.raises(OSError, match="disk on fire"):
        checkpoint.save(path, FakeOpt(params()).fill(2))
    assert listdir(tmp_path) == ["c.npz"]
    assert path.read_bytes() == old
    monkeypatch.undo()
    new_dir = tmp_path / "sub"
    new_dir.mkdir()
    monkeypatch.setattr(checkpoint.os, "replace", boom)
    with pytest.raises(OSError):
        checkpoint.save(new_dir / "x.npz", FakeOpt(params()).fill())
    assert listdir(new_dir) == []


def test_failed_write_leaves_no_temp(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt  # even a BaseException cleans up

    monkeypatch.setattr(checkpoint.np, "savez", boom)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path / "x.npz", FakeOpt(params()).fill())
    assert listdir(tmp_path) == []


def test_target_is_a_directory(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(OSError):
        checkpoint.save(tmp_path / "d", FakeOpt(params()).fill())
    assert listdir(tmp_path) == ["d"]
    with pytest.raises(OSError):
        checkpoint.save(tmp_path / "nodir" / "x.npz", FakeOpt(params()).fill())
    assert listdir(tmp_path) == ["d"]


# ------------------------------------------------------- real fastopt optimizers

def _real(name):
    cls = getattr(fastopt, name, None)
    if cls is None:
        pytest.skip(f"fastopt.{name} not available yet")
    return cls


def _grad(t, shapes, dtype):
    rng = np.random.default_rng(1000 + t)
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


REAL = [("SGD", dict(lr=0.05, momentum=0.9, nesterov=True)), ("Adam", dict(lr=1e-2)),
        ("AdamW", dict(lr=1e-2, amsgrad=True)), ("NAdam", dict(lr=1e-2)),
        ("RMSprop", dict(lr=1e-3, centered=True, momentum=0.5))]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name,kw", REAL, ids=[r[0] for r in REAL])
def test_real_optimizer_resume_is_identical(tmp_path, name, kw, dtype):
    cls = _real(name)
    shapes = [(13, 7), (5,), (3, 2, 2)]
    init = [np.random.default_rng(s).standard_normal(sh).astype(dtype)
            for s, sh in enumerate(shapes)]
    total, k = 9, 4
    ref = [p.copy() for p in init]
    opt = cls(ref, **kw)
    for t in range(total):
        opt.step(_grad(t, shapes, dtype))
    run = [p.copy() for p in init]
    opt1 = cls(run, **kw)
    for t in range(k):
        opt1.step(_grad(t, shapes, dtype))
    checkpoint.save(tmp_path / "r.npz", opt1)
    resumed = [p.copy() for p in run]  # the model's own weights, saved separately
    del opt1
    opt2 = cls(resumed, **kw)
    checkpoint.load(tmp_path / "r.npz", opt2)
    for t in range(k, total):
        opt2.step(_grad(t, shapes, dtype))
    for a, b in zip(ref, resumed):
        assert a.tobytes() == b.tobytes()
    assert listdir(tmp_path) == ["r.npz"]


def test_real_optimizer_with_scheduler_resume(tmp_path):
    cls = _real("SGD")
    shapes = [(6, 4), (3,)]
    init = [np.linspace(-1, 1, int(np.prod(s))).reshape(s) for s in shapes]

    def make(ps):
        o = cls(ps, lr=0.1, momentum=0.9)
        return o, lr_scheduler.CyclicLR(o, 0.01, 0.1, step_size_up=3)

    ref = [p.copy() for p in init]
    o, s = make(ref)
    for t in range(10):
        o.step(_grad(t, shapes, np.float64))
        s.step()
    run = [p.copy() for p in init]
    o1, s1 = make(run)
    for t in range(4):
        o1.step(_grad(t, shapes, np.float64))
        s1.step()
    checkpoint.save(tmp_path / "r.npz", o1, scheduler=s1)
    resumed = [p.copy() for p in run]
    o2, s2 = make(resumed)
    checkpoint.load(tmp_path / "r.npz", o2, scheduler=s2)
    for t in range(4, 10):
        o2.step(_grad(t, shapes, np.float64))
        s2.step()
    for a, b in zip(ref, resumed):
        assert a.tobytes() == b.tobytes()
    assert o2.param_groups[0]["lr"] == o.param_groups[0]["lr"]


def test_real_optimizer_refuses_downcast(tmp_path):
    cls = _real("Adam")
    o = cls([np.ones(4, np.float64)], lr=0.1)
    o.step([np.ones(4)])
    checkpoint.save(tmp_path / "d.npz", o)
    o32 = cls([np.ones(4, np.float32)], lr=0.1)
    with pytest.raises(ValueError, match="float64|dtype"):
        checkpoint.load(tmp_path / "d.npz", o32)
    with pytest.raises(ValueError, match="Adam"):
        checkpoint.load(tmp_path / "d.npz", _real("SGD")([np.ones(4)], lr=0.1))
