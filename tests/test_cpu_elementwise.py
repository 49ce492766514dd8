"""RMSNorm, SwiGLU's activation and rope through csrc/elementwise.c (layers/cpu_elementwise.py),
in fp32 and bf16, and the MLP's row tiles on the CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flashserve.layers import cpu_elementwise
from flashserve.layers.mlp import MLP
from flashserve.layers.norm import RMSNorm
from tests.portable_builds import without_avx512


@pytest.fixture(autouse=True)
def _inference() -> None:
    with torch.inference_mode():
        yield


def _torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def test_the_kernels_build() -> None:
    assert cpu_elementwise.KERNELS.load() is not None, cpu_elementwise.KERNELS.load_failed


@pytest.mark.parametrize("rows", [1, 5, 64, 700])
def test_rms_norm_matches_torch_and_a_row_alone(rows: int) -> None:
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 520, generator=g) * 3
    weight = torch.randn(520, generator=g)
    got = cpu_elementwise.rms_norm(x, weight, 1e-6)
    assert got is not None
    torch.testing.assert_close(got, _torch_rms_norm(x, weight, 1e-6), rtol=1e-5, atol=1e-5)
    alone = torch.cat([cpu_elementwise.rms_norm(x[i : i + 1], weight, 1e-6) for i in range(rows)])
    assert torch.equal(got, alone)


def test_silu_mul_matches_torch_over_the_whole_range() -> None:
    gate = torch.cat([torch.linspace(-120, 120, 4001), torch.tensor([0.0, -0.0, 1e-30, -1e-30])])
    gate = torch.cat([gate, torch.randn(4096 - gate.numel()) * 4])
    up = torch.randn(4096)
    gate_up = torch.cat([gate, up])[None, :].repeat(3, 1)
    got = cpu_elementwise.silu_mul(gate_up)
    assert got is not None and torch.isfinite(got).all()
    torch.testing.assert_close(got, (F.silu(gate) * up).expand(3, -1), rtol=2e-6, atol=1e-7)
    assert torch.equal(got[0], cpu_elementwise.silu_mul(gate_up[:1])[0])


def test_a_strided_input_and_other_dtypes_keep_torch() -> None:
    x = torch.randn(4, 3, 64)
    assert cpu_elementwise.rms_norm(x, torch.ones(64), 1e-6) is None  # 3-D: q/k norms
    # A weight in another dtype than x: torch's result would be in the wider one.
    assert cpu_elementwise.rms_norm(x[0].bfloat16(), torch.ones(64), 1e-6) is None
    assert cpu_elementwise.silu_mul(torch.randn(2, 32).half()) is None
    assert cpu_elementwise.silu_mul(torch.randn(2, 12)) is None  # 6 columns: not whole lanes
    norm = RMSNorm(64, 1e-6)
    torch.testing.assert_close(norm(x), _torch_rms_norm(x, norm.weight, 1e-6))


def test_the_layers_give_the_torch_results() -> None:
    torch.manual_seed(0)
    mlp = MLP(64, 96)
    for p in mlp.parameters():
        p.copy_(torch.randn_like(p) * 0.1)
    x = torch.randn(7, 64)
    fused = mlp(x)
    cpu_elementwise.enabled = False
    try:
        plain = mlp(x)
    finally:
        cpu_elementwise.enabled = True
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("partial,head_dim", [(1.0, 64), (0.5, 64), (1.0, 40)])
def test_rope_in_place_is_forward_bit_for_bit(partial, head_dim, dtype) -> None:
    """On views of a packed q|k|v product (strided rows), partial rotary included, and
    halves of 20 dims (8 columns at a time, then 4 alone)."""
    from flashserve.layers.rotary import RotaryEmbedding

    rope = {"rope_theta": 10000.0, "partial_rotary_factor": partial}
    rotary = RotaryEmbedding(rope, head_dim=head_dim, max_positions=512)
    heads, kv_heads, rows, d = 6, 2, 37, head_dim
    qkv = (torch.randn(rows, (heads + 2 * kv_heads) * d) * 4).to(dtype)
    positions = torch.randint(0, 512, (rows,))
    q = qkv[:, : heads * d].view(rows, heads, d)
    k = qkv[:, heads * d : (heads + kv_heads) * d].view(rows, kv_heads, d)
    expected_q, expected_k = rotary(positions, q, k)
    v_before = qkv[:, (heads + kv_heads) * d :].clone()
    got_q, got_k = rotary.rotate_in_place(positions, q, k)
    assert got_q.data_ptr() == q.data_ptr(), "the kernel took the views"
    assert torch.equal(got_q, expected_q) and torch.equal(got_k, expected_k)
    assert torch.equal(qkv[:, (heads + kv_heads) * d :], v_before)


def test_rope_at_a_position_past_the_table_is_an_error_not_a_wild_read() -> None:
    from flashserve.layers.rotary import RotaryEmbedding

    rotary = RotaryEmbedding({"rope_theta": 10000.0}, head_dim=64, max_positions=16)
    q, k = torch.randn(2, 4, 64), torch.randn(2, 2, 64)
    with pytest.raises(IndexError):
        rotary.rotate_in_place(torch.tensor([3, 16]), q, k)


# One bf16 step: results within one rounding of torch's (its exp and its order of the
# mean's sum are not ours).
BF16_ULP = 2.0**-7


def _without_kernels(fn):
    cpu_elementwise.enabled = False
    try:
        return fn()
    finally:
        cpu_elementwise.enabled = True


@pytest.mark.parametrize("rows", [1, 64, 700])
def test_bf16_rms_norm_is_the_layers_torch_path_and_a_row_alone(rows: int) -> None:
    g = torch.Generator().manual_seed(rows)
    norm = RMSNorm(520, 1e-5).to(torch.bfloat16)
    norm.weight.copy_(torch.randn(520, generator=g))
    x = (torch.randn(rows, 520, generator=g) * 3).bfloat16()
    got = cpu_elementwise.rms_norm(x, norm.weight, 1e-5)
    assert got is not None and got.dtype == torch.bfloat16
    want = _without_kernels(lambda: norm(x))
    torch.testing.assert_close(got.float(), want.float(), rtol=BF16_ULP, atol=0)
    assert (got == want).float().mean() > 0.99
    alone = torch.cat(
        [cpu_elementwise.rms_norm(x[i : i + 1], norm.weight, 1e-5) for i in range(rows)]
    )
    assert torch.equal(got, alone)


def test_bf16_silu_mul_rounds_silu_then_the_product_as_torch_does() -> None:
    gate = torch.cat([torch.linspace(-120, 120, 4001), torch.tensor([0.0, -0.0, 1e-30, -1e-30])])
    gate = torch.cat([gate, torch.randn(4096 - gate.numel()) * 4]).bfloat16()
    up = torch.randn(4096).bfloat16()
    gate_up = torch.cat([gate, up])[None, :].repeat(3, 1)
    got = cpu_elementwise.silu_mul(gate_up)
    assert got is not None and got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    want = F.silu(gate) * up
    torch.testing.assert_close(got[0].float(), want.float(), rtol=BF16_ULP, atol=1e-30)
    assert (got[0] == want).float().mean() > 0.98
    assert torch.equal(got[0], got[2])
    assert torch.equal(got[0], cpu_elementwise.silu_mul(gate_up[:1])[0])


def test_bf16_nan_and_infinities_come_out_as_torch_writes_them() -> None:
    """Same bits as the torch path, NaN where it has NaN (whose payload bits vary in torch)."""
    from flashserve.layers.rotary import RotaryEmbedding

    rotary = RotaryEmbedding({"rope_theta": 10000.0}, head_dim=16, max_positions=8)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 3.0e38, -0.0, 1e-40])
    q = torch.randn(5, 2, 16)
    q.view(-1)[: special.numel() * 8 : 8] = special
    q = q.bfloat16()
    k = q[:, :1].clone()
    positions = torch.tensor([0, 1, 3, 5, 7])
    for want, got in zip(rotary(positions, q, k), rotary.rotate_in_place(positions, q, k)):
        assert torch.equal(got.isnan(), want.isnan()) and want.isnan().any()
        numbers = ~want.isnan()
        assert torch.equal(got[numbers].view(torch.int16), want[numbers].view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_mlp_on_many_rows_gives_each_row_what_it_gives_alone(monkeypatch, dtype) -> None:
    """A prefill's rows go through the MLP in tiles; no row's bits depend on its tile."""
    from flashserve.layers import mlp as mlp_module

    torch.manual_seed(0)
    mlp = MLP(64, 96).to(dtype)
    for p in mlp.parameters():
        p.copy_(torch.randn_like(p) * 0.1)
    x = torch.randn(37, 64).to(dtype)
    whole = mlp(x)
    monkeypatch.setattr(mlp_module, "CPU_ROW_TILE", 8)
    tiled = mlp(x)
    assert torch.equal(whole, tiled)
    assert torch.equal(whole[30:31], mlp(x[30:31]))


@pytest.fixture(scope="module")
def portable_kernels(tmp_path_factory):
    """elementwise.c built without AVX-512: its 8-lane path everywhere."""
    return without_avx512(cpu_elementwise.KERNELS, tmp_path_factory.mktemp("portable"))


@pytest.mark.parametrize("build", ["native", "portable"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [8, 24, 1536])  # 16-float vectors where AVX-512 is, 8 after
def test_silu_mul_over_widths_and_builds(request, monkeypatch, build, dtype, width) -> None:
    if build == "portable":
        monkeypatch.setattr(cpu_elementwise, "KERNELS", request.getfixturevalue("portable_kernels"))
    g = torch.Generator().manual_seed(width)
    gate_up = (torch.randn(5, 2 * width, generator=g) * 6).to(dtype)
    got = cpu_elementwise.silu_mul(gate_up)
    gate, up = gate_up.split(width, dim=-1)
    want = F.silu(gate) * up
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-7)
    else:
        torch.testing.assert_close(got.float(), want.float(), rtol=BF16_ULP, atol=1e-30)
    assert torch.equal(got[3], cpu_elementwise.silu_mul(gate_up[3:4])[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,width", [(1, 512), (5, 520), (64, 24), (33, 4096)])
def test_add_rms_norm_is_the_add_then_the_norm_bit_for_bit(dtype, rows, width) -> None:
    """The residual add fused into RMSNorm's pass: the sum torch's add gives (rounded to
    bf16 once) and the norm of it, for odd row counts (rows go two at a time) and widths
    with an 8-lane tail; from strided rows too (a slice of a wider tensor)."""
    g = torch.Generator().manual_seed(rows * width)
    x = (torch.randn(rows, width + 8, generator=g) * 3).to(dtype)[:, :width]
    residual = (torch.randn(rows, width, generator=g) * 3).to(dtype)
    weight = torch.randn(width, generator=g).to(dtype)
    fused = cpu_elementwise.add_rms_norm(x, residual, weight, 1e-6)
    assert fused is not None
    total, normed = fused
    assert torch.equal(total, x + residual)
    assert torch.equal(normed, cpu_elementwise.rms_norm(x + residual, weight, 1e-6))
    alone = [
        cpu_elementwise.add_rms_norm(x[i : i + 1], residual[i : i + 1], weight, 1e-6)
        for i in range(rows)
    ]
    assert torch.equal(normed, torch.cat([a[1] for a in alone]))
    norm = RMSNorm(width, 1e-6).to(dtype)
    norm.weight.copy_(weight)
    cpu_elementwise.enabled = False
    try:
        plain_total, plain_normed = norm.add_and_norm(x, residual)
    finally:
        cpu_elementwise.enabled = True
    assert torch.equal(plain_total, total)
    # torch's mean sums in another order: the last bit may differ.
    tolerance = dict(rtol=BF16_ULP, atol=0) if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(plain_normed.float(), normed.float(), **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_wide_rms_norm_is_the_8_lane_builds_bits(request, monkeypatch, dtype) -> None:
    """AVX-512 takes 16 columns at a time and two rows at once: each row still sums its
    squares in the 8-lane build's order, so both builds give the same bits."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(9, 520, generator=g) * 3).to(dtype)
    residual = torch.randn(9, 520, generator=g).to(dtype)
    weight = torch.randn(520, generator=g).to(dtype)
    wide = cpu_elementwise.add_rms_norm(x, residual, weight, 1e-5)
    plain = cpu_elementwise.rms_norm(x, weight, 1e-5)
    monkeypatch.setattr(cpu_elementwise, "KERNELS", request.getfixturevalue("portable_kernels"))
    portable = cpu_elementwise.add_rms_norm(x, residual, weight, 1e-5)
    assert torch.equal(portable[0], wide[0]) and torch.equal(portable[1], wide[1])
    assert torch.equal(cpu_elementwise.rms_norm(x, weight, 1e-5), plain)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv_is_index_copy_and_checks_its_slots(dtype) -> None:
    """Keys and values from views of a packed q|k|v product into their slots: what
    write_kv's index_copy_ writes; a slot out of range writes nothing (torch then raises)."""
    from flashserve.layers.attention import write_kv

    g = torch.Generator().manual_seed(1)
    rows, kv_heads, d = 9, 2, 64
    qkv = torch.randn(rows, 8 * d, generator=g).to(dtype)
    k = qkv[:, 4 * d : 6 * d].view(rows, kv_heads, d)
    v = qkv[:, 6 * d :].view(rows, kv_heads, d)
    caches = [torch.zeros(5, 4, kv_heads, d, dtype=dtype) for _ in range(4)]
    slots = torch.randperm(20, generator=g)[:rows]
    assert cpu_elementwise.store_kv(k, v, caches[0], caches[1], slots)
    caches[2].view(-1, kv_heads, d).index_copy_(0, slots, k)
    caches[3].view(-1, kv_heads, d).index_copy_(0, slots, v)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    wild = slots.clone()
    wild[-1] = 20
    assert not cpu_elementwise.store_kv(k, v, caches[0], caches[1], wild)
    assert torch.equal(caches[0], caches[2])
    with pytest.raises(IndexError):
        write_kv(k, v, caches[0], caches[1], wild)
    # Another dtype than the cache's: torch converts.
    assert not cpu_elementwise.store_kv(k.double(), v.double(), caches[0], caches[1], slots)
