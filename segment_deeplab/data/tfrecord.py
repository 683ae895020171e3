"""TFRecord files without TensorFlow: read and write the container, encode and decode
`tf.train.Example`.

A TFRecord file is a run of records, each (tensorflow/core/lib/io/record_writer.cc):

    uint64 length            little-endian
    uint32 masked CRC32C of the 8 length bytes
    bytes  data[length]
    uint32 masked CRC32C of the data

Both checksums are checked, so a flipped bit is reported instead of becoming a wrong
pixel (the `tfrecord` package's reader skips them). A record whose data checksum fails
can be stepped over, since its length is intact; a bad length checksum or a file cut
short ends the file there. TensorFlow's
GZIP and ZLIB options compress the whole file; they are found by the first bytes.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import crc32c

_HEADER = struct.Struct("<QI")  # length, masked CRC of the length
_CRC = struct.Struct("<I")
_MASK_DELTA = 0xA282EAD8
_GZIP_MAGIC = b"\x1f\x8b"
COMPRESSIONS = ("", "GZIP", "ZLIB")  # TensorFlow's names (tf.io.TFRecordOptions)


def masked_crc(data: bytes) -> int:
    """TFRecord's checksum: CRC32C, rotated and offset so that a CRC of data holding
    CRCs does not degenerate."""
    crc = crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


# What can be wrong with a record (Record.code)
BAD_LENGTH, BAD_DATA, CUT_SHORT, BAD_STREAM = "bad_length", "bad_data", "cut_short", "bad_stream"


@dataclass(frozen=True, slots=True)
class Record:
    """One record of a file; `data` is None when it is damaged, and then `code` says
    how and `error` in words. `ends`: nothing after it can be read (a bad length, a file
    cut short, a broken compressed stream)."""

    index: int  # position in the file, damaged records counted
    offset: int  # byte offset of its header (in the decompressed stream for GZIP/ZLIB)
    data: bytes | None
    code: str = ""
    error: str = ""

    @property
    def ends(self) -> bool:
        return self.code not in ("", BAD_DATA)


class _ZlibStream:
    """read(n) over a ZLIB-compressed file, as gzip.open gives for GZIP."""

    def __init__(self, f) -> None:
        self._f = f
        self._d = zlib.decompressobj()

    def read(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n and not self._d.eof:
            data = self._d.unconsumed_tail or self._f.read(1 << 16)
            got = self._d.decompress(data, n - len(out))
            if not data and not got:
                raise EOFError("the ZLIB stream ends before its end marker")
            out += got
        return bytes(out)


def compression_of(path: str | Path) -> str:
    """'', 'GZIP' or 'ZLIB', from the file's first bytes: a plain file starts with a
    header whose checksum holds, which compressed data almost never does."""
    with open(path, "rb") as f:
        head = f.read(_HEADER.size)
    if len(head) == _HEADER.size:
        length_crc = _HEADER.unpack(head)[1]
        if masked_crc(head[:8]) == length_crc:
            return ""
    if head[:2] == _GZIP_MAGIC:
        return "GZIP"
    if len(head) >= 2 and head[0] & 0x0F == 8 and (head[0] << 8 | head[1]) % 31 == 0:
        return "ZLIB"  # RFC 1950 header: deflate, and the check bits hold
    return ""


@contextmanager
def _open(path: Path, compression: str):
    if compression == "GZIP":
        with gzip.open(path, "rb") as f:
            yield f
    elif compression == "ZLIB":
        with open(path, "rb") as f:
            yield _ZlibStream(f)
    else:
        with open(path, "rb", buffering=1 << 20) as f:
            yield f


def iter_records(path: str | Path) -> Iterator[Record]:
    """Every record of a TFRecord file (plain, GZIP or ZLIB), checksums checked.

    Damaged records are yielded too, with `data=None`, so the caller can say where they
    are; after one with `ends=True` the file yields nothing more.
    """
    path = Path(path)
    compression = compression_of(path)
    size = None if compression else path.stat().st_size
    index = offset = 0
    with _open(path, compression) as f:
        while True:
            try:
                got = _read_one(f, index, offset, size)
            except (EOFError, OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
                why = f"the {compression} stream is damaged or cut short ({e})"
                yield Record(
                    index, offset, None, BAD_STREAM, f"{why}; the rest of the file is lost"
                )
                return
            if got is None:
                return
            rec, length = got
            yield rec
            if rec.ends:
                return
            index += 1
            offset += _HEADER.size + length + _CRC.size


def _read_one(f, index: int, offset: int, size: int | None) -> tuple[Record, int] | None:
    """The record at `offset` and its data length; None at the clean end of the file."""
    head = f.read(_HEADER.size)
    if not head:
        return None
    if len(head) < _HEADER.size:
        return Record(index, offset, None, CUT_SHORT, _cut(len(head), "its header")), 0
    length, length_crc = _HEADER.unpack(head)
    if masked_crc(head[:8]) != length_crc:
        why = "the checksum of its length does not match, so the record cannot be stepped over"
        return Record(index, offset, None, BAD_LENGTH, f"{why}; the rest of the file is lost"), 0
    left = None if size is None else size - offset - _HEADER.size
    if left is not None and length + _CRC.size > left:
        return Record(index, offset, None, CUT_SHORT, _cut(left, f"its {length} bytes")), 0
    data = f.read(length)
    crc = f.read(_CRC.size)
    if len(data) < length or len(crc) < _CRC.size:
        return Record(index, offset, None, CUT_SHORT, _cut(len(data), f"its {length} bytes")), 0
    if masked_crc(data) != _CRC.unpack(crc)[0]:
        return Record(
            index, offset, None, BAD_DATA, "the checksum of its data does not match"
        ), length
    return Record(index, offset, data), length


def _cut(have: int, of: str) -> str:
    return f"the file ends {have} bytes into {of} (cut short); the rest of the file is lost"


def write_records(path: str | Path, records: Iterable[bytes], compression: str = "") -> int:
    """Write `records` as a TFRecord file (atomically: a failed write leaves no half
    file); `compression` '' or 'GZIP' (TensorFlow reads both). Returns how many."""
    from segment_deeplab.atomic import staged  # torch comes with it; reading stays light

    if compression not in ("", "GZIP"):
        raise ValueError(f"compression {compression!r}: '' or 'GZIP'")
    n = 0
    with staged(path) as tmp, open(tmp, "wb") as raw:
        f = gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) if compression else raw
        for data in records:
            length = struct.pack("<Q", len(data))
            f.write(length + _CRC.pack(masked_crc(length)))
            f.write(data)
            f.write(_CRC.pack(masked_crc(data)))
            n += 1
        if f is not raw:
            f.close()
    return n


@lru_cache(maxsize=1)
def _example_class():
    """The tf.train.Example message class, built in a private protobuf pool.

    The message is TensorFlow's (tensorflow/core/example/{example,feature}.proto: same
    names, field numbers and types, so the bytes are the same), but kept out of
    protobuf's default pool: TensorFlow registers these names there when it is
    imported, and a second registration of a name fails, whichever comes first.
    """
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    fdp = descriptor_pb2.FieldDescriptorProto
    f = descriptor_pb2.FileDescriptorProto(
        name="segment_deeplab/tf_example.proto", package="tensorflow", syntax="proto3"
    )

    def message(name: str, fields, parent=None):
        m = (parent.nested_type if parent else f.message_type).add(name=name)
        for fname, number, ftype, label, type_name, oneof in fields:
            field = m.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                field.type_name = type_name
            if oneof is not None:
                field.oneof_index = oneof
        return m

    rep, opt = fdp.LABEL_REPEATED, fdp.LABEL_OPTIONAL
    message("BytesList", [("value", 1, fdp.TYPE_BYTES, rep, "", None)])
    message("FloatList", [("value", 1, fdp.TYPE_FLOAT, rep, "", None)])
    message("Int64List", [("value", 1, fdp.TYPE_INT64, rep, "", None)])
    feature = message(
        "Feature",
        [
            ("bytes_list", 1, fdp.TYPE_MESSAGE, opt, ".tensorflow.BytesList", 0),
            ("float_list", 2, fdp.TYPE_MESSAGE, opt, ".tensorflow.FloatList", 0),
            ("int64_list", 3, fdp.TYPE_MESSAGE, opt, ".tensorflow.Int64List", 0),
        ],
    )
    feature.oneof_decl.add(name="kind")
    features = message(
        "Features",
        [("feature", 1, fdp.TYPE_MESSAGE, rep, ".tensorflow.Features.FeatureEntry", None)],
    )
    entry = message(
        "FeatureEntry",
        [
            ("key", 1, fdp.TYPE_STRING, opt, "", None),
            ("value", 2, fdp.TYPE_MESSAGE, opt, ".tensorflow.Feature", None),
        ],
        parent=features,
    )
    entry.options.map_entry = True
    message("Example", [("features", 1, fdp.TYPE_MESSAGE, opt, ".tensorflow.Features", None)])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.Example"))


Value = bytes | str | int | float


def encode_example(features: dict[str, Value | list[Value]]) -> bytes:
    """A serialized tf.train.Example of `features`: bytes and str become bytes_list (str
    as UTF-8), ints int64_list, floats float_list; a list holds one of these kinds."""
    ex = _example_class()()
    for key, value in features.items():
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        feat = ex.features.feature[key]
        if all(isinstance(v, (bytes, str)) for v in values):
            feat.bytes_list.value.extend(v.encode() if isinstance(v, str) else v for v in values)
        elif all(isinstance(v, int) for v in values):
            feat.int64_list.value.extend(int(v) for v in values)
        elif all(isinstance(v, (int, float)) for v in values):
            feat.float_list.value.extend(float(v) for v in values)
        else:
            kinds = sorted({type(v).__name__ for v in values})
            raise TypeError(f"feature {key!r}: values of {', '.join(kinds)}; give one kind")
    return ex.SerializeToString()


def decode_example(data: bytes) -> dict[str, list]:
    """A serialized tf.train.Example as {key: list of values} (bytes, int or float).

    Raises:
        ValueError: the bytes are no Example.
    """
    from google.protobuf.message import DecodeError

    ex = _example_class()()
    try:
        ex.ParseFromString(data)
    except DecodeError as e:
        raise ValueError(f"not a tf.train.Example ({e})") from None
    out = {}
    for key, feat in ex.features.feature.items():
        kind = feat.WhichOneof("kind")
        out[key] = list(getattr(feat, kind).value) if kind else []
    return out
