"""Read (and write) MindSpore `.ckpt` files without MindSpore.

A `.ckpt` is one protobuf message (MindSpore's checkpoint.proto):

    Checkpoint  { repeated Value value = 1; }
    Value       { string tag = 1; TensorProto tensor = 2; MapTensorProto maptensor = 3; }
    TensorProto { repeated int64 dims = 1; string tensor_type = 2; bytes tensor_content = 3; }

Large tensors may be split over several `Value`s with the same tag; their contents are joined.
The file is memory-mapped and each tensor is a view until the caller copies it, so an 800M
checkpoint (3.2 GB) is not held twice.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np

DTYPES = {
    "Float32": np.float32, "Float16": np.float16, "Float64": np.float64, "Int8": np.int8,
    "Int16": np.int16, "Int32": np.int32, "Int64": np.int64, "UInt8": np.uint8, "Bool": np.bool_,
    "UInt16": np.uint16, "UInt32": np.uint32, "UInt64": np.uint64, "BFloat16": "bfloat16",
}


class CheckpointFormatError(ValueError):
    pass


def _varint(buf, pos: int, end: int, path: Path) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise CheckpointFormatError(f"{path}: truncated varint at byte {pos} (the file is cut short)")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf, start: int, end: int, path: Path):
    """Yield (field number, wire type, value or (offset, length)) of one message."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end, path)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end, path)
            yield field, wire, value
        elif wire == 2:
            length, pos = _varint(buf, pos, end, path)
            if pos + length > end:
                raise CheckpointFormatError(
                    f"{path}: field {field} at byte {pos} runs past the end ({length} bytes); "
                    "the file is truncated or not a MindSpore checkpoint")
            yield field, wire, (pos, length)
            pos += length
        elif wire == 5:
            pos += 4
        elif wire == 1:
            pos += 8
        else:
            raise CheckpointFormatError(f"{path}: unknown protobuf wire type {wire} at byte {pos}: "
                                        "not a MindSpore checkpoint")


def _tensor(buf, start: int, end: int, path: Path, tag: str) -> tuple[list[int], str, tuple[int, int]]:
    dims, dtype, content = [], "", (start, 0)
    for field, wire, value in _fields(buf, start, end, path):
        if field == 1 and wire == 0:
            dims.append(value)
        elif field == 1 and wire == 2:  # packed repeated int64
            off, n = value
            p = off
            while p < off + n:
                d, p = _varint(buf, p, off + n, path)
                dims.append(d)
        elif field == 2:
            dtype = bytes(buf[value[0] : value[0] + value[1]]).decode()
        elif field == 3:
            content = value
    return dims, dtype, content


def read_mindspore_checkpoint(path: str | Path) -> dict[str, np.ndarray]:
    """{parameter name: array} of every tensor in a MindSpore `.ckpt` (optimizer state included)."""
    path = Path(path)
    with open(path, "rb") as f:
        size = path.stat().st_size
        if size == 0:
            raise CheckpointFormatError(f"{path} is empty")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    pieces: dict[str, list] = {}
    meta: dict[str, tuple[list[int], str]] = {}
    for field, wire, value in _fields(buf, 0, size, path):
        if field != 1 or wire != 2:
            raise CheckpointFormatError(
                f"{path}: unexpected field {field} at top level; not a MindSpore checkpoint")
        tag, tensor = None, None
        for f2, w2, v2 in _fields(buf, value[0], value[0] + value[1], path):
            if f2 == 1 and w2 == 2:
                tag = bytes(buf[v2[0] : v2[0] + v2[1]]).decode()
            elif f2 == 2 and w2 == 2:
                tensor = _tensor(buf, v2[0], v2[0] + v2[1], path, tag or "?")
        if tag is None or tensor is None:
            continue  # map tensors (embedding caches) are not model weights
        dims, dtype, (off, n) = tensor
        if dtype not in DTYPES:
            raise CheckpointFormatError(f"{path}: tensor {tag!r} has unsupported type {dtype!r}")
        pieces.setdefault(tag, []).append(memoryview(buf)[off : off + n])
        meta[tag] = (dims, dtype)
    out = {}
    for tag, parts in pieces.items():
        dims, dtype = meta[tag]
        raw = parts[0] if len(parts) == 1 else b"".join(bytes(p) for p in parts)
        if dtype == "BFloat16":
            a = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            a = np.frombuffer(raw, DTYPES[dtype])
        shape = [d for d in dims]
        if int(np.prod(shape)) != a.size:
            if a.size == 1 and (not shape or shape == [0]):
                shape = []  # scalars are written with dims [0]
            else:
                raise CheckpointFormatError(
                    f"{path}: tensor {tag!r} has {a.size} values but dims {dims}; the file is corrupt")
        out[tag] = a.reshape(shape)
    if not out:
        raise CheckpointFormatError(f"{path}: no tensors found; not a MindSpore checkpoint")
    return out


def _key(field: int, wire: int) -> bytes:
    return _enc_varint(field << 3 | wire)


def _enc_varint(v: int) -> bytes:
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def _len_field(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _enc_varint(len(payload)) + payload


def write_mindspore_checkpoint(tensors: dict[str, np.ndarray], path: str | Path) -> None:
    """Write arrays in the MindSpore `.ckpt` layout (for exporting back, and for tests)."""
    names = {np.dtype(v).name if not isinstance(v, str) else v: k for k, v in DTYPES.items()}
    with open(path, "wb") as f:
        for tag, array in tensors.items():
            a = np.ascontiguousarray(array)
            dims = b"".join(_key(1, 0) + _enc_varint(d) for d in (a.shape or (0,)))
            proto = dims + _len_field(2, names[a.dtype.name].encode()) + _len_field(3, a.tobytes())
            f.write(_len_field(1, _len_field(1, tag.encode()) + _len_field(2, proto)))
