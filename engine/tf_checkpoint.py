"""Read a TensorFlow v2 checkpoint ("tensor bundle") without TensorFlow.

A checkpoint ``<prefix>`` is two kinds of file:

* ``<prefix>.index``: a LevelDB SSTable mapping each variable name to a ``BundleEntryProto``
  (dtype, shape, shard id, byte offset and size in the shard, masked crc32c of the bytes); the
  entry with the empty key is the ``BundleHeaderProto`` (number of shards, endianness).
* ``<prefix>.data-SSSSS-of-NNNNN``: the raw little-endian tensor bytes.

Only what TF's ``tf.train.Saver`` / ``tf.train.Checkpoint`` write is supported: uncompressed
SSTable blocks, whole (unsliced) numeric tensors. The protobufs are decoded by hand (a few
varint and length-delimited fields), so neither TensorFlow nor protobuf is needed.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

__all__ = ["read_tf_checkpoint", "crc32c"]

_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_LEN = 48  # two BlockHandles padded to 40 bytes + 8-byte magic
_BLOCK_TRAILER_LEN = 5  # compression type byte + masked crc32c
_CRC_MASK_DELTA = 0xA282EAD8

# tensorflow/core/framework/types.proto DataType -> numpy (little endian)
_DTYPES = {
    1: "<f4", 2: "<f8", 3: "<i4", 4: "u1", 5: "<i2", 6: "i1", 8: "<c8", 9: "<i8",
    10: "?", 17: "<u2", 18: "<c16", 19: "<f2", 22: "<u4", 23: "<u8",
}


# ---------------------------------------------------------------- crc32c (Castagnoli), numpy

def _make_table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(0x82F63B78), table >> 1)
    return table.astype(np.uint32)


_TABLE = _make_table()


def _raw_update(reg: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Run the reflected CRC registers ``reg`` [k] over ``cols`` [n, k] (one byte stream per column)."""
    for byte in cols:
        reg = _TABLE[(reg ^ byte) & 0xFF] ^ (reg >> 8)
    return reg


_BITS = np.arange(32, dtype=np.uint32)


def _apply(columns: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Apply the GF(2)-linear map with images ``columns`` [32] of the unit bits to ``values`` [k]."""
    bits = (values[:, None] >> _BITS) & 1
    return np.bitwise_xor.reduce(np.where(bits.astype(bool), columns, np.uint32(0)), axis=1)


_POWERS: list[np.ndarray] = []  # _POWERS[i]: operator "feed 2**i zero bytes"


def _zeros_operator(n_bytes: int) -> np.ndarray:
    """Columns of the linear map 'feed ``n_bytes`` zero bytes to the raw register'."""
    if not _POWERS:
        units = np.left_shift(np.uint32(1), _BITS)
        _POWERS.append(_raw_update(units, np.zeros((1, 32), dtype=np.uint8)))
    result = np.left_shift(np.uint32(1), _BITS)
    i = 0
    while n_bytes >> i:
        while len(_POWERS) <= i:
            _POWERS.append(_apply(_POWERS[-1], _POWERS[-1]))
        if (n_bytes >> i) & 1:
            result = _apply(_POWERS[i], result)
        i += 1
    return result


def crc32c(data: bytes | memoryview | np.ndarray) -> int:
    """CRC-32C (Castagnoli, as in TF/LevelDB) of ``data``, vectorised with numpy (~10 ms per MB).

    The bytes are cut into ``k`` equal streams (left-padded with zeros, which leaves a CRC
    started from a zero register unchanged), all streams run in parallel, then the stream CRCs
    are folded pairwise with the linear operator "append L zero bytes".
    """
    buf = data.reshape(-1).view(np.uint8) if isinstance(data, np.ndarray) else np.frombuffer(data, dtype=np.uint8)
    n = buf.size
    streams = 1
    while streams * streams * 2 < n:  # ~ sqrt(n / 2) parallel streams, a power of two
        streams *= 2
    length = -(-n // streams)
    padded = np.zeros(streams * length, dtype=np.uint8)
    padded[streams * length - n:] = buf
    regs = _raw_update(np.zeros(streams, dtype=np.uint32), padded.reshape(streams, length).T)
    op = _zeros_operator(length)
    while regs.size > 1:  # crc(A || B) = shift_len(B)(crc(A)) ^ crc(B), raw registers from 0
        regs = _apply(op, regs[0::2]) ^ regs[1::2]
        op = _apply(op, op)
    # A register started at 0xFFFFFFFF contributes shift_n(0xFFFFFFFF); then the final xor.
    init = int(_apply(_zeros_operator(n), np.array([0xFFFFFFFF], dtype=np.uint32))[0])
    return int(regs[0]) ^ init ^ 0xFFFFFFFF


def _unmask(masked: int) -> int:
    rot = (masked - _CRC_MASK_DELTA) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


# ---------------------------------------------------------------- protobuf / varints

def _varint(buf: bytes, pos: int, where: str) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError(f"{where}: truncated or malformed varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return result, pos


def _fields(buf: bytes, where: str):
    """Yield (field number, wire type, value) of a protobuf message; value is int or bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos, where)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, where)
        elif wire == 1:
            value, pos = int.from_bytes(buf[pos:pos + 8], "little"), pos + 8
        elif wire == 5:
            value, pos = int.from_bytes(buf[pos:pos + 4], "little"), pos + 4
        elif wire == 2:
            size, pos = _varint(buf, pos, where)
            value, pos = buf[pos:pos + size], pos + size
        else:
            raise ValueError(f"{where}: unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise ValueError(f"{where}: truncated protobuf field {number}")
        yield number, wire, value


def _parse_entry(buf: bytes, where: str) -> dict:
    entry = {"dtype": 0, "shape": [], "shard_id": 0, "offset": 0, "size": 0, "crc32c": None}
    for number, _, value in _fields(buf, where):
        if number == 1:
            entry["dtype"] = value
        elif number == 2:  # TensorShapeProto: repeated Dim dim = 2 {int64 size = 1}
            for dnum, _, dim in _fields(value, where):
                if dnum == 2:
                    size = next((v for n, _, v in _fields(dim, where) if n == 1), 0)
                    entry["shape"].append(size - (1 << 64) if size >= 1 << 63 else size)
                elif dnum == 3 and dim:
                    raise ValueError(f"{where}: tensor of unknown rank")
        elif number in (3, 4, 5):
            entry[{3: "shard_id", 4: "offset", 5: "size"}[number]] = value
        elif number == 6:
            entry["crc32c"] = value
        elif number == 7:
            raise ValueError(f"{where}: sliced (partitioned) tensors are not supported")
    return entry


# ---------------------------------------------------------------- SSTable

def _read_block(data: bytes, handle: bytes, where: str, verify: bool) -> bytes:
    offset, pos = _varint(handle, 0, where)
    size, _ = _varint(handle, pos, where)
    end = offset + size
    if end + _BLOCK_TRAILER_LEN > len(data):
        raise ValueError(f"{where}: block at {offset}+{size} runs past the end of the file")
    kind = data[end]
    if kind != 0:
        raise ValueError(f"{where}: block at {offset} is compressed (type {kind}); only type 0 is supported")
    if verify:
        stored = struct.unpack_from("<I", data, end + 1)[0]
        if crc32c(data[offset:end + 1]) != _unmask(stored):
            raise ValueError(f"{where}: block at {offset} fails its crc32c check")
    return data[offset:end]


def _block_entries(block: bytes, where: str):
    """Yield (key, value) of an SSTable block (prefix-compressed keys, restart array at the end)."""
    if len(block) < 4:
        raise ValueError(f"{where}: block too short")
    n_restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
    limit = len(block) - 4 - 4 * n_restarts
    if limit < 0:
        raise ValueError(f"{where}: corrupt restart array")
    pos, key = 0, b""
    while pos < limit:
        shared, pos = _varint(block, pos, where)
        unshared, pos = _varint(block, pos, where)
        vlen, pos = _varint(block, pos, where)
        if shared > len(key) or pos + unshared + vlen > limit:
            raise ValueError(f"{where}: corrupt block entry at {pos}")
        key = key[:shared] + block[pos:pos + unshared]
        pos += unshared
        yield key, block[pos:pos + vlen]
        pos += vlen


def read_tf_checkpoint(prefix: str | Path, verify_crc: bool = True) -> dict[str, np.ndarray]:
    """Read every tensor of the TF checkpoint ``prefix`` (the path without ``.index``).

    Returns ``{variable name: numpy array}`` (native layout, e.g. conv kernels are HWIO).
    ``verify_crc`` checks each tensor's and each index block's crc32c (about 0.5 s per 80 MB).
    Raises ValueError naming the file and the problem for anything malformed or unsupported.
    """
    prefix = str(prefix)
    index_path = prefix + ".index"
    try:
        index = Path(index_path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{index_path}: cannot read checkpoint index ({exc})") from exc
    if len(index) < _FOOTER_LEN:
        raise ValueError(f"{index_path}: too short for an SSTable ({len(index)} bytes)")
    footer = index[-_FOOTER_LEN:]
    if struct.unpack_from("<Q", footer, 40)[0] != _TABLE_MAGIC:
        raise ValueError(f"{index_path}: bad SSTable magic number (not a TF checkpoint index?)")
    _, pos = _varint(footer, 0, index_path)  # metaindex offset
    _, pos = _varint(footer, pos, index_path)  # metaindex size (unused: no filters)
    index_handle = footer[pos:40]
    entries: list[tuple[bytes, bytes]] = []
    for _, data_handle in _block_entries(_read_block(index, index_handle, index_path, verify_crc), index_path):
        entries.extend(_block_entries(_read_block(index, data_handle, index_path, verify_crc), index_path))

    num_shards, shards, out = 1, {}, {}
    for key, value in entries:
        if key == b"":  # BundleHeaderProto
            for number, _, field in _fields(value, index_path):
                if number == 1:
                    num_shards = field
                elif number == 2 and field != 0:
                    raise ValueError(f"{index_path}: big-endian checkpoints are not supported")
            continue
        name = key.decode("utf-8")
        where = f"{index_path} [{name}]"
        entry = _parse_entry(value, where)
        if entry["dtype"] not in _DTYPES:
            raise ValueError(f"{where}: unsupported dtype enum {entry['dtype']}")
        dtype = np.dtype(_DTYPES[entry["dtype"]])
        shape = tuple(entry["shape"])
        count = int(np.prod(shape, dtype=np.int64))
        if count * dtype.itemsize != entry["size"]:
            raise ValueError(f"{where}: size {entry['size']} does not match shape {shape} of {dtype}")
        shard = entry["shard_id"]
        data_path = f"{prefix}.data-{shard:05d}-of-{num_shards:05d}"
        if shard not in shards:
            try:
                shards[shard] = np.memmap(data_path, dtype=np.uint8, mode="r")
            except (OSError, ValueError) as exc:
                raise ValueError(f"{data_path}: cannot read checkpoint data ({exc})") from exc
        raw = shards[shard][entry["offset"]:entry["offset"] + entry["size"]]
        if raw.size != entry["size"]:
            raise ValueError(f"{data_path}: tensor {name!r} runs past the end of the file")
        raw = np.array(raw)  # copy out of the memmap
        if verify_crc and entry["crc32c"] is not None and crc32c(raw) != _unmask(entry["crc32c"]):
            raise ValueError(f"{data_path}: tensor {name!r} fails its crc32c check")
        out[name] = raw.view(dtype).reshape(shape)
    return out
