"""bitpack, byte_shuffle, lzma, lqer and self_generated_calibration against plain references."""

from __future__ import annotations

import lzma as std_lzma

import numpy as np
import pytest
import torch
from runs import VOCAB, tiny_stack

from pgolf.registry import PgolfError
from pgolf.registry.run.pipeline import build
from pgolf.techniques.bitpack import BitpackParams, deserialize, pack_bits, serialize, unpack_bits
from pgolf.techniques.byte_shuffle import shuffle, unshuffle
from pgolf.techniques.lqer import LQERParams, correction, fit
from pgolf.techniques.lzma import Lzma, LzmaParams
from pgolf.techniques.self_generated_calibration import SelfGeneratedCalibration, generate


def pack_reference(values: list[int], bits: int, planes: bool) -> bytes:
    """Bit strings written out by hand: least significant bit first, 8 bits a byte."""
    if planes:
        stream = "".join(
            "".join(str((v >> k) & 1) for v in values).ljust(-(-len(values) // 8) * 8, "0")
            for k in range(bits)
        )
    else:
        stream = "".join(str((v >> k) & 1) for v in values for k in range(bits))
        stream = stream.ljust(-(-len(stream) // 8) * 8, "0")
    return bytes(int(stream[i : i + 8][::-1], 2) for i in range(0, len(stream), 8))


@pytest.mark.parametrize("planes", [False, True])
@pytest.mark.parametrize(("bits", "n"), [(1, 13), (3, 8), (5, 37), (6, 4100), (7, 9)])
def test_pack_bits_writes_each_value_in_its_bits(bits: int, n: int, planes: bool) -> None:
    v = np.random.default_rng(bits * n).integers(0, 2**bits, n)
    got = pack_bits(v, bits, planes)
    assert got == pack_reference(v.tolist(), bits, planes)
    assert len(got) == (bits * ((n + 7) // 8) if planes else (n * bits + 7) // 8)
    assert unpack_bits(got, n, bits, planes).tolist() == v.tolist()


@pytest.mark.parametrize("codes", ["packed", "planes", "bytes"])
@pytest.mark.parametrize("floats", ["bytes", "planes"])
def test_bitpack_round_trips_any_tree_of_tensors_exactly(codes: str, floats: str) -> None:
    g = torch.Generator().manual_seed(0)
    tree = {
        "format": "x", "n": 3, "f": 0.1 + 0.2, "none": None, "flag": True,
        "int6": torch.randint(-31, 32, (70, 110), generator=g, dtype=torch.int8),
        "int5": torch.randint(-15, 16, (33,), generator=g).to(torch.int8),
        "offset": torch.tensor([1000, 1003, 1001], dtype=torch.int32),
        "const": torch.full((5,), -4, dtype=torch.int8),
        "empty": torch.zeros(0, 3, dtype=torch.int8),
        "fp16": torch.randn(4, 5, generator=g).half(), "bf16": torch.randn(3, generator=g).bfloat16(),
        "fp32": torch.tensor([float("inf"), -0.0, 1e-45]), "bool": torch.tensor([True, False, True]),
        "nested": [{"a": torch.arange(6, dtype=torch.int64).reshape(2, 3)}, "s", 2],
    }  # fmt: skip
    blob = serialize(tree, BitpackParams(codes=codes, floats=floats))  # type: ignore[arg-type]
    back = deserialize(blob)

    def same(a: object, b: object) -> None:
        if isinstance(a, torch.Tensor):
            assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
            assert torch.equal(a.view(torch.uint8) if a.is_floating_point() else a,
                               b.view(torch.uint8) if b.is_floating_point() else b)  # fmt: skip
        elif isinstance(a, dict):
            assert isinstance(b, dict) and set(a) == set(b)
            for k in a:
                same(a[k], b[k])
        elif isinstance(a, list):
            assert isinstance(b, list) and len(a) == len(b)
            for x, y in zip(a, b, strict=True):
                same(x, y)
        else:
            assert a == b and type(a) is type(b)

    same(tree, back)
    if codes != "bytes":  # int6 codes take 6 bits: 7,700 values in 5,775 bytes
        assert len(blob) < len(serialize(tree, BitpackParams(codes="bytes", floats=floats)))  # type: ignore[arg-type]


def test_bitpack_refuses_data_that_is_not_its_format() -> None:
    with pytest.raises(PgolfError):
        deserialize(b"PK\x03\x04 a zip file")


@pytest.mark.parametrize(("stride", "n"), [(2, 0), (2, 9), (3, 10), (4, 4), (16, 5)])
def test_byte_shuffle_groups_bytes_by_offset_modulo_the_stride(stride: int, n: int) -> None:
    data = bytes(np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8))
    lanes = [bytes(data[i] for i in range(len(data)) if i % stride == k) for k in range(stride)]
    got = shuffle(data, stride)
    assert got == b"BSHF" + bytes([stride]) + b"".join(lanes)
    assert unshuffle(got) == data
    with pytest.raises(PgolfError, match="BSHF"):
        unshuffle(data + b"xxxxx" if data[:4] != b"BSHF" else b"nope!")


def test_lzma_filters_are_what_the_xz_format_records() -> None:
    data = np.arange(20_000, dtype=np.int16).tobytes()  # a ramp: the delta filter's case
    plain = Lzma(LzmaParams(preset=6), None)  # type: ignore[arg-type]
    delta = Lzma(LzmaParams(preset=6, delta=2, lc=0, lp=1, pb=1), None)  # type: ignore[arg-type]
    for codec in (plain, delta):
        blob = codec.compress(data)
        assert blob[:6] == b"\xfd7zXZ\x00" and codec.decompress(blob) == data
        assert std_lzma.decompress(blob) == data  # any xz reader reads it
    assert len(delta.compress(data)) < len(plain.compress(data))
    ref = std_lzma.compress(data, format=std_lzma.FORMAT_XZ, check=std_lzma.CHECK_CRC64,
                            filters=[{"id": std_lzma.FILTER_DELTA, "dist": 2},
                                     {"id": std_lzma.FILTER_LZMA2, "preset": 6, "lc": 0, "lp": 1, "pb": 1}])  # fmt: skip
    assert delta.compress(data) == ref


def lqer_reference(e: torch.Tensor, rank: int, group: int) -> torch.Tensor:
    """Â·B̂ written out: SVD, A = U_r·S_r in 2-bit codes, B's groups of ``group`` in 4-bit codes."""
    u, s, vh = np.linalg.svd(e.double().numpy(), full_matrices=False)
    a = (u[:, :rank] * s[:rank]).astype(np.float32)
    b = vh[:rank].astype(np.float32)
    s_a = np.float32(np.float16(np.abs(a).max() / 1.5))
    qa = np.clip(np.round(a / s_a), -2, 1)
    bg = b.reshape(-1, group)
    s_b = np.abs(bg).max(axis=1) / 7.5
    s_b = s_b.astype(np.float16).astype(np.float32)
    qb = np.clip(np.round(bg / s_b[:, None]), -8, 7)
    return torch.from_numpy((qa * s_a) @ (qb * s_b[:, None]).reshape(b.shape))


def test_lqer_stores_the_quantized_top_singular_directions_of_the_error() -> None:
    g = torch.Generator().manual_seed(0)
    low = torch.randn(24, 3, generator=g) @ torch.randn(3, 32, generator=g)  # a rank-3 error
    e = low + 0.01 * torch.randn(24, 32, generator=g)
    f = fit(e, LQERParams(rank=3, group=16))
    assert int(f["form"]) == 1 and f["qA"].dtype == torch.int8
    assert set(f["qA"].unique().tolist()) <= {-2, -1, 0, 1} and int(f["qB"].abs().max()) <= 8
    c = correction(f)
    assert torch.allclose(c, lqer_reference(e, 3, 16).float(), atol=1e-4, rtol=1e-4)
    assert float((e - c).norm()) < 0.6 * float(e.norm())  # 2-bit A: about half of a rank-3 error removed
    sym = fit(e, LQERParams(rank=3, asym=False, factor_bits=6))
    assert int(sym["form"]) == 0 and int(sym["qA"].abs().max()) <= 31
    assert float((e - correction(sym)).norm()) < float((e - c).norm())  # 6-bit factors: finer


def test_self_generated_batches_are_samples_of_the_model_and_read_no_data() -> None:
    rs = tiny_stack({"gptq": {"calibration_batches": 2},
                     "self_generated_calibration": {"batch_size": 3, "seq_len": 6, "seed": 4}})  # fmt: skip
    b = build(rs, torch.device("cpu"))
    sgc = next(t for t in b.techniques if isinstance(t, SelfGeneratedCalibration))
    batches = sgc.calibration_batches(b.model, seq_len=16)
    first, second = next(batches), next(batches)
    assert first.shape == second.shape == (3, 6) and not torch.equal(first, second)
    again = next(sgc.calibration_batches(b.model, seq_len=16))
    assert torch.equal(first, again)  # seeded per batch index
    assert int(first.min()) >= 0 and int(first.max()) < VOCAB
    # at a near-zero temperature every next token is the model's argmax given the prefix
    g = torch.Generator().manual_seed(1)
    x = generate(b.model, 2, 5, VOCAB, 1e-4, None, g, torch.device("cpu"))
    with torch.no_grad():
        for t in range(1, 5):
            assert torch.equal(x[:, t], b.model.logits(x[:, :t])[:, -1].argmax(-1))  # type: ignore[operator]
