"""engine.tf_checkpoint: the TF-free checkpoint reader on Spleeter's real 2stems checkpoint."""
import shutil
import struct

import numpy as np
import pytest

from engine.tf_checkpoint import crc32c, read_tf_checkpoint


def _crc32c_slow(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def test_crc32c_matches_the_definition():
    assert crc32c(b"") == 0
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    rng = np.random.default_rng(0)
    for n in (1, 3, 4, 5, 63, 64, 65, 1000, 4097):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert crc32c(data) == _crc32c_slow(data), n


@pytest.fixture(scope="module")
def tensors(spleeter_checkpoint):
    return read_tf_checkpoint(spleeter_checkpoint)


def test_reads_every_variable_with_its_shape_and_dtype(spleeter_checkpoint, tensors):
    # Per U-Net: 7 convs and 6 transposed convs (kernel, bias), 12 BNs (4 each); + global_step.
    assert len(tensors) == 2 * (7 * 2 + 6 * 2 + 12 * 4) + 1
    assert tensors["global_step"].dtype == np.int64 and tensors["global_step"].shape == ()
    floats = {k: v for k, v in tensors.items() if k != "global_step"}
    assert all(v.dtype == np.float32 for v in floats.values())
    assert sum(v.size for v in floats.values()) == 19_653_518
    data = spleeter_checkpoint.parent / "model.data-00000-of-00001"
    assert sum(v.nbytes for v in tensors.values()) == data.stat().st_size  # every byte is read
    expect = {
        "conv2d/kernel": (5, 5, 2, 16), "conv2d_5/kernel": (5, 5, 256, 512),
        "conv2d_6/kernel": (4, 4, 1, 2), "conv2d_6/bias": (2,), "conv2d_7/kernel": (5, 5, 2, 16),
        "conv2d_13/kernel": (4, 4, 1, 2), "conv2d_transpose/kernel": (5, 5, 256, 512),
        "conv2d_transpose_5/kernel": (5, 5, 1, 32), "conv2d_transpose_11/bias": (1,),
        "batch_normalization/gamma": (16,), "batch_normalization_11/moving_variance": (1,),
        "batch_normalization_23/beta": (1,),
    }
    for name, shape in expect.items():
        assert tensors[name].shape == shape, name
    for kind, count in (("conv2d", 14), ("conv2d_transpose", 12), ("batch_normalization", 24)):
        layers = {k.split("/")[0] for k in tensors if k.split("/")[0].rstrip("0123456789_") == kind}
        assert layers == {kind} | {f"{kind}_{i}" for i in range(1, count)}, kind
    assert (tensors["batch_normalization/moving_variance"] > 0).all()
    assert np.isfinite(tensors["conv2d_12/kernel"]).all()


def test_without_crc_check_reads_the_same(spleeter_checkpoint, tensors):
    fast = read_tf_checkpoint(spleeter_checkpoint, verify_crc=False)
    assert fast.keys() == tensors.keys()
    for k in tensors:
        np.testing.assert_array_equal(fast[k], tensors[k])


@pytest.fixture
def copy(spleeter_checkpoint, tmp_path):
    """A private copy of the checkpoint: returns (prefix, index bytes)."""
    prefix = tmp_path / "model"
    for suffix in (".index", ".data-00000-of-00001"):
        shutil.copy(str(spleeter_checkpoint) + suffix, str(prefix) + suffix)
    return prefix, (tmp_path / "model.index").read_bytes()


def test_truncated_index_is_a_clear_error(copy):
    prefix, index = copy
    (prefix.parent / "model.index").write_bytes(index[:-10])
    with pytest.raises(ValueError, match=r"model\.index.*(magic|truncated|short)"):
        read_tf_checkpoint(prefix)
    (prefix.parent / "model.index").write_bytes(index[:20])
    with pytest.raises(ValueError, match=r"model\.index"):
        read_tf_checkpoint(prefix)


def test_corrupted_index_block_fails_its_crc(copy):
    prefix, index = copy
    bad = bytearray(index)
    bad[40] ^= 0x01  # inside the first data block (a key or a BundleEntryProto)
    (prefix.parent / "model.index").write_bytes(bytes(bad))
    with pytest.raises(ValueError, match=r"model\.index.*crc32c"):
        read_tf_checkpoint(prefix)


def test_compressed_block_is_rejected(copy):
    prefix, index = copy
    # The footer's index-block handle -> the index block's trailer: compression type byte.
    footer = index[-48:]

    def varint(buf, pos):
        value = shift = 0
        while True:
            byte = buf[pos]
            value |= (byte & 0x7F) << shift
            pos, shift = pos + 1, shift + 7
            if not byte & 0x80:
                return value, pos

    _, pos = varint(footer, 0)
    _, pos = varint(footer, pos)
    offset, pos = varint(footer, pos)
    size, _ = varint(footer, pos)
    bad = bytearray(index)
    bad[offset + size] = 1  # snappy
    (prefix.parent / "model.index").write_bytes(bytes(bad))
    with pytest.raises(ValueError, match=r"compressed \(type 1\)"):
        read_tf_checkpoint(prefix)


def test_corrupted_or_missing_data_is_a_clear_error(copy):
    prefix, _ = copy
    data = prefix.parent / "model.data-00000-of-00001"
    blob = bytearray(data.read_bytes())
    blob[1000] ^= 0xFF
    data.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match=r"data-00000-of-00001: tensor '.+' fails its crc32c check"):
        read_tf_checkpoint(prefix)
    data.write_bytes(bytes(blob[: len(blob) // 2]))
    with pytest.raises(ValueError, match=r"runs past the end of the file"):
        read_tf_checkpoint(prefix, verify_crc=False)
    data.unlink()
    with pytest.raises(ValueError, match=r"data-00000-of-00001: cannot read"):
        read_tf_checkpoint(prefix)


def test_missing_index_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"nothing\.index: cannot read"):
        read_tf_checkpoint(tmp_path / "nothing")


def test_footer_magic_is_checked(copy):
    prefix, index = copy
    bad = index[:-8] + struct.pack("<Q", 0x0123456789ABCDEF)
    (prefix.parent / "model.index").write_bytes(bad)
    with pytest.raises(ValueError, match="magic"):
        read_tf_checkpoint(prefix)
