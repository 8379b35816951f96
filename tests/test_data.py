"""Challenge shard format, token streaming and the baseline's distributed batching."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pgolf.registry.api.errors import DataError
from pgolf.registry.run.data import (
    HEADER_BYTES,
    HEADER_INTS,
    SHARD_MAGIC,
    SHARD_VERSION,
    DistributedTokenLoader,
    TokenStream,
    check_shards,
    find_shards,
    load_shard,
    load_tokens,
    read_header,
    write_shard,
)


def _shards(folder: Path, sizes: list[int], split: str = "train") -> list[Path]:
    """Shards holding the consecutive integers 0, 1, 2, ... split into ``sizes``."""
    paths, start = [], 0
    for i, n in enumerate(sizes):
        path = folder / f"fineweb_{split}_{i:06d}.bin"
        write_shard(path, np.arange(start, start + n))
        paths.append(path)
        start += n
    return paths


def _raw_shard(path: Path, header: list[int], payload: bytes) -> Path:
    ints = np.zeros(HEADER_INTS, dtype="<i4")
    ints[: len(header)] = header
    path.write_bytes(ints.tobytes() + payload)
    return path


# --------------------------------------------------------------------------- format


def test_constants() -> None:
    assert (SHARD_MAGIC, SHARD_VERSION, HEADER_INTS, HEADER_BYTES) == (20240520, 1, 256, 1024)


def test_write_read_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "fineweb_train_000000.bin"
    tokens = np.array([0, 1, 2, 1023, 65535, 7], dtype=np.int64)
    write_shard(path, tokens)
    raw = path.read_bytes()
    assert len(raw) == 1024 + 2 * len(tokens)
    header = np.frombuffer(raw[:1024], dtype="<i4")
    assert list(header[:3]) == [20240520, 1, 6] and not header[3:].any()
    assert list(np.frombuffer(raw[1024:], dtype="<u2")) == tokens.tolist()
    assert read_header(path) == 6
    loaded = load_shard(path)
    assert isinstance(loaded, np.memmap) and loaded.dtype == np.uint16
    assert not loaded.flags.writeable
    assert loaded.tolist() == tokens.tolist()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left


def test_write_accepts_lists_and_empty(tmp_path: Path) -> None:
    write_shard(tmp_path / "a.bin", [3, 4])
    write_shard(tmp_path / "b.bin", [])
    assert load_shard(tmp_path / "a.bin").tolist() == [3, 4]
    assert read_header(tmp_path / "b.bin") == 0 and len(load_shard(tmp_path / "b.bin")) == 0


@pytest.mark.parametrize("bad", [[-1, 2], [65536], [1.5]])
def test_write_rejects_out_of_range(tmp_path: Path, bad: list[float]) -> None:
    path = tmp_path / "x.bin"
    with pytest.raises(DataError, match=r"x\.bin"):
        write_shard(path, bad)  # type: ignore[arg-type]
    assert not path.exists()


def test_bad_magic(tmp_path: Path) -> None:
    path = _raw_shard(tmp_path / "fineweb_val_000000.bin", [12345, 1, 2], b"\0" * 4)
    with pytest.raises(DataError) as e:
        read_header(path)
    assert str(path) in str(e.value) and "12345" in str(e.value) and "20240520" in str(e.value)


def test_bad_version(tmp_path: Path) -> None:
    path = _raw_shard(tmp_path / "fineweb_val_000000.bin", [SHARD_MAGIC, 2, 2], b"\0" * 4)
    with pytest.raises(DataError, match="version 2") as e:
        load_shard(path)
    assert str(path) in str(e.value)


def test_truncated_payload_size_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "fineweb_train_000000.bin"
    write_shard(path, np.arange(10))
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(DataError) as e:
        read_header(path)
    msg = str(e.value)
    assert str(path) in msg and "1044" in msg and "1041" in msg


def test_extra_bytes_size_mismatch(tmp_path: Path) -> None:
    path = _raw_shard(tmp_path / "s.bin", [SHARD_MAGIC, 1, 1], b"\0" * 4)
    with pytest.raises(DataError, match=r"s\.bin.*1026.*1028"):
        read_header(path)


def test_shorter_than_header(tmp_path: Path) -> None:
    path = tmp_path / "fineweb_train_000000.bin"
    path.write_bytes(b"\x01" * 100)
    with pytest.raises(DataError, match="shorter than the 1024-byte") as e:
        load_shard(path)
    assert str(path) in str(e.value)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "fineweb_train_000009.bin"
    with pytest.raises(DataError, match="not found") as e:
        read_header(path)
    assert str(path) in str(e.value)


# --------------------------------------------------------------------------- finding


def test_find_shards_sorted_and_limited(tmp_path: Path) -> None:
    for i in (2, 0, 1):
        write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", [i])
    write_shard(tmp_path / "fineweb_val_000000.bin", [9])
    names = [p.name for p in find_shards(tmp_path, "train")]
    assert names == ["fineweb_train_000000.bin", "fineweb_train_000001.bin", "fineweb_train_000002.bin"]
    assert [p.name for p in find_shards(tmp_path, "train", limit=2)] == names[:2]
    assert [p.name for p in find_shards(tmp_path, "val")] == ["fineweb_val_000000.bin"]


def test_find_shards_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist") as e:
        find_shards(tmp_path / "nope", "train")
    assert str(tmp_path / "nope") in str(e.value)
    with pytest.raises(DataError, match=r"fineweb_val_\*\.bin") as e:
        find_shards(tmp_path, "val")
    assert str(tmp_path) in str(e.value)


def test_check_shards_total_and_bad_one(tmp_path: Path) -> None:
    paths = _shards(tmp_path, [5, 3, 4])
    assert check_shards(paths) == 12
    paths[1].write_bytes(paths[1].read_bytes()[:-2])
    with pytest.raises(DataError, match=r"fineweb_train_000001\.bin"):
        check_shards(paths)


def test_load_tokens(tmp_path: Path) -> None:
    paths = _shards(tmp_path, [3, 4], split="val")
    t = load_tokens(paths)
    assert t.dtype == torch.int32 and t.dim() == 1
    assert t.tolist() == list(range(7))


# --------------------------------------------------------------------------- streaming


def test_stream_crosses_boundaries_and_wraps(tmp_path: Path) -> None:
    stream = TokenStream(_shards(tmp_path, [5, 3, 2]))  # tokens 0..9
    a = stream.take(4)
    assert a.dtype == np.int64 and a.tolist() == [0, 1, 2, 3]
    assert stream.take(5).tolist() == [4, 5, 6, 7, 8]  # crosses two shard boundaries
    assert stream.take(4).tolist() == [9, 0, 1, 2]  # wraps to the first shard
    assert stream.take(12).tolist() == [3, 4, 5, 6, 7, 8, 9, 0, 1, 2, 3, 4]  # more than one lap


def test_stream_skips_empty_shards(tmp_path: Path) -> None:
    paths = _shards(tmp_path, [2, 0, 2])
    assert TokenStream(paths).take(6).tolist() == [0, 1, 2, 3, 0, 1]
    sub = tmp_path / "empty"
    sub.mkdir()
    with pytest.raises(DataError, match="empty"):
        TokenStream(_shards(sub, [0, 0])).take(1)


def test_stream_state_restore(tmp_path: Path) -> None:
    paths = _shards(tmp_path, [5, 3, 2])
    stream = TokenStream(paths)
    stream.take(7)
    state = stream.state_dict()
    expected = stream.take(6)
    fresh = TokenStream(paths)
    fresh.load_state_dict(state)
    assert fresh.take(6).tolist() == expected.tolist() == [7, 8, 9, 0, 1, 2]
    fresh.reset()
    assert fresh.take(2).tolist() == [0, 1]
    with pytest.raises(DataError):
        TokenStream(paths[:2]).load_state_dict(state)


# --------------------------------------------------------------------------- distributed loader


def test_loader_matches_baseline_rule(tmp_path: Path) -> None:
    paths = _shards(tmp_path, [7, 6, 9])  # tokens 0..21
    r0 = DistributedTokenLoader(paths, rank=0, world_size=2)
    r1 = DistributedTokenLoader(paths, rank=1, world_size=2)
    # local_tokens=4: each call takes 2 * (4 + 1) = 10 tokens; rank r keeps span r of 5 tokens.
    x0, y0 = r0.next_batch(4, 2)
    x1, y1 = r1.next_batch(4, 2)
    assert x0.dtype == y0.dtype == torch.int64 and x0.shape == (2, 2)
    assert x0.tolist() == [[0, 1], [2, 3]] and y0.tolist() == [[1, 2], [3, 4]]
    assert x1.tolist() == [[5, 6], [7, 8]] and y1.tolist() == [[6, 7], [8, 9]]
    # Second call: tokens 10..19, spans 10..14 and 15..19.
    x0, y0 = r0.next_batch(4, 2)
    x1, y1 = r1.next_batch(4, 2)
    assert x0.tolist() == [[10, 11], [12, 13]] and y0.tolist() == [[11, 12], [13, 14]]
    assert x1.tolist() == [[15, 16], [17, 18]] and y1.tolist() == [[16, 17], [18, 19]]
    # Third call wraps: tokens 20, 21, 0, 1, ..., 7.
    x1, y1 = r1.next_batch(4, 2)
    assert x1.tolist() == [[3, 4], [5, 6]] and y1.tolist() == [[4, 5], [6, 7]]


def test_loader_single_rank_one_row(tmp_path: Path) -> None:
    loader = DistributedTokenLoader(_shards(tmp_path, [20]), rank=0, world_size=1)
    x, y = loader.next_batch(6, 6)
    assert x.tolist() == [[0, 1, 2, 3, 4, 5]] and y.tolist() == [[1, 2, 3, 4, 5, 6]]
    x, _ = loader.next_batch(6, 3)
    assert x.tolist() == [[7, 8, 9], [10, 11, 12]]


def test_loader_state_restore_and_reset(tmp_path: Path) -> None:
    paths = _shards(tmp_path, [11, 13])
    loader = DistributedTokenLoader(paths, rank=1, world_size=2)
    first = loader.next_batch(4, 4)
    loader.next_batch(4, 4)
    state = loader.state_dict()
    expected = loader.next_batch(4, 4)
    other = DistributedTokenLoader(paths, rank=1, world_size=2)
    other.load_state_dict(state)
    got = other.next_batch(4, 4)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    other.reset()
    assert all(torch.equal(a, b) for a, b in zip(other.next_batch(4, 4), first))


def test_loader_argument_errors(tmp_path: Path) -> None:
    paths = _shards(tmp_path, [10])
    with pytest.raises(ValueError):
        DistributedTokenLoader(paths, rank=2, world_size=2)
    with pytest.raises(ValueError):
        DistributedTokenLoader(paths, rank=0, world_size=1).next_batch(5, 2)
    with pytest.raises(DataError):
        DistributedTokenLoader([], rank=0, world_size=1)


def test_prefetching_loader_serves_the_reference_batches_and_restarts(tmp_path: Path) -> None:
    from pgolf.registry.run.data import PrefetchingLoader

    path = tmp_path / "fineweb_train_000000.bin"
    write_shard(path, np.arange(1000) % 500)
    reference = DistributedTokenLoader([path], 0, 1)
    expected = [reference.next_batch(32, 8) for _ in range(40)]  # wraps around the shard
    fast = PrefetchingLoader(DistributedTokenLoader([path], 0, 1), 32, 8, depth=3)
    for x, y in expected[:25]:
        fx, fy = fast.next_batch(32, 8)
        assert torch.equal(fx, x) and torch.equal(fy, y)
    fast.reset()  # e.g. after the compile warm-up: back to the first batch
    for x, y in expected:
        fx, fy = fast.next_batch(32, 8)
        assert torch.equal(fx, x) and torch.equal(fy, y)
    fast.close()
    with pytest.raises(ValueError, match="serves batches of 32 tokens"):
        fast.next_batch(64, 8)
    fast.reset()
    fx, fy = fast.next_batch(32, 16)  # another sequence length is a view of the same span
    assert torch.equal(fx, expected[0][0].reshape(-1, 16)) and torch.equal(fy, expected[0][1].reshape(-1, 16))
    fast.close()
