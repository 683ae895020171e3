"""TensorFlow V2 checkpoints (tensor bundles) read without TensorFlow.

A checkpoint PREFIX is `PREFIX.index`, a table of tensor name -> BundleEntryProto (the key
"" holds the BundleHeaderProto), and shards `PREFIX.data-00000-of-0000N` holding the bytes
(tensorflow/core/util/tensor_bundle/tensor_bundle.cc). The index is a LevelDB-style table
(tensorflow/core/lib/io/table.cc, block.cc, format.cc), which bundles write uncompressed:

    data blocks | metaindex block | index block (last key -> block handle) | footer
    block:  entries (varint32 shared, unshared, value length; key suffix; value), uint32
            restart offsets and their count; then a compression type byte and the masked
            CRC32C of block + type byte
    footer: 48 bytes: metaindex and index handles (varint64 offset, size), zero padding,
            magic 0xdb4775248b80fb57

A numeric tensor is its little-endian array at (shard_id, offset, size), with the masked
CRC32C of those bytes in its entry. Every checksum is checked, so a damaged file is
reported instead of becoming wrong weights.
"""

from __future__ import annotations

import codecs
import math
import re
import struct
from collections.abc import Iterator
from contextlib import ExitStack
from functools import lru_cache
from pathlib import Path

import numpy as np

from segment_deeplab.data.tfrecord import masked_crc

_FOOTER, _TRAILER, _MAGIC = 48, 5, 0xDB4775248B80FB57
# DataType number (tensorflow/core/framework/types.proto) -> TensorFlow's name for it
# (tf.float16.name), numpy dtype of its bytes ("": no flat array; bfloat16: its bits).
_DTYPES = {
    1: ("float32", "<f4"), 2: ("float64", "<f8"), 3: ("int32", "<i4"), 4: ("uint8", "u1"),
    5: ("int16", "<i2"), 6: ("int8", "i1"), 7: ("string", ""), 8: ("complex64", "<c8"),
    9: ("int64", "<i8"), 10: ("bool", "?"), 14: ("bfloat16", "<u2"), 17: ("uint16", "<u2"),
    18: ("complex128", "<c16"), 19: ("float16", "<f2"), 20: ("resource", ""),
    21: ("variant", ""), 22: ("uint32", "<u4"), 23: ("uint64", "<u8"),
}  # fmt: skip


class TFCheckpointError(ValueError):
    """A path that is no readable TensorFlow V2 checkpoint; the message names the file."""


class _Damaged(Exception):
    """Index bytes that do not parse; reported as a TFCheckpointError naming the file."""


def read_checkpoint(path: str | Path, *, strings: bool = False) -> dict[str, np.ndarray]:
    """Every numeric tensor of a checkpoint by name, as TensorFlow's `get_tensor` has it.

    Args:
        path: `PREFIX`, `PREFIX.index`, a data shard, or a folder (the prefix its
            `checkpoint` file names, as tf.train.latest_checkpoint reads it, else its
            only .index).
        strings: string tensors too, as object arrays of bytes (a TF2 checkpoint's
            `_CHECKPOINTABLE_OBJECT_GRAPH` is one). Left out by default, as are variant
            and resource tensors, which have no array; `list_checkpoint` lists them all.

    Raises:
        TFCheckpointError: no V2 checkpoint there, a missing or cut short file, a failed
            checksum, a partitioned (sliced) tensor.
    """
    prefix = _prefix(path)
    header, entries = _index(prefix)
    out, files = {}, {}
    with ExitStack() as stack:
        for name, entry in entries.items():
            kind, code = _DTYPES.get(entry.dtype, ("", ""))
            if not code and not (strings and kind == "string"):
                continue
            if entry.slices:
                raise TFCheckpointError(
                    f"{prefix}.index: tensor {name!r} is saved in {len(entry.slices)} slices "
                    "(a partitioned variable), which this reader does not join; use TensorFlow"
                )
            if entry.shard_id not in files:
                shard = _shard(prefix, header.num_shards, entry.shard_id)
                files[entry.shard_id] = shard, stack.enter_context(open(shard, "rb"))
            out[name] = _tensor(*files[entry.shard_id], name, entry)
    return out


def list_checkpoint(path: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every tensor of a checkpoint: name -> (TensorFlow's dtype name, shape), from the
    .index alone. `path` as for `read_checkpoint`."""
    _, entries = _index(_prefix(path))
    return {
        name: (_DTYPES.get(e.dtype, (f"DataType {e.dtype}",))[0], _shape(e))
        for name, e in entries.items()
    }


def _shape(entry) -> tuple[int, ...]:
    return tuple(d.size for d in entry.shape.dim)


def _prefix(path: str | Path) -> str:
    """The checkpoint prefix that `path` names (see read_checkpoint)."""
    p = Path(path)
    if p.name == "checkpoint" and p.is_file():
        return _latest(p)
    if not p.is_dir():
        return re.sub(r"(\.index|\.data-\d{5}-of-\d{5})$", "", str(p))
    if (p / "saved_model.pb").is_file():
        raise TFCheckpointError(
            f"{p} is a SavedModel, not a checkpoint; its weights are the checkpoint "
            f"{p / 'variables' / 'variables'}: pass that"
        )
    if (p / "checkpoint").is_file():
        return _latest(p / "checkpoint")
    indexes = sorted(str(i)[: -len(".index")] for i in p.glob("*.index"))
    if not indexes:
        raise TFCheckpointError(f"{p} holds no TensorFlow checkpoint (no PREFIX.index file)")
    if len(indexes) > 1:
        raise TFCheckpointError(
            f"{p} holds {len(indexes)} checkpoints and no `checkpoint` file naming the latest; "
            f"pass one prefix: {', '.join(Path(i).name for i in indexes)}"
        )
    return indexes[0]


def _latest(state: Path) -> str:
    """The prefix that a `checkpoint` state file (CheckpointState in protobuf text format)
    names, relative to its folder as get_checkpoint_state resolves it; or the folder's own
    copy when the folder has been moved since."""
    text = state.read_text("utf-8", "replace")
    m = re.search(r'^model_checkpoint_path:\s*"((?:[^"\\]|\\.)*)"', text, re.M)
    if not m:
        raise TFCheckpointError(f"{state} names no model_checkpoint_path; pass the prefix")
    prefix = state.parent / codecs.escape_decode(m.group(1).encode())[0].decode()
    moved = state.parent / prefix.name
    if not Path(f"{prefix}.index").exists() and Path(f"{moved}.index").exists():
        return str(moved)
    return str(prefix)


def _index(prefix: str):
    """The header and name -> BundleEntryProto of a checkpoint's .index file."""
    from google.protobuf.message import DecodeError

    path = Path(f"{prefix}.index")
    if not path.is_file():
        raise _no_index(prefix, path)
    header_class, entry_class = _messages()
    try:
        rows = list(_table(path))
        if not rows or rows[0][0] != b"":
            raise TFCheckpointError(f"{path} has no bundle header: not a V2 checkpoint index")
        header = header_class.FromString(rows[0][1])
        entries = {
            key.decode(): entry_class.FromString(value)
            for key, value in rows[1:]
            if not key.startswith(b"\x00")  # one slice of a partitioned tensor
        }
    except (_Damaged, DecodeError, UnicodeDecodeError, struct.error) as e:
        raise TFCheckpointError(f"{path} is damaged ({e}); copy it again") from None
    if header.endianness != 0 or header.version.min_consumer > 1:
        raise TFCheckpointError(f"{path} is big-endian or of a newer format: use TensorFlow")
    return header, entries


def _no_index(prefix: str, index: Path) -> TFCheckpointError:
    """What to say when PREFIX.index is not there: a V1 file, a near name, or nothing."""
    single = Path(prefix)
    if single.is_file():  # a V1 checkpoint is one table file, with the table's magic
        with open(single, "rb") as f:
            f.seek(max(f.seek(0, 2) - 8, 0))
            v1 = f.read() == struct.pack("<Q", _MAGIC)
        what = "a V1 checkpoint (TensorFlow < 1.2), not V2" if v1 else "not a V2 checkpoint"
        return TFCheckpointError(
            f"{single} is {what}: V2 is PREFIX.index + PREFIX.data-*"
            + ("; restore it with tf.compat.v1.train.Saver and save it again" if v1 else "")
        )
    near = sorted(p.name for p in single.parent.glob(f"{single.name}*.index"))
    hint = f"; found {', '.join(near)}" if near else ""
    return TFCheckpointError(f"no checkpoint {prefix}: {index} does not exist{hint}")


def _table(path: Path) -> Iterator[tuple[bytes, bytes]]:
    """The (key, value) rows of a table file, in key order (table.cc)."""
    data = path.read_bytes()
    if len(data) < _FOOTER or data[-8:] != struct.pack("<Q", _MAGIC):
        raise TFCheckpointError(
            f"{path} is cut short, or no checkpoint index: it does not end in the table "
            "magic number; copy it again"
        )
    (_, _, index_offset, index_size), _ = _varints(data[-_FOOTER:], 4)  # metaindex: empty
    for _, handle in _entries(_block(data, index_offset, index_size, path)):
        yield from _entries(_block(data, *_varints(handle, 2)[0], path))


def _varints(buf: bytes, count: int, pos: int = 0) -> tuple[list[int], int]:
    """`count` varints (7 bits a byte, low first) from `pos`, and the position after."""
    out = []
    for _ in range(count):
        value = shift = 0
        while True:
            if pos >= len(buf) or shift >= 64:
                raise _Damaged("a varint runs past its block")
            byte, pos = buf[pos], pos + 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                break
        out.append(value)
    return out, pos


def _block(data: bytes, offset: int, size: int, path: Path) -> bytes:
    """A block's contents, its checksum checked (format.cc's ReadBlock)."""
    if offset + size + _TRAILER > len(data) - _FOOTER:
        raise TFCheckpointError(f"{path} is cut short: the block at byte {offset} runs past it")
    if masked_crc(data[offset : offset + size + 1]) != _u32(data, offset + size + 1):
        raise TFCheckpointError(f"{path}: the block at byte {offset} fails its checksum")
    if data[offset + size] != 0:  # TableBuilderOptions (tensor_bundle.cc): kNoCompression
        raise TFCheckpointError(
            f"{path}: the block at byte {offset} is compressed (type {data[offset + size]}), "
            "which TensorFlow never writes in a checkpoint index"
        )
    return data[offset : offset + size]


def _u32(buf: bytes, pos: int) -> int:
    return struct.unpack_from("<I", buf, pos)[0]


def _entries(block: bytes) -> Iterator[tuple[bytes, bytes]]:
    """A block's (key, value) rows; a key shares a prefix with the one before (block.cc)."""
    limit = len(block) - 4 * (1 + _u32(block, len(block) - 4)) if len(block) >= 4 else -1
    if limit < 0:
        raise _Damaged("a block smaller than its restart points")
    key, pos = b"", 0
    while pos < limit:
        (shared, unshared, size), pos = _varints(block, 3, pos)
        if shared > len(key) or pos + unshared + size > limit:
            raise _Damaged("a bad entry in a block")
        key = key[:shared] + block[pos : pos + unshared]
        yield key, block[pos + unshared : pos + unshared + size]
        pos += unshared + size


def _shard(prefix: str, num_shards: int, shard_id: int) -> Path:
    path = Path(f"{prefix}.data-{shard_id:05d}-of-{num_shards:05d}")
    if not path.is_file():
        raise TFCheckpointError(
            f"{path} is missing: the checkpoint has {num_shards} data shard(s), "
            f"{Path(prefix).name}.data-*-of-{num_shards:05d}, to copy beside its .index"
        )
    return path


def _tensor(path: Path, f, name: str, entry) -> np.ndarray:
    """One tensor read from its shard, its checksum checked (BundleReader::GetValue)."""
    f.seek(entry.offset)
    buf = bytearray(entry.size)  # writable: torch.from_numpy takes the array as it is
    where = f"tensor {name!r} (bytes {entry.offset}..{entry.offset + entry.size} of {path})"
    if f.readinto(buf) != entry.size:
        raise TFCheckpointError(f"{where}: the file is cut short; copy it again")
    shape, (kind, code) = _shape(entry), _DTYPES[entry.dtype]
    if kind == "string":
        array, crc = _strings(buf, math.prod(shape), where)
    elif entry.size != math.prod(shape) * np.dtype(code).itemsize:
        raise TFCheckpointError(f"{where}: its size does not fit its shape {shape} of {kind}")
    else:
        array, crc = np.frombuffer(buf, code), masked_crc(buf)
        array = _bfloat16(array) if kind == "bfloat16" else array
    if crc != entry.crc32c:
        raise TFCheckpointError(f"{where} fails its checksum: the file is damaged")
    return array.reshape(shape)


def _bfloat16(bits: np.ndarray) -> np.ndarray:
    """bfloat16 as ml_dtypes has it (as TensorFlow gives it), else as float32: bfloat16 is
    the top half of a float32, so the widening is exact."""
    try:
        import ml_dtypes
    except ImportError:
        return (bits.astype(np.uint32) << 16).view(np.float32)
    return bits.view(ml_dtypes.bfloat16)


def _strings(buf: bytearray, count: int, where: str) -> tuple[np.ndarray, int]:
    """A string tensor and its checksum: varint64 lengths, a masked CRC32C, the strings.
    The entry's CRC covers the lengths as uint32 (uint64 from 4 GiB), not as varints, then
    the rest (tensor_bundle.cc's WriteStringTensor)."""
    try:
        lengths, pos = _varints(buf, count)
    except _Damaged:
        raise TFCheckpointError(f"{where}: its string lengths are damaged") from None
    fixed = b"".join(struct.pack("<I" if n < 1 << 32 else "<Q", n) for n in lengths)
    crc = masked_crc(fixed + buf[pos:])
    out, pos = np.empty(count, object), pos + 4
    for i, n in enumerate(lengths):
        out[i], pos = bytes(buf[pos : pos + n]), pos + n
    if pos != len(buf):
        raise TFCheckpointError(f"{where}: its strings do not fill its bytes")
    return out, crc


@lru_cache(maxsize=1)
def _messages():
    """BundleHeaderProto and BundleEntryProto, built in a private protobuf pool.

    The messages are TensorFlow's (tensorflow/core/protobuf/tensor_bundle.proto and the
    framework's tensor_shape, tensor_slice, versions and types: same names, field numbers
    and types, so the bytes parse the same) but kept out of protobuf's default pool, where
    TensorFlow registers these names when imported: a second registration fails. DataType
    holds DT_INVALID alone: proto3 enums are open, so every number parses as itself.
    """
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    fdp = descriptor_pb2.FieldDescriptorProto
    f = descriptor_pb2.FileDescriptorProto(
        name="segment_deeplab/tf_tensor_bundle.proto", package="tensorflow", syntax="proto3"
    )
    opt, rep, i32, i64, msg = (
        fdp.LABEL_OPTIONAL, fdp.LABEL_REPEATED, fdp.TYPE_INT32, fdp.TYPE_INT64, fdp.TYPE_MESSAGE
    )  # fmt: skip

    def message(name: str, fields, parent=None):
        m = (parent.nested_type if parent else f.message_type).add(name=name)
        for fname, number, ftype, label, type_name in fields:
            field = m.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                field.type_name = f".tensorflow.{type_name}"
        return m

    f.enum_type.add(name="DataType").value.add(name="DT_INVALID", number=0)
    shape = message("TensorShapeProto", [
        ("dim", 2, msg, rep, "TensorShapeProto.Dim"), ("unknown_rank", 3, fdp.TYPE_BOOL, opt, "")
    ])  # fmt: skip
    message("Dim", [("size", 1, i64, opt, ""), ("name", 2, fdp.TYPE_STRING, opt, "")], shape)
    slices = message("TensorSliceProto", [("extent", 1, msg, rep, "TensorSliceProto.Extent")])
    extent = message("Extent", [("start", 1, i64, opt, ""), ("length", 2, i64, opt, "")], slices)
    extent.oneof_decl.add(name="has_length")
    extent.field[1].oneof_index = 0
    message("VersionDef", [
        ("producer", 1, i32, opt, ""), ("min_consumer", 2, i32, opt, ""),
        ("bad_consumers", 3, i32, rep, ""),
    ])  # fmt: skip
    header = message("BundleHeaderProto", [
        ("num_shards", 1, i32, opt, ""),
        ("endianness", 2, fdp.TYPE_ENUM, opt, "BundleHeaderProto.Endianness"),
        ("version", 3, msg, opt, "VersionDef"),
    ])  # fmt: skip
    endianness = header.enum_type.add(name="Endianness")
    endianness.value.add(name="LITTLE", number=0)
    endianness.value.add(name="BIG", number=1)
    message("BundleEntryProto", [
        ("dtype", 1, fdp.TYPE_ENUM, opt, "DataType"), ("shape", 2, msg, opt, "TensorShapeProto"),
        ("shard_id", 3, i32, opt, ""), ("offset", 4, i64, opt, ""), ("size", 5, i64, opt, ""),
        ("crc32c", 6, fdp.TYPE_FIXED32, opt, ""), ("slices", 7, msg, rep, "TensorSliceProto"),
    ])  # fmt: skip
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    find = pool.FindMessageTypeByName
    return tuple(
        message_factory.GetMessageClass(find(f"tensorflow.{n}"))
        for n in ("BundleHeaderProto", "BundleEntryProto")
    )
