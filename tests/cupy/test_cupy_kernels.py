"""Every CUDA kernel of the CuPy backend, run on the CPU through the host shim, against a float64 reference.

The shim compiles the very .cu files CuPy compiles on a GPU (tests/cupy/cuda_shim). Shapes are small and odd on purpose:
K % r != 0, r = 1, M and N not multiples of any tile, strided and transposed inputs; each test asserts which
instantiation ran (vectorised or scalar, tile), so a path cannot silently go untested.
"""

from __future__ import annotations

import pytest
import torch

from bonekern.backends.cupy import host
from bonekern.backends.cupy.sources import KERNEL_FILES, TYPE_PAIRS, kernel_names, type_pair
from tests.cupy import cuda_shim
from tests.support import assert_close_to_reference

PAIR_IDS = [type_pair(*pair) for pair in TYPE_PAIRS]


@pytest.fixture(scope="module")
def shim() -> cuda_shim.ShimLauncher:
    return cuda_shim.install()


def last(shim: cuda_shim.ShimLauncher, n: int = 1) -> list[str]:
    return list(shim.history)[-n:]


def rand(*shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def ref_group_sum(x: torch.Tensor, width: int) -> torch.Tensor:
    m, cols = x.shape
    groups = -(-cols // width)
    padded = torch.zeros(m, groups * width, dtype=torch.float64)
    padded[:, :cols] = x.double()
    return padded.view(m, groups, width).sum(1)


def test_shim_builds_every_kernel(shim):
    for source in KERNEL_FILES:
        assert sorted(shim.libraries()[source].kernels) == sorted(kernel_names(source))


# ----------------------------------------------------------------------------------------------------------------
# group_sum: Bone's S, mini's fold of dY, and the widening copy
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pair", TYPE_PAIRS, ids=PAIR_IDS)
def test_group_sum_all_type_pairs(shim, pair):
    storage, acc = pair
    x = rand(7, 40, dtype=storage)
    for width, vector in ((8, True), (8, False), (5, True), (40, True)):
        s = host.group_sum(x, width, acc, vector=vector)
        assert s.dtype == acc and s.shape == (7, width)
        expected_variant = "vec16" if vector and width % (16 // x.element_size()) == 0 else "scalar"
        assert last(shim) == [f"bk_group_sum_{type_pair(storage, acc)}_{expected_variant}"]
        assert_close_to_reference(s, ref_group_sum(x, width), acc, f"group_sum width {width}")


@pytest.mark.parametrize(
    ("m", "cols", "width", "threads"),
    [
        (5, 20, 8, 0),  # K % r != 0: the last group is zero-padded
        (3, 17, 1, 0),  # r = 1: a row sum
        (9, 33, 33, 0),  # r = K: one group
        (2, 3, 7, 0),  # r > K (a widening copy that pads)
        (33, 48, 3, 32),  # several blocks of 8 rows, the last one partial
        (4, 600, 300, 32),  # more units than threads per row: each thread owns columns
        (4, 64, 16, 256),  # 16 lanes share each column
        (1, 96, 12, 128),
    ],
)
def test_group_sum_shapes(shim, m, cols, width, threads):
    x = rand(m, cols)
    s = host.group_sum(x, width, torch.float32, threads_per_row=threads)
    assert_close_to_reference(s, ref_group_sum(x, width), torch.float32, f"group_sum {m}x{cols} r={width}")


def test_group_sum_strided_and_transposed(shim):
    base = rand(12, 50)
    cases = {
        "column stride 2": base[:, ::2],  # 12 x 25
        "row stride > cols": base[:, 3:43],  # unaligned start: scalar path
        "transposed": base.t(),  # stride (1, 50)
        "expanded": torch.ones(6, 1).expand(6, 20),  # stride 0, as autograd gives for sum().backward()
    }
    for what, x in cases.items():
        s = host.group_sum(x, 4, torch.float32)
        assert last(shim)[0].endswith("_scalar"), what
        assert_close_to_reference(s, ref_group_sum(x, 4), torch.float32, what)
    aligned = base[:, :40]  # row stride 50 is not a multiple of 4 floats: must not vectorise
    host.group_sum(aligned, 4, torch.float32)
    assert last(shim)[0].endswith("_scalar")
    padded = rand(12, 52)[:, :48]  # row stride 52 floats = 208 bytes, 16-byte aligned: vectorises
    s = host.group_sum(padded, 8, torch.float32)
    assert last(shim)[0].endswith("_vec16")
    assert_close_to_reference(s, ref_group_sum(padded, 8), torch.float32, "aligned view")


def test_group_sum_propagates_nan_and_inf(shim):
    x = rand(3, 12)
    x[0, 5] = float("nan")
    x[1, 2] = float("inf")
    s = host.group_sum(x, 4, torch.float32)
    assert s[0, 1].isnan() and s[1, 2] == float("inf")
    assert torch.isfinite(s[2]).all()


# ----------------------------------------------------------------------------------------------------------------
# bone_add_adapter: y += S D (mini: D repeated) and bone_add_grouped: dx += T[:, k % r]
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pair", TYPE_PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("tile", ["t64x64", "t32x32"])
def test_add_adapter(shim, pair, tile):
    storage, acc = pair
    for m, n, r, cols in ((5, 12, 3, 12), (65, 66, 17, 33), (1, 8, 1, 2), (34, 40, 40, 40)):
        y = rand(m, n, dtype=storage, seed=1)
        s, d = rand(m, r, dtype=acc, seed=2), rand(r, cols, dtype=acc, seed=3)
        expected = y.double() + s.double() @ d.double().repeat(1, n // cols)
        out = host.add_adapter_(y, s, d, tile=tile)
        assert out is y and last(shim) == [f"bk_bone_add_adapter_{type_pair(storage, acc)}_{tile}"]
        assert_close_to_reference(y, expected, storage, f"add_adapter m={m} n={n} r={r} C={cols}")


def test_add_adapter_into_a_row_strided_view(shim):
    wide = rand(9, 30)
    before = wide.clone()
    y = wide[:, 5:25]  # (9, 20), row stride 30
    s, d = rand(9, 4, seed=1), rand(4, 10, seed=2)
    host.add_adapter_(y, s, d, tile="t32x32")
    expected = before.double()
    expected[:, 5:25] += s.double() @ d.double().repeat(1, 2)
    assert_close_to_reference(wide, expected, torch.float32, "strided y (and its untouched neighbours)")


@pytest.mark.parametrize("pair", TYPE_PAIRS, ids=PAIR_IDS)
def test_add_grouped(shim, pair):
    storage, acc = pair
    v = 16 // torch.empty(0, dtype=storage).element_size()
    for m, k, r in ((3, 20, 8), (4, 17, 1), (2, 9, 9), (5, 4 * v, v), (3, 2 * v, 2 * v)):
        dx = rand(m, k, dtype=storage, seed=4)
        t = rand(m, r, dtype=acc, seed=5)
        expected = dx.double() + t.double().repeat(1, -(-k // r))[:, :k]
        host.add_grouped_(dx, t)
        variant = "vec16" if k % v == 0 and r % v == 0 else "scalar"
        assert last(shim) == [f"bk_bone_add_grouped_{type_pair(storage, acc)}_{variant}"]
        assert_close_to_reference(dx, expected, storage, f"add_grouped m={m} k={k} r={r}")


def test_add_grouped_grid_stride_loop(shim, monkeypatch):
    monkeypatch.setattr(host, "MAX_GRID_STRIDE_BLOCKS", 2)  # 2 blocks of 256 threads loop over 37 * 40 / 4
    for vector in (True, False):
        dx, t = rand(37, 40), rand(37, 8, seed=1)
        expected = dx.double() + t.double().repeat(1, 5)
        host.add_grouped_(dx, t, vector=vector)
        assert last(shim)[0].endswith("vec16" if vector else "scalar")
        assert_close_to_reference(dx, expected, torch.float32, f"grid-stride add_grouped vector={vector}")


# ----------------------------------------------------------------------------------------------------------------
# Bat: W' = W B + W + B per r x r block, and the W part of dB_i, sum_j W_ij^T G_ij
# ----------------------------------------------------------------------------------------------------------------


def blocks_of(w: torch.Tensor, r: int) -> torch.Tensor:
    """(N, K) -> Wb[i, p, j, q] = W[i*r + p, j*r + q]."""
    n, k = w.shape
    return w.reshape(n // r, r, k // r, r)


def ref_bat_weight(w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    r = b.shape[-1]
    wb = blocks_of(w.double(), r)
    out = torch.einsum("ipjs,isq->ipjq", wb, b.double()) + wb + b.double()[:, :, None, :]
    return out.reshape(w.shape)


def ref_bat_block_grad(g: torch.Tensor, w: torch.Tensor, r: int) -> torch.Tensor:
    return torch.einsum("ipjs,ipjq->isq", blocks_of(w.double(), r), blocks_of(g.double(), r))


@pytest.mark.parametrize("pair", TYPE_PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("tile", ["t64x64", "t128x16"])
def test_bat_weight(shim, pair, tile):
    storage, acc = pair
    for count, r, groups in ((3, 4, 5), (2, 1, 7), (1, 17, 2), (2, 33, 3)):
        w = rand(count * r, groups * r, dtype=storage, seed=6)
        b = rand(count, r, r, dtype=acc, seed=7) * r**-0.5
        out = host.bat_weight_(torch.empty_like(w), w, b, tile=tile)
        assert last(shim) == [f"bk_bat_weight_{type_pair(storage, acc)}_{tile}"]
        assert_close_to_reference(out, ref_bat_weight(w, b), storage, f"bat_weight c={count} r={r} K/r={groups}")


@pytest.mark.parametrize("pair", TYPE_PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("tile", ["t64x64", "t32x32"])
def test_bat_block_grad(shim, pair, tile):
    storage, acc = pair
    for count, r, groups, splits in ((3, 4, 5, 1), (2, 1, 40, 3), (1, 17, 2, 2), (2, 33, 3, 1)):
        w = rand(count * r, groups * r, dtype=storage, seed=8)
        g = rand(count * r, groups * r, dtype=acc, seed=9)
        db = host.bat_block_grad(g, w, r, splits=splits, tile=tile)
        assert last(shim) == [f"bk_bat_block_grad_{type_pair(storage, acc)}_{tile}"]
        assert db.shape == (count, r, r) and db.dtype == acc
        assert_close_to_reference(db, ref_bat_block_grad(g, w, r), acc, f"dB c={count} r={r} splits={splits}")


def test_bat_block_grad_splits_agree(shim):
    """Splitting the K reduction (including more splits than 16-row steps allow) changes nothing but rounding."""
    w, g = rand(8, 96, seed=10), rand(8, 96, seed=11)
    want = ref_bat_block_grad(g, w, 4)
    for splits in (1, 2, 5, 6, 100):
        db = host.bat_block_grad(g, w, 4, splits=splits, tile="t32x32")
        assert_close_to_reference(db, want, torch.float32, f"splits={splits}")


# ----------------------------------------------------------------------------------------------------------------
# The 16-bit conversions the kernels use (software in the shim; PTX cvt for fp16 on the GPU), against torch
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_widening_is_exact_for_every_16_bit_value(shim, dtype):
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).reshape(256, 256)
    for acc in (torch.float32, torch.float64):
        wide = host.group_sum(bits, 256, acc)  # one group: a widening copy
        expected = bits.to(acc)
        assert torch.equal(wide.isnan(), expected.isnan())
        finite = ~expected.isnan()
        assert torch.equal(wide[finite], expected[finite]), f"{dtype} -> {acc}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_rounding_to_16_bits_matches_torch(shim, dtype):
    g = torch.Generator().manual_seed(12)
    random_bits = torch.randint(-(2**31), 2**31 - 1, (60000,), generator=g, dtype=torch.int64).to(torch.int32)
    # exact halfway cases between neighbouring 16-bit values (ties to even, both parities)
    patterns = torch.arange(0, 2**15 - 1, 7, dtype=torch.int32).to(torch.int16)
    low, high = patterns.view(dtype).double(), (patterns + 1).view(dtype).double()
    halves = ((low + high) / 2).float()  # exact: one more mantissa bit than the 16-bit type
    edges = torch.tensor(
        [0.0, -0.0, 65504.0, 65519.99, 65520.0, 1e-8, 2.0**-24, 2.0**-25, 3 * 2.0**-26, 3e38, float("inf"), -1e-40],
        dtype=torch.float32,
    )
    values = torch.cat([random_bits.view(torch.float32), halves[torch.isfinite(halves)], edges, -edges])
    t = torch.nn.functional.pad(values, (0, -values.numel() % 8)).reshape(-1, 8)
    out = torch.zeros(t.shape, dtype=dtype)
    host.add_grouped_(out, t)  # out = round(0 + t)
    expected = (t + 0.0).to(dtype)
    assert torch.equal(out.isnan(), expected.isnan())
    finite = ~expected.isnan()
    assert torch.equal(out[finite].view(torch.int16), expected[finite].view(torch.int16))


# ----------------------------------------------------------------------------------------------------------------
# What the shim checks on the host side: argument types, launch geometry, in-kernel BK_CHECKs
# ----------------------------------------------------------------------------------------------------------------


def test_shim_rejects_wrong_arguments_and_geometry(shim):
    x, out = rand(4, 8), torch.empty(4, 4)
    name = "bk_group_sum_f32_f32_scalar"
    ok_args = (x, out, 4, 8, 8, 1, 4)
    shim.launch("group_sum.cu", name, (1, 1, 1), (32, 8, 1), ok_args, torch.device("cpu"))
    assert_close_to_reference(out, ref_group_sum(x, 4), torch.float32, "direct launch")
    with pytest.raises(TypeError, match=r"got a torch\.float64 tensor"):
        shim.launch("group_sum.cu", name, (1, 1, 1), (32, 8, 1), (x.double(), *ok_args[1:]), torch.device("cpu"))
    with pytest.raises(TypeError, match="takes 7 arguments"):
        shim.launch("group_sum.cu", name, (1, 1, 1), (32, 8, 1), ok_args[:-1], torch.device("cpu"))
    with pytest.raises(TypeError, match="got the integer"):
        shim.launch("group_sum.cu", name, (1, 1, 1), (32, 8, 1), (4, *ok_args[1:]), torch.device("cpu"))
    with pytest.raises(RuntimeError, match="check failed inside the kernel"):
        shim.launch("group_sum.cu", name, (1, 1, 1), (32, 4, 1), ok_args, torch.device("cpu"))  # 128 threads
    with pytest.raises(RuntimeError, match="exceeds CUDA's limits"):
        shim.launch("group_sum.cu", name, (1, 70000, 1), (32, 8, 1), ok_args, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="more than 1024 threads"):
        shim.launch("group_sum.cu", name, (1, 1, 1), (64, 32, 1), ok_args, torch.device("cpu"))
    with pytest.raises(KeyError):
        shim.launch("group_sum.cu", "bk_group_sum_f32_f16_scalar", (1, 1, 1), (32, 8, 1), ok_args, torch.device("cpu"))


def test_signatures_match_host_arguments(shim):
    """The parameter lists the host passes (tensor dtypes, ints) are the kernels' own, for every instantiation."""
    for source in KERNEL_FILES:
        for name, (_, signature) in shim.libraries()[source].kernels.items():
            assert "?" not in signature, f"{name}: a parameter type the launcher cannot pass ({signature})"
            pointer_params = [c for c in signature if c.isupper()]
            assert pointer_params and set(signature) <= set("HBFDq"), f"{name}: {signature}"
