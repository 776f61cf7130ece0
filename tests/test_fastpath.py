"""The fast CPU path (OpenBLAS preloaded + the sgemv shim) never changes results.

The comparison runs the same script in two child processes, one with MLX's own
BLAS and one with the fast path preloaded (LD_PRELOAD is read only at process
start), and compares greedy tokens (identical) and log-probabilities (within
float32 summation-order tolerance), plain, steered and batched. Skipped where
the fast path is unavailable (macOS, no OpenBLAS, no C compiler).
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from mlx_steer import fastpath

ATOL = 1e-3  # log-probabilities after 30 float32 blocks summed in another order (seen: 1e-4)

CHILD = textwrap.dedent(r'''
    import ctypes, json, sys
    import numpy as np
    import mlx.core as mx
    mx.set_default_device(mx.cpu)  # the CPU path is what these children measure
    import mlx_steer
    from mlx_steer import Steer, fastpath
    from mlx_steer.models import base
    from mlx_steer.steer import as_steers
    from mlx_lm.generate import generate_step

    out = sys.argv[1]
    info = {"loaded": fastpath.loaded(), "describe": fastpath.describe()}
    arrays = {}

    # 1. MLX matmuls of the shapes the shim rewrites, against float64 numpy.
    rng = np.random.default_rng(1)
    W = rng.standard_normal((40, 24)).astype(np.float32)
    x = rng.standard_normal((1, 24)).astype(np.float32)
    y = rng.standard_normal((1, 40)).astype(np.float32)
    mW, mx_, my = mx.array(W), mx.array(x), mx.array(y)
    cases = {
        "x@W.T": (mx_ @ mW.T, x @ W.T.astype(np.float64)),
        "y@W": (my @ mW, y @ W.astype(np.float64)),
        "W@x.T": (mW @ mx_.T, W.astype(np.float64) @ x.T),
        "W.T@y.T": (mW.T @ my.T, W.T.astype(np.float64) @ y.T),
        "addmm": (mx.addmm(my, mx_, mW.T, alpha=0.5, beta=2.0),
                  2.0 * y + 0.5 * (x @ W.T.astype(np.float64))),
        "batched": (mx.array(x[None].repeat(3, 0)) @ mW.T,
                    np.repeat(x[None], 3, 0) @ W.T.astype(np.float64)),
    }
    for name, (got, want) in cases.items():
        arrays["mm_" + name] = np.array(got).astype(np.float64) - want

    # 2. The model: plain and steered batch-1 decode, per-step log-probabilities.
    lab = mlx_steer.load()
    v = rng.standard_normal(lab.hidden_size).astype(np.float32)
    v *= 6.0 / np.linalg.norm(v)
    steer = Steer(v, 12, 1.5)
    prompt = "Tell me about your weekend."

    def decode(s, n=8):
        toks = lab.encode(prompt, chat=True)
        caches = base.make_caches(lab.model, base.build_plans([as_steers(s)], [len(toks)]))
        ys, lps = [], []
        gen = generate_step(mx.array(toks), lab.model, max_tokens=n,
                            sampler=lambda lp: mx.argmax(lp, axis=-1), prompt_cache=caches)
        for y, lp in gen:
            ys.append(int(y))
            lps.append(np.array(lp.astype(mx.float32)))
        return ys, np.stack(lps)

    for name, s in (("plain", None), ("steered", steer)):
        info[name], arrays[name] = decode(s)

    # 3. A 3-row batch (sgemm with M=3) and a full forward pass (prefill).
    rows = lab.generate_batch_tokens(
        [(prompt, None), (prompt, steer), ("Name a fruit.", Steer(v, 20, 1.0))], max_tokens=6)
    info["batch"] = [r.tokens for r in rows]
    arrays["batch_first"] = np.stack([r.first_logprobs for r in rows])
    arrays["logits"] = lab.logits(prompt, steer)

    # 4. With the shim preloaded: call cblas_sgemm directly, every layout and transpose.
    errs = []
    try:
        lib = ctypes.CDLL(None)
        shim = bool(lib.mlx_steer_sgemv_shim_active())
    except (OSError, AttributeError):
        shim = False
    info["shim"] = shim
    if shim:
        f = lib.cblas_sgemm
        P = ctypes.POINTER(ctypes.c_float)
        f.argtypes = [ctypes.c_int] * 6 + [ctypes.c_float, P, ctypes.c_int, P, ctypes.c_int,
                                           ctypes.c_float, P, ctypes.c_int]
        f.restype = None

        def stored(buf, rows, cols, ld, order):
            if order == 101:
                return buf[:rows * ld].reshape(rows, ld)[:, :cols]
            return buf[:cols * ld].reshape(cols, ld)[:, :rows].T

        shapes = ((1, 5, 7), (3, 1, 7), (1, 1, 7), (3, 5, 7), (2, 9, 16), (5, 70, 33),
                  (16, 12, 64), (17, 8, 16), (6, 300, 301), (1, 300, 301),
                  (1, 64, 700))  # (M, N, K)
        for order in (101, 102):
            for ta in (111, 112):
                for tb in (111, 112):
                    for M, N, K in shapes:
                        for alpha, beta in ((1.25, 0.0), (1.25, 0.5), (1.0, 0.0)):
                            ar, ac = (M, K) if ta == 111 else (K, M)
                            br, bc = (K, N) if tb == 111 else (N, K)
                            lda = (ac if order == 101 else ar) + 2
                            ldb = (bc if order == 101 else br) + 3
                            ldc = (N if order == 101 else M) + 1
                            A = rng.standard_normal((ar if order == 101 else ac) * lda).astype(np.float32)
                            B = rng.standard_normal((br if order == 101 else bc) * ldb).astype(np.float32)
                            # 64 more floats than C needs: a write past its end shows
                            C = rng.standard_normal((M if order == 101 else N) * ldc + 64).astype(np.float32)
                            if beta == 0.0:
                                Cs = stored(C, M, N, ldc, order)
                                Cs[...] = np.nan  # must be ignored
                            opA = stored(A, ar, ac, lda, order).astype(np.float64)
                            opB = stored(B, br, bc, ldb, order).astype(np.float64)
                            opA = opA if ta == 111 else opA.T
                            opB = opB if tb == 111 else opB.T
                            C0 = stored(C, M, N, ldc, order).astype(np.float64)
                            want = alpha * opA @ opB + (beta * C0 if beta else 0.0)
                            pad = C.copy()
                            f(order, ta, tb, M, N, K, alpha, A.ctypes.data_as(P), lda,
                              B.ctypes.data_as(P), ldb, beta, C.ctypes.data_as(P), ldc)
                            got = stored(C, M, N, ldc, order)
                            mask = np.ones_like(C, bool)
                            stored(mask, M, N, ldc, order)[...] = False
                            err = float(np.abs(got - want).max()) / (1 + np.abs(want).max())
                            if not err < 1e-5 or not np.array_equal(C[mask], pad[mask]):
                                errs.append([order, ta, tb, M, N, alpha, beta, err])
    info["sgemm_errors"] = errs

    # 5. Quantised twins: products through registered 4- and 8-bit twins, against float64.
    info["twins"] = twins_ok = shim and bool(lib.mlx_steer_twin_supported())
    info["twin_errors"] = terrs = []
    if twins_ok:
        import mlx.nn as nn
        from mlx_steer.fastpath import twins

        info["model_twins"] = len(twins._LIVE.get(id(lab.model), []))
        for bits in (4, 8):
            N, K = 71, 96  # an odd row count: the last pass of a few-row product has one row
            q = rng.integers(0, 256, (N, K * bits // 8), dtype=np.uint8)
            sc = (rng.random((N, K // 32)) * 0.02).astype(np.float16).astype(np.float32)
            bi = (-rng.random((N, K // 32)) * 0.1).astype(np.float16).astype(np.float32)
            qq = np.stack([q & 15, q >> 4], -1).reshape(N, K) if bits == 4 else q
            W = (qq.reshape(N, K // 32, 32).astype(np.float32) * sc[..., None]
                 + bi[..., None]).reshape(N, K)
            lin = nn.Linear(K, N, bias=False)
            lin.weight = mx.array(W)
            if twins.attach(lin, {"weight": (q, sc, bi)}) != 1:
                terrs.append(["attach", bits])
            alone = None
            for M in (1, 2, 4, 5, 8, 9, 12):
                xm = rng.standard_normal((M, K)).astype(np.float32)
                if alone is not None:  # the first rows again: the same bits in any batch
                    xm[:2] = alone[0]
                got32 = np.array(lin(mx.array(xm)))
                got = got32.astype(np.float64)
                err = float(np.abs(got - xm.astype(np.float64) @ W.T.astype(np.float64)).max())
                if not err < 1e-4:
                    terrs.append([bits, M, err])
                if alone is None:
                    x2 = rng.standard_normal((2, K)).astype(np.float32)
                    alone = (x2, np.concatenate([np.array(lin(mx.array(x2[i:i + 1])))
                                                 for i in range(2)]))
                elif not np.array_equal(got32[:2].view(np.uint32), alone[1].view(np.uint32)):
                    terrs.append(["rows differ from the same rows alone", bits, M])
        # A twin is skipped once its matrix no longer holds the registered values.
        N, K = 8, 32
        q = rng.integers(0, 256, (N, K // 2), dtype=np.uint8)
        sc, bi = np.ones((N, 1), np.float32), np.zeros((N, 1), np.float32)
        W = np.concatenate([q & 15, q >> 4], 1).astype(np.float32)  # the shim's 4-bit order
        xm = rng.standard_normal((2, K)).astype(np.float32)
        C = np.zeros((2, N), np.float32)
        api = twins._shim()  # the shim's twin functions, with their C argument types
        api.mlx_steer_twin_register(W.ctypes.data, N, K, 4, q.ctypes.data, sc.ctypes.data,
                                    bi.ctypes.data, 7)
        def mm():
            f(101, 111, 112, 2, N, K, 1.0, xm.ctypes.data_as(P), K, W.ctypes.data_as(P), K,
              0.0, C.ctypes.data_as(P), N)
            return float(np.abs(C - xm.astype(np.float64) @ W.T.astype(np.float64)).max())
        if not mm() < 1e-4:
            terrs.append(["registered"])
        W[0, 0] += 100.0
        if not mm() < 1e-3:
            terrs.append(["stale twin used"])
        if api.mlx_steer_twin_unregister(7) != 1:
            terrs.append(["unregister"])

    np.savez(out + ".npz", **arrays)
    with open(out + ".json", "w") as fh:
        json.dump(info, fh)
''')


def _fast_env(blas: str = "auto") -> dict[str, str] | None:
    """The preload for `blas` (MLX_STEER_BLAS: auto, system or pypi), or None."""
    before = os.environ.get(fastpath.BLAS_ENV)
    os.environ[fastpath.BLAS_ENV] = blas
    try:
        env = fastpath.preload_env(shim=True)
    finally:
        if before is None:
            del os.environ[fastpath.BLAS_ENV]
        else:
            os.environ[fastpath.BLAS_ENV] = before
    if not env or fastpath.shim_path().name not in env["LD_PRELOAD"]:
        return None
    return {**env, fastpath.BLAS_ENV: blas}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if not sys.platform.startswith("linux"):
        pytest.skip("the fast CPU path is Linux-only")
    if fastpath.openblas() is None and fastpath.pypi_openblas() is None:
        pytest.skip("neither Debian's OpenBLAS (libopenblas0-pthread) nor scipy-openblas32")
    if fastpath.compiler() is None:
        pytest.skip("no C compiler to build the sgemv shim")
    fast = _fast_env()
    if fast is None:
        pytest.skip("the sgemv shim could not be built")
    # PyPI's OpenBLAS, as a user without Debian's gets it (Debian's set aside by the env)
    pypi = _fast_env("pypi") if fastpath.pypi_openblas() is not None else None
    mkl = _fast_env("mkl")  # only where `pip install mkl` put MKL in this environment
    if mkl is not None and "libmkl_rt" not in mkl["LD_PRELOAD"]:
        mkl = None
    d = tmp_path_factory.mktemp("fastpath")
    script = d / "child.py"
    script.write_text(CHILD)
    base_env = {k: v for k, v in os.environ.items()
                if k not in ("LD_PRELOAD", "MLX_STEER_SHIM_STATS")}
    base_env.setdefault("HF_HUB_OFFLINE", "1")
    out = {}
    stats = {**fast, "MLX_STEER_SHIM_STATS": "1"}
    configs = [("plain", {}), ("fast", stats),
               ("fast_f32", {**stats, "MLX_STEER_SHIM_TWINS": "0"})]
    if pypi is not None:
        configs.append(("pypi", {**pypi, "MLX_STEER_SHIM_STATS": "1"}))
    if mkl is not None:
        configs.append(("mkl", {**mkl, "MLX_STEER_SHIM_STATS": "1"}))
    for name, extra in configs:
        p = subprocess.run([sys.executable, str(script), str(d / name)],
                           env={**base_env, **extra}, capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 0, f"{name} child failed:\n{p.stderr[-3000:]}"
        info = json.loads((d / f"{name}.json").read_text())
        arrays = dict(np.load(d / f"{name}.npz"))
        out[name] = (info, arrays, p.stderr)
    return out


def _shim_counts(stderr: str) -> tuple[int, int, int, int]:
    """(one-row products, counting small ones kept in the shim; few-row; twins; sgemm)."""
    m = re.search(r"(\d+) one-row products sent to sgemv, (\d+) few-row products to the "
                  r"small kernel, (\d+) to quantised twins, (\d+) passed to sgemm, (\d+) "
                  r"small one-row products to the one-row kernel", stderr)
    assert m, stderr[-2000:]
    gemv, small, twin, gemm, row = map(int, m.groups())
    return gemv + row, small, twin, gemm


def test_preload_took_effect(runs):
    plain, fast = runs["plain"][0], runs["fast"][0]
    assert not plain["loaded"]["openblas"] and not plain["loaded"]["shim"]
    assert fast["loaded"]["openblas"] and fast["loaded"]["shim"] and fast["shim"]
    assert fast["loaded"]["tcmalloc"] == (fastpath.tcmalloc() is not None)
    gemv, small, twin, gemm = _shim_counts(runs["fast_f32"][2])
    assert gemv > 1000 and small > 100 and twin == 0 and gemm > 0  # decode rerouted, prefill not
    gemv, small, twin, gemm = _shim_counts(runs["fast"][2])
    if fast["twins"]:  # every weight matrix of the model read through its twin
        assert fast["model_twins"] == 7 * 30 + 1 and twin > 1000 and gemm > 0


def test_pypi_openblas_serves_mlx(runs):
    """Without Debian's OpenBLAS the shim forwards to PyPI's prefixed one."""
    if "pypi" not in runs:
        pytest.skip("scipy-openblas32 is not installed")
    info, _, stderr = runs["pypi"]
    assert info["loaded"]["pypi_openblas"] and info["loaded"]["openblas"] and info["shim"]
    assert "OpenBLAS from PyPI" in info["describe"]
    gemv, small, twin, gemm = _shim_counts(stderr)
    assert gemv > 1000 and gemm > 0  # both forwarded to scipy_cblas_*: the run finished


def test_mkl_serves_mlx(runs):
    if "mkl" not in runs:
        pytest.skip("the mkl wheel is not installed in this environment")
    info, _, stderr = runs["mkl"]
    assert info["loaded"]["mkl"] and info["shim"] and "MKL" in info["describe"]
    assert _shim_counts(stderr)[3] > 0  # prefill products reached MKL's sgemm


def test_quantised_twins_compute_exactly(runs):
    if not runs["fast"][0]["twins"]:
        pytest.skip("quantised twins need AVX-512")
    assert runs["fast"][0]["twin_errors"] == []


def test_shim_computes_every_layout(runs):
    assert runs["fast"][0]["sgemm_errors"] == []


@pytest.mark.parametrize("which", ["plain", "fast", "pypi", "mkl"])
def test_mlx_matmuls_exact(runs, which):
    if which not in runs:
        pytest.skip(f"{which}: that BLAS is not installed")
    arrays = runs[which][1]
    for k, d in arrays.items():
        if k.startswith("mm_"):
            assert np.abs(d).max() < 1e-4, (which, k)


@pytest.mark.parametrize("fast", ["fast", "fast_f32", "pypi", "mkl"])
def test_same_tokens(runs, fast):
    if fast not in runs:
        pytest.skip(f"{fast}: that BLAS is not installed")
    (p, _, _), (f, _, _) = runs["plain"], runs[fast]
    assert p["plain"] == f["plain"]
    assert p["steered"] == f["steered"]
    assert p["steered"] != p["plain"]  # the steer is strong enough to matter
    assert p["batch"] == f["batch"]
    assert p["batch"][0] == p["plain"][:6] and p["batch"][1] == p["steered"][:6]


@pytest.mark.parametrize("fast", ["fast", "fast_f32", "pypi", "mkl"])
def test_same_logprobs(runs, fast):
    if fast not in runs:
        pytest.skip(f"{fast}: that BLAS is not installed")
    p, f = runs["plain"][1], runs[fast][1]
    for k in ("plain", "steered", "batch_first", "logits"):
        assert p[k].shape == f[k].shape, k
        np.testing.assert_allclose(f[k], p[k], atol=ATOL, rtol=0, err_msg=k)


JIT_CHILD = textwrap.dedent(r"""
    import sys
    import numpy as np
    import mlx.core as mx
    mx.set_default_device(mx.cpu)  # the CPU path is what these children measure
    import mlx.nn as nn

    @mx.compile
    def swiglu(g, u):  # mlx-lm's compiled SwiGLU
        return nn.silu(g) * u

    @mx.compile
    def mix(a, b):  # exp, tanh, log1p, division and a broadcast in one fused kernel
        return nn.gelu_approx(a) + mx.log1p(mx.exp(-mx.abs(b))) / (1.0 + a * a) * b[0]

    @mx.compile
    def scaled(a, b):  # a strided input against a contiguous one
        return mx.sigmoid(a.T) * b

    @mx.compile
    def term(h, sel, delta):  # a steering term: h + sel * delta, cast to the stream's dtype
        return h + sel[..., None].astype(h.dtype) * delta.astype(h.dtype)

    rng = np.random.default_rng(3)
    g, u = (mx.array(rng.standard_normal((8, 1536)).astype(np.float32) * 6) for _ in "gu")
    # Values where exp's branches and the float edge cases meet: NaN, infinities, the +-88
    # cut-offs and their neighbours, signed zeros, subnormals, the largest floats; and a
    # wide sweep of magnitudes (the vectorised loop computes both sides of each branch).
    edge = np.array([np.nan, np.inf, -np.inf, 88.0, -88.0, 88.00001, -88.00001, 87.99999,
                     -87.99999, 0.0, -0.0, 1e-45, -1e-45, 1e-38, -1e-38, 3.4e38, -3.4e38,
                     0.5, -0.5, 1.0, -1.0, 20.0, -20.0], np.float32)
    sweep = (rng.standard_normal(16384) * 10.0 ** rng.uniform(-6, 2.3, 16384)).astype(np.float32)
    e = mx.array(np.concatenate([edge, sweep, -sweep]))
    ones = mx.ones_like(e)
    out = {"swiglu": swiglu(g, u), "swiglu_1": swiglu(g[:1], u[:1]),
           "swiglu_t": swiglu(g.T, u.T), "mix": mix(g, u),
           "scaled": scaled(g[:, :8], u[:8, :8]), "swiglu_edge": swiglu(e, ones),
           "swiglu_edge_u": swiglu(ones, e) * swiglu(e, e), "mix_edge": mix(e, e),
           "term": term(g[:, None], mx.array([True, False] * 4)[:, None],
                        u[:1, None].astype(mx.float16))}
    np.savez(sys.argv[1], **{k: np.array(v) for k, v in out.items()})
""")


def test_native_jit_kernels_bit_identical(tmp_path):
    """The shim compiles MLX's fused CPU kernels with -march=native (contraction off): each
    kernel computes bit for bit what MLX's own build does. Each child gets a fresh TMPDIR,
    since MLX reuses kernels cached there by name whatever flags built them."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the fast CPU path is Linux-only")
    if shutil.which("g++") is None:
        pytest.skip("no g++: MLX runs its compiled functions op by op")
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the rewrite is x86-64 only")
    fast = _fast_env()
    if fast is None:
        pytest.skip("the sgemv shim is not available")
    script = tmp_path / "jit.py"
    script.write_text(JIT_CHILD)
    base_env = {k: v for k, v in os.environ.items()
                if k not in ("LD_PRELOAD", "MLX_STEER_SHIM_STATS", "MLX_STEER_SHIM_NATIVE")}
    out, kernels = {}, {}
    for name, extra in (("plain", {}), ("native", {**fast, "MLX_STEER_SHIM_STATS": "1"})):
        tmp = tmp_path / f"tmp_{name}"
        tmp.mkdir()
        p = subprocess.run([sys.executable, str(script), str(tmp_path / f"{name}.npz")],
                           env={**base_env, **extra, "TMPDIR": str(tmp)},
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, f"{name} child failed:\n{p.stderr[-3000:]}"
        out[name] = dict(np.load(tmp_path / f"{name}.npz"))
        kernels[name] = sorted(f.name for f in tmp.glob("mlx/*/cpu/*.so"))
    assert kernels["plain"] and kernels["native"] == kernels["plain"]  # JIT took place
    m = re.search(r"(\d+) MLX kernel compilations given -march=native", p.stderr)
    assert m and int(m.group(1)) == len(kernels["native"]), p.stderr[-2000:]  # all of them
    for k, want in out["plain"].items():
        got = out["native"][k]
        assert got.dtype == want.dtype and got.shape == want.shape, k
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), k
    assert np.isnan(out["plain"]["swiglu_edge"]).any()  # the edge cases reached the kernels


POPEN_CHILD = textwrap.dedent(r"""
    import ctypes, json, sys
    libc = ctypes.CDLL(None)  # popen resolves to the preloaded shim's first
    libc.popen.restype = ctypes.c_void_p
    libc.popen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    libc.fgets.restype = ctypes.c_char_p
    libc.fgets.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_void_p]
    libc.pclose.argtypes = [ctypes.c_void_p]
    out = {}
    for cmd in sys.argv[1:]:
        f = libc.popen(cmd.encode(), b"r")
        buf = ctypes.create_string_buffer(4096)
        line = libc.fgets(buf, 4096, f)
        libc.pclose(f)
        out[cmd] = (line or b"").decode().strip()
    print(json.dumps(out))
""")


def test_popen_rewrites_only_mlx_compile_commands(tmp_path):
    """The shim inserts its flags right after MLX's exact compile prefix; any other command
    (another prefix, other flags) reaches the shell unchanged."""
    fast = _fast_env() if sys.platform.startswith("linux") else None
    if fast is None:
        pytest.skip("the sgemv shim is not available")
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the rewrite is x86-64 only")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "g++").write_text('#!/bin/sh\necho "g++ $*"\n')
    (fake / "g++").chmod(0o755)
    script = tmp_path / "popen.py"
    script.write_text(POPEN_CHILD)
    mlx_cmd = 'g++ -std=c++17 -O3 -Wall -fPIC -shared -I "inc" "k.cpp" -o "k.so" 2>&1'
    other = ["g++ -std=c++17 -O2 -Wall -fPIC -shared k.cpp", "echo g++ -std=c++17 -O3 -Wall",
             "g++ --version"]
    env = {**{k: v for k, v in os.environ.items() if k != "MLX_STEER_SHIM_NATIVE"}, **fast,
           "PATH": f"{fake}:{os.environ.get('PATH', '')}"}
    runs = {}
    for native in ("1", "0"):
        p = subprocess.run([sys.executable, str(script), mlx_cmd, *other],
                           env={**env, "MLX_STEER_SHIM_NATIVE": native}, capture_output=True,
                           text=True, timeout=60)
        assert p.returncode == 0, p.stderr[-2000:]
        runs[native] = json.loads(p.stdout)
    on, off = runs["1"], runs["0"]
    assert on[mlx_cmd] == ('g++ -std=c++17 -O3 -Wall -fPIC -shared -march=native '
                           '-ffp-contract=off -fno-trapping-math -finline-limit=1000 '
                           '-I inc k.cpp -o k.so')
    assert off[mlx_cmd] == 'g++ -std=c++17 -O3 -Wall -fPIC -shared -I inc k.cpp -o k.so'
    assert on["g++ -std=c++17 -O2 -Wall -fPIC -shared k.cpp"] == \
        "g++ -std=c++17 -O2 -Wall -fPIC -shared k.cpp"
    assert on["echo g++ -std=c++17 -O3 -Wall"] == "g++ -std=c++17 -O3 -Wall"
    assert on["g++ --version"] == "g++ --version"


POLICY_CHILD = textwrap.dedent(r"""
    import json, os
    import numpy as np
    import mlx.core as mx
    mx.set_default_device(mx.cpu)  # the CPU path is what these children measure
    rng = np.random.default_rng(0)
    x = mx.array(rng.standard_normal((8, 256)).astype(np.float32))
    w = mx.array(rng.standard_normal((512, 256)).astype(np.float32))
    mx.eval(x @ w.T)  # a few-row product large enough to start the shim's pool
    policies = []  # the main thread's first
    tids = sorted(os.listdir("/proc/self/task"), key=lambda t: (int(t) != os.getpid(), int(t)))
    for tid in tids:
        with open(f"/proc/self/task/{tid}/stat") as fh:
            policies.append(int(fh.read().rsplit(")", 1)[1].split()[38]))  # field 41
    print(json.dumps(policies))
""")


def test_pool_threads_run_at_idle_priority(tmp_path):
    """The shim's pool threads take a core only when no other thread wants it (SCHED_IDLE),
    unless MLX_STEER_SHIM_IDLE=0; no other thread of the process changes policy."""
    fast = _fast_env() if sys.platform.startswith("linux") else None
    if fast is None:
        pytest.skip("the sgemv shim is not available")
    script = tmp_path / "policy.py"
    script.write_text(POLICY_CHILD)
    env = {**{k: v for k, v in os.environ.items() if k != "MLX_STEER_SHIM_IDLE"}, **fast,
           "MLX_STEER_SHIM_THREADS": "2"}
    seen = {}
    for idle in ("1", "0"):
        p = subprocess.run([sys.executable, str(script)],
                           env={**env, "MLX_STEER_SHIM_IDLE": idle}, capture_output=True,
                           text=True, timeout=120)
        assert p.returncode == 0, p.stderr[-2000:]
        seen[idle] = json.loads(p.stdout)
    SCHED_OTHER, SCHED_IDLE = 0, 5
    assert seen["1"].count(SCHED_IDLE) == 1 and seen["1"][0] == SCHED_OTHER  # one worker
    assert set(seen["1"]) == {SCHED_OTHER, SCHED_IDLE}
    assert set(seen["0"]) == {SCHED_OTHER}


# ---- the module itself, without subprocesses ---------------------------------------

def test_off_on_macos(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert fastpath.preload_env() == {}
    assert fastpath.build() is None
    assert "not needed" in fastpath.describe()


def test_disabled_by_env(monkeypatch):
    monkeypatch.setenv(fastpath.DISABLE_ENV, "1")
    assert fastpath.preload_env() == {}


def test_no_compiler_falls_back_to_openblas(monkeypatch, tmp_path):
    monkeypatch.setattr(fastpath, "compiler", lambda: None)
    assert fastpath.build(tmp_path) is None
    blas = fastpath.openblas()
    env = fastpath.preload_env(dest=tmp_path)
    if blas is None:  # PyPI's OpenBLAS is of no use without the shim
        assert env == {}
    else:
        assert env["LD_PRELOAD"].split(":")[0] == str(blas)


def test_tcmalloc_last_and_optional(monkeypatch, tmp_path):
    if fastpath.openblas() is None or fastpath.tcmalloc() is None:
        pytest.skip("needs OpenBLAS and tcmalloc installed")
    libs = fastpath.preload_env(dest=tmp_path)["LD_PRELOAD"].split(":")
    assert libs[-1] == str(fastpath.tcmalloc())
    monkeypatch.setenv(fastpath.NO_TCMALLOC_ENV, "1")
    libs = fastpath.preload_env(dest=tmp_path)["LD_PRELOAD"].split(":")
    assert str(fastpath.openblas()) == libs[-1]


def test_stale_entries_are_replaced(monkeypatch, tmp_path):
    if fastpath.openblas() is None:
        pytest.skip("needs OpenBLAS")
    monkeypatch.setenv("LD_PRELOAD", f"/old/{fastpath.SHIM_NAME}-x.so:/opt/libfoo.so")
    libs = fastpath.preload_env(dest=tmp_path)["LD_PRELOAD"].split(":")
    assert "/opt/libfoo.so" == libs[-1]
    assert not any(p.startswith("/old/") for p in libs)


def test_no_openblas_means_nothing(monkeypatch):
    monkeypatch.setattr(fastpath, "openblas", lambda: None)
    monkeypatch.setattr(fastpath, "pypi_openblas", lambda: None)
    assert fastpath.preload_env() == {}


def test_blas_choice_by_env(monkeypatch, tmp_path):
    if fastpath.pypi_openblas() is None:
        pytest.skip("scipy-openblas32 is not installed")
    monkeypatch.setenv(fastpath.BLAS_ENV, "pypi")
    assert fastpath.openblas() is None
    libs = fastpath.preload_env(shim=False, dest=tmp_path)["LD_PRELOAD"].split(":")
    # the prefixed library needs the shim in front of it, even when asked for none
    assert fastpath.SHIM_NAME in libs[0] and libs[1] == str(fastpath.pypi_openblas())
    monkeypatch.setenv(fastpath.BLAS_ENV, "system")
    assert fastpath.pypi_openblas() is None


def test_mkl_is_opt_in(monkeypatch, tmp_path):
    """MKL is used only with MLX_STEER_BLAS=mkl, from this environment's lib/ (where the
    `mkl` wheel installs it); without it, that choice falls back to the others."""
    lib = tmp_path / "lib" / "libmkl_rt.so.3"
    lib.parent.mkdir()
    lib.write_bytes(b"")
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    assert fastpath.mkl() is None
    monkeypatch.setenv(fastpath.BLAS_ENV, "mkl")
    assert fastpath.mkl() == lib
    assert str(lib) in fastpath.preload_env(dest=tmp_path)["LD_PRELOAD"].split(":")
    lib.unlink()
    env = fastpath.preload_env(dest=tmp_path)
    want = fastpath.openblas() or fastpath.pypi_openblas()
    assert (env == {}) if want is None else str(want) in env["LD_PRELOAD"]


def test_bad_compiler_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", "false")
    assert fastpath.build(tmp_path, force=True) is None
    assert not list(tmp_path.glob("*.tmp"))


def test_build(tmp_path):
    if not sys.platform.startswith("linux") or fastpath.compiler() is None:
        pytest.skip("needs Linux and a C compiler")
    so = fastpath.build(tmp_path)
    assert so is not None and so.is_file() and so.parent == tmp_path
    assert fastpath.build(tmp_path) == so  # reused


def test_status_names_what_make_preloads(monkeypatch, capsys, tmp_path):
    """`--status` (run by `make setup`, itself not preloaded) says what `make app` / `make
    test` will run with: here PyPI's OpenBLAS, with Debian's set aside."""
    if fastpath.pypi_openblas() is None or fastpath.compiler() is None:
        pytest.skip("needs scipy-openblas32 and a C compiler")
    monkeypatch.setenv(fastpath.BLAS_ENV, "pypi")
    monkeypatch.setattr(fastpath, "active", lambda: False)  # as in `make setup`
    assert fastpath._main(["--status", "--dest", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "fast CPU path: OpenBLAS from PyPI (scipy-openblas32) + sgemv shim" in out
