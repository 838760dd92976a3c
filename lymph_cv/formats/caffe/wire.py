"""The protobuf wire format's varints, without the protobuf runtime (start-up paths use these)."""
from __future__ import annotations

_UINT64 = 1 << 64
#: A varint holds at most 64 bits, 7 per byte.
_MAX_SHIFT = 64


def encode_varint(value: int) -> bytes:
    """Protobuf varint of a (possibly negative, i.e. 64-bit two's complement) integer."""
    value &= _UINT64 - 1
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def decode_varint(data, position: int) -> tuple[int, int]:
    """(value, next position) of the varint at ``position`` of ``data``; (-1, position) when malformed."""
    value, shift = 0, 0
    while position < len(data) and shift < _MAX_SHIFT:
        byte = data[position]
        value |= (byte & 0x7F) << shift
        position += 1
        if byte < 0x80:
            return value, position
        shift += 7
    return -1, position
