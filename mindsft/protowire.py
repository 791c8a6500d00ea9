"""The protobuf wire format, by hand: MindSpore's `.ckpt` and TensorBoard's event files are both
protobuf, and writing them field by field lets us stream without loading whole messages (and
without depending on protobuf's Python runtime, which MindSpore switches to pure Python)."""

VARINT, I64, LEN, I32 = 0, 1, 2, 5


def varint(value):
    """Encode a non-negative integer as a base-128 varint."""
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def field(number, wire_type, payload):
    """A field key followed by its already-encoded payload."""
    return varint((number << 3) | wire_type) + payload


def len_field_head(number, length):
    """Key and length of a length-delimited field whose `length` bytes follow."""
    return varint(number << 3 | LEN) + varint(length)


def read_varint(buf, pos):
    """(value, next position) of the varint at buf[pos]."""
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return result, pos


def parse_fields(buf):
    """[(field number, value)] of a message held in memory: ints for varints, bytes otherwise."""
    pos, fields = 0, []
    while pos < len(buf):
        key, pos = read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == VARINT:
            value, pos = read_varint(buf, pos)
        elif wire == I64:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == I32:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            size, pos = read_varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        fields.append((number, value))
    return fields
