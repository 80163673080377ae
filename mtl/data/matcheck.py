"""A structural check of MATLAB v5 ``.mat`` files before ``scipy.io.loadmat`` reads them.

scipy's compiled reader trusts the sizes inside the file: a damaged struct (e.g. a block of
zeroed bytes) can crash the whole process (a segmentation fault, not an exception). This walks
the element tree in Python, checking every size against its container, and raises
``DecodeError`` for a file that does not add up, so a damaged file is reported by name.

It also bounds the work: a compressed element is inflated in steps, never past the size its
own header declares nor past ``max_bytes`` in all (a few hundred kilobytes of compressed zeros
would otherwise inflate to gigabytes), and at most `MAX_ELEMENTS` elements are walked.
"""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

from mtl.data.io import DecodeError

_HEADER = 128
_MATRIX, _COMPRESSED = 14, 15
#: Bytes per element of the numeric data types (miINT8 .. miUTF32).
_ITEM = {1: 1, 2: 1, 3: 2, 4: 2, 5: 4, 6: 4, 7: 4, 9: 8, 12: 8, 13: 8, 16: 1, 17: 2, 18: 4}
_CELL, _STRUCT, _OBJECT, _CHAR, _SPARSE = 1, 2, 3, 4, 5
_MAX_DEPTH = 32
#: Most elements (arrays, struct fields, cells) walked in one file; PASCAL-Part files hold a few
#: thousand at most.
MAX_ELEMENTS = 1 << 15
#: Default cap on the bytes all compressed elements of one file may inflate to (64 MiB).
MAX_INFLATED = 1 << 26


class _Walker:
    def __init__(self, data: bytes, path: Path, endian: str, counter: list[int]) -> None:
        self.data, self.path, self.endian = data, path, endian
        self.counter = counter  # elements still allowed, shared by the walkers of one file
        self._pair = struct.Struct(f"{endian}II").unpack_from  # faster than numpy per tag

    def fail(self, what: str) -> DecodeError:
        return DecodeError(f"cannot read .mat file: {self.path} (damaged: {what})")

    def tag(self, pos: int, end: int) -> tuple[int, int, int, int]:
        """(type, nbytes, data start, next element) of the element at ``pos``."""
        if pos + 8 > end:
            raise self.fail(f"element tag at byte {pos} runs past its container")
        first, second = self._pair(self.data, pos)
        if first >> 16:  # small data element: type and size packed in 4 bytes, data in 4
            kind, nbytes = int(first & 0xFFFF), int(first >> 16)
            if nbytes > 4:
                raise self.fail(f"small element of {nbytes} bytes at byte {pos}")
            return kind, nbytes, pos + 4, pos + 8
        kind, nbytes, start = int(first), int(second), pos + 8
        stop = start + nbytes if kind == _COMPRESSED else start + (nbytes + 7) // 8 * 8
        if start + nbytes > end:
            raise self.fail(f"element of {nbytes} bytes at byte {pos} runs past its container")
        return kind, nbytes, start, min(stop, end)

    def ints(self, pos: int, end: int, what: str) -> tuple[int, ...]:
        kind, nbytes, start, following = self.tag(pos, end)
        if kind not in (5, 6) or nbytes % 4:
            raise self.fail(f"{what} of type {kind} and {nbytes} bytes")
        self.next = following
        return struct.unpack_from(f"{self.endian}{nbytes // 4}i", self.data, start)

    def skip(self, pos: int, end: int) -> tuple[int, int]:
        kind, nbytes, _, following = self.tag(pos, end)
        return kind, nbytes, following

    def matrix(self, start: int, end: int, depth: int) -> None:
        """Check the contents of one miMATRIX element spanning [start, end)."""
        self.counter[0] -= 1
        if self.counter[0] < 0:
            raise self.fail(f"more than {MAX_ELEMENTS} elements")
        if start == end:
            return  # an empty matrix (e.g. an empty cell)
        if depth > _MAX_DEPTH:
            raise self.fail("nested too deeply")
        flags = self.ints(start, end, "array flags")
        if len(flags) < 2:
            raise self.fail("array flags")
        cls = flags[0] & 0xFF
        dims = self.ints(self.next, end, "dimensions")
        if len(dims) < 2 or min(dims) < 0:
            raise self.fail(f"dimensions {list(dims)}")
        count = math.prod(dims)
        _, _, pos = self.skip(self.next, end)  # the array name
        if cls in (_STRUCT, _OBJECT):
            if cls == _OBJECT:
                _, _, pos = self.skip(pos, end)  # the class name
            length = self.ints(pos, end, "field name length")
            if len(length) != 1 or length[0] <= 0:
                raise self.fail(f"field name length {list(length)}")
            _, nbytes, pos = self.skip(self.next, end)
            if nbytes % length[0]:
                raise self.fail("field names")
            children = count * (nbytes // length[0])
        elif cls == _CELL:
            children = count
        else:
            if cls not in (_SPARSE, _CHAR):
                kind, nbytes, _ = self.skip(pos, end)
                if kind not in _ITEM or nbytes != count * _ITEM[kind]:
                    raise self.fail(f"{nbytes} data bytes of type {kind} for {count} values")
            return
        for _ in range(children):
            kind, nbytes, data_start, following = self.tag(pos, end)
            if kind != _MATRIX:
                raise self.fail(f"element of type {kind} where a matrix belongs")
            self.matrix(data_start, data_start + nbytes, depth + 1)
            pos = following


def check_mat(path: Path, data: bytes, max_bytes: int = MAX_INFLATED) -> None:
    """Raise ``DecodeError`` unless ``data`` (the bytes of ``path``) is a structurally sound
    MATLAB v5 file whose compressed elements inflate to at most ``max_bytes`` in all; v4 and
    v7.3 (HDF5) files are left to the reader."""
    if len(data) < _HEADER or not data.startswith(b"MATLAB 5.0"):
        return
    endian = {b"IM": "<", b"MI": ">"}.get(data[126:128])
    if endian is None:
        raise DecodeError(f"cannot read .mat file: {path} (damaged: endian indicator)")
    walker = _Walker(data, path, endian, [MAX_ELEMENTS])
    budget = max_bytes
    pos, end = _HEADER, len(data)
    while pos < end:
        if end - pos < 8 and not any(data[pos:end]):
            return  # padding
        kind, nbytes, start, following = walker.tag(pos, end)
        if kind == _COMPRESSED:
            body = _inflate(walker, data[start : start + nbytes], pos, budget)
            budget -= 8 + len(body)
            _Walker(body, path, endian, walker.counter).matrix(0, len(body), 0)
        elif kind == _MATRIX:
            walker.matrix(start, start + nbytes, 0)
        else:  # a variable is a matrix, compressed or not
            raise walker.fail(f"element of type {kind} at byte {pos} where a variable belongs")
        pos = following


def _inflate(walker: _Walker, compressed: bytes, pos: int, budget: int) -> bytes:
    """The contents of the one matrix element inside the compressed element at ``pos``,
    inflated in steps: its tag first, then no more than the size that tag declares, refused
    past ``budget`` bytes (zlib's one-shot ``decompress`` has no such limit)."""
    inflater = zlib.decompressobj()
    try:
        head = inflater.decompress(compressed, 8)
        if len(head) < 8:
            raise walker.fail(f"compressed element at byte {pos} holds no variable")
        first, second = struct.unpack(f"{walker.endian}II", head)
        if first != _MATRIX:
            raise walker.fail(f"compressed element at byte {pos} holds a type {first} element")
        declared = 8 + int(second)
        if declared > budget:
            raise walker.fail(
                f"compressed element at byte {pos} declares {declared} bytes, more than the "
                f"{budget} allowed for this file"
            )
        body = inflater.decompress(inflater.unconsumed_tail, declared - 8)
        extra = inflater.decompress(inflater.unconsumed_tail, 8)  # at most padding follows
    except zlib.error as error:
        raise walker.fail(f"compressed element at byte {pos}: {error}") from None
    if len(body) < declared - 8:
        raise walker.fail(f"compressed element at byte {pos} ends before its declared size")
    if any(extra) or inflater.unconsumed_tail:
        raise walker.fail(f"compressed element at byte {pos} inflates past its declared size")
    return body
