# cython: language_level=3, boundscheck=True, wraparound=True, cdivision=True, initializedcheck=False
"""Compiled fast path: the Cython twin of ``_pure``, with the same API and the same results.

``decode_batch`` walks the msgpack bytes at C level instead of building Python dicts: one pass checks the
framing (the bytes are exactly one complete msgpack object: a counter of the objects still owed, no stack, so no
depth is too deep), a second pass reads only the request fields the spec names, writing features straight into
the float32 output and creating only the str objects kept; every other value is skipped unread, by the same
counter. ``encode_predictions`` writes msgpack directly into one buffer, byte for byte what ``msgpack.packb``
writes. The pure-Python twin defines the semantics; the parity tests hold the two together.
"""

cimport numpy as cnp
from cpython.bytes cimport (
    PyBytes_AS_STRING,
    PyBytes_Check,
    PyBytes_CheckExact,
    PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
)
from cpython.bytearray cimport PyByteArray_Check
from cpython.float cimport PyFloat_AS_DOUBLE, PyFloat_Check, PyFloat_FromDouble
from cpython.list cimport PyList_Append
from cpython.long cimport PyLong_Check
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.unicode cimport PyUnicode_Check, PyUnicode_DecodeUTF8
from libc.math cimport isfinite
from libc.stdint cimport int8_t, int16_t, int32_t, int64_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

import msgpack
import numpy as np

from streamscore.fastpath._pure import EMPTY_DETAIL, NULL_DETAIL, TRUNCATED_DETAIL
from streamscore.fastpath._types import (
    BAD_ENTITIES,
    BAD_ENTITY,
    BAD_FEATURE,
    BAD_FEATURES,
    BAD_FIELD,
    BAD_ID,
    EMPTY_BATCH,
    EMPTY_VALUE,
    MISSING_ENTITY,
    MISSING_FEATURE,
    MISSING_ID,
    NOT_A_MAP,
    NULL_VALUE,
    TOO_LARGE,
    UNDECODABLE,
    DecodedBatch,
    DecodeError,
)

cnp.import_array()

cdef extern from "Python.h":
    object PyUnicode_New(Py_ssize_t size, Py_UCS4 maxchar)
    void* PyUnicode_DATA(object text)
    const char* PyUnicode_AsUTF8AndSize(object text, Py_ssize_t* size) except NULL
    long long PyLong_AsLongLongAndOverflow(object value, int* overflow) except? -1
    unsigned long long PyLong_AsUnsignedLongLong(object value) except? -1
    Py_ssize_t PY_SSIZE_T_MAX

# ------------------------------------------------------------------------------------------------------------
# Framing: are these bytes exactly one complete msgpack object?
# ------------------------------------------------------------------------------------------------------------

cdef enum:
    _MAX_TOPIC_LEN = 249

cdef int64_t _NO_DEADLINE = 0x7fffffffffffffff  # _types.NO_DEADLINE

# Framing outcomes (the first problem met reading front to back, as in _pure._frame).
cdef enum:
    _VALID = 0
    _E_TRUNCATED = 1  # a header, a payload or a container's entries run past the end
    _E_RESERVED = 2  # the reserved byte 0xc1
    _E_EXTRA = 3  # bytes after the first object


cdef inline uint32_t _be16(const unsigned char* p) noexcept nogil:
    return (<uint32_t>p[0] << 8) | p[1]


cdef inline uint32_t _be32(const unsigned char* p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline uint64_t _be64(const unsigned char* p) noexcept nogil:
    return (<uint64_t>_be32(p) << 32) | _be32(p + 4)


cdef inline Py_ssize_t _load(const unsigned char* p, int width) noexcept nogil:
    """A big-endian length of 1, 2 or 4 bytes."""
    if width == 1:
        return p[0]
    if width == 2:
        return _be16(p)
    return _be32(p)


cdef inline bint _ascii(const unsigned char* text, Py_ssize_t size) noexcept nogil:
    """Short keys and ids are ASCII: one OR over the bytes settles them without the UTF-8 state machine."""
    cdef Py_ssize_t i
    cdef unsigned char seen = 0
    for i in range(size):
        seen |= text[i]
    return seen < 0x80


cdef bint _valid_utf8(const unsigned char* text, Py_ssize_t size) noexcept nogil:
    """What CPython's strict UTF-8 decoder accepts: no overlong forms, no surrogates, nothing past U+10FFFF."""
    cdef Py_ssize_t i = 0
    cdef uint64_t word
    cdef unsigned char lead, second
    while i < size:
        while i + 8 <= size:  # ASCII runs eight bytes at a time
            memcpy(&word, text + i, 8)
            if word & 0x8080808080808080ULL:
                break
            i += 8
        if i >= size:
            break
        lead = text[i]
        if lead < 0x80:
            i += 1
        elif lead < 0xc2:
            return False
        elif lead < 0xe0:
            if i + 1 >= size or (text[i + 1] & 0xc0) != 0x80:
                return False
            i += 2
        elif lead < 0xf0:
            if i + 2 >= size:
                return False
            second = text[i + 1]
            if lead == 0xe0:
                if second < 0xa0 or second > 0xbf:
                    return False
            elif lead == 0xed:
                if second < 0x80 or second > 0x9f:
                    return False
            elif (second & 0xc0) != 0x80:
                return False
            if (text[i + 2] & 0xc0) != 0x80:
                return False
            i += 3
        elif lead < 0xf5:
            if i + 3 >= size:
                return False
            second = text[i + 1]
            if lead == 0xf0:
                if second < 0x90 or second > 0xbf:
                    return False
            elif lead == 0xf4:
                if second < 0x80 or second > 0x8f:
                    return False
            elif (second & 0xc0) != 0x80:
                return False
            if (text[i + 2] & 0xc0) != 0x80 or (text[i + 3] & 0xc0) != 0x80:
                return False
            i += 4
        else:
            return False
    return True


cdef int _frame(const unsigned char* buf, Py_ssize_t size, Py_ssize_t* where) noexcept nogil:
    """_pure._frame at C level, step for step: one counter of the objects still owed, no stack, any depth.

    Every length is checked against the bytes left before anything past it is read. ``where`` gets the offset
    of a reserved byte, or the count of trailing bytes.
    """
    cdef Py_ssize_t pos = 0, owed = 1, width
    cdef unsigned char head, fixed
    while owed > 0:
        if pos >= size:
            return _E_TRUNCATED
        head = buf[pos]
        owed -= 1
        fixed = _FIXED_SIZE[head]
        if fixed:  # int, float, nil, bool
            pos += fixed
        elif head <= 0x9f:  # fixmap, fixarray
            owed += (head & 0x0f) << (head <= 0x8f)
            pos += 1
        elif head <= 0xbf:  # fixstr
            pos += 1 + (head & 0x1f)
        elif head == 0xc1:
            where[0] = pos
            return _E_RESERVED
        elif 0xd4 <= head <= 0xd8:  # fixext 1/2/4/8/16 (numbers were settled by _FIXED_SIZE)
            pos += 2 + (1 << (head - 0xd4))
        else:
            if head <= 0xc6:  # bin 8/16/32
                width = 1 << (head - 0xc4)
            elif head <= 0xc9:  # ext 8/16/32
                width = 1 << (head - 0xc7)
            elif head <= 0xdb:  # str 8/16/32
                width = 1 << (head - 0xd9)
            else:  # array 16/32, map 16/32
                width = 2 if head == 0xdc or head == 0xde else 4
            if size - pos - 1 < width:
                return _E_TRUNCATED
            if head >= 0xdc:
                owed += _load(buf + pos + 1, width) << (head >= 0xde)
                pos += 1 + width
            else:  # the payload, after the ext type byte for an ext
                pos += 1 + width + (0xc7 <= head <= 0xc9) + _load(buf + pos + 1, width)
        if pos > size:
            return _E_TRUNCATED
    if pos != size:
        where[0] = size - pos
        return _E_EXTRA
    return _VALID


# ------------------------------------------------------------------------------------------------------------
# Reading a validated message
# ------------------------------------------------------------------------------------------------------------

cdef enum:
    _K_NIL
    _K_BOOL
    _K_INT  # fits int64: ``integer``
    _K_UINT  # above INT64_MAX: ``unsigned_integer``
    _K_FLOAT32
    _K_FLOAT64
    _K_STR
    _K_BIN
    _K_ARRAY
    _K_MAP
    _K_EXT
    _K_TIMESTAMP

_TYPE_NAMES = ("NoneType", "bool", "int", "int", "float", "float", "str", "bytes", "list", "dict", "ExtType",
               "Timestamp")

ctypedef struct _Item:
    int kind
    int64_t integer
    uint64_t unsigned_integer
    double real  # float32 values widened, as msgpack gives them to Python
    Py_ssize_t length  # str/bin/ext: bytes of payload; array/map: items/entries
    Py_ssize_t data  # str/bin/ext: offset of the payload


cdef inline Py_ssize_t _read_item(const unsigned char* buf, Py_ssize_t pos, _Item* item) noexcept nogil:
    """Decode the item at ``pos`` of a message that ``_frame`` accepted (so every read is in bounds).

    Returns the offset just past the item, or for an array/map just past its header (its first element).
    """
    cdef unsigned char head = buf[pos]
    cdef const unsigned char* body = buf + pos + 1
    cdef uint32_t bits32
    cdef uint64_t bits64
    cdef float single
    cdef int width
    if head <= 0x7f:
        item.kind = _K_INT
        item.integer = head
        return pos + 1
    if head >= 0xe0:
        item.kind = _K_INT
        item.integer = <int8_t>head
        return pos + 1
    if head <= 0x9f:
        item.kind = _K_MAP if head <= 0x8f else _K_ARRAY
        item.length = head & 0x0f
        return pos + 1
    if head <= 0xbf:
        item.kind = _K_STR
        item.length = head & 0x1f
        item.data = pos + 1
        return item.data + item.length
    if head == 0xc0:
        item.kind = _K_NIL
        return pos + 1
    if head == 0xc2 or head == 0xc3:
        item.kind = _K_BOOL
        item.integer = head & 1
        return pos + 1
    if head <= 0xc6:
        width = 1 << (head - 0xc4)
        item.kind = _K_BIN
        item.length = _load(body, width)
        item.data = pos + 1 + width
        return item.data + item.length
    if head <= 0xc9:
        width = 1 << (head - 0xc7)
        item.length = _load(body, width)
        item.kind = _K_TIMESTAMP if <int8_t>body[width] == -1 else _K_EXT
        item.data = pos + 2 + width
        return item.data + item.length
    if head == 0xca:
        bits32 = _be32(body)
        memcpy(&single, &bits32, 4)
        item.kind = _K_FLOAT32
        item.real = single
        return pos + 5
    if head == 0xcb:
        bits64 = _be64(body)
        memcpy(&item.real, &bits64, 8)
        item.kind = _K_FLOAT64
        return pos + 9
    if head <= 0xcf:
        item.kind = _K_INT
        if head == 0xcc:
            item.integer = body[0]
            return pos + 2
        if head == 0xcd:
            item.integer = _be16(body)
            return pos + 3
        if head == 0xce:
            item.integer = _be32(body)
            return pos + 5
        bits64 = _be64(body)
        if bits64 > <uint64_t>0x7fffffffffffffff:
            item.kind = _K_UINT
            item.unsigned_integer = bits64
        else:
            item.integer = <int64_t>bits64
        return pos + 9
    if head <= 0xd3:
        item.kind = _K_INT
        if head == 0xd0:
            item.integer = <int8_t>body[0]
            return pos + 2
        if head == 0xd1:
            item.integer = <int16_t><uint16_t>_be16(body)
            return pos + 3
        if head == 0xd2:
            item.integer = <int32_t>_be32(body)
            return pos + 5
        item.integer = <int64_t>_be64(body)
        return pos + 9
    if head <= 0xd8:
        item.length = 1 << (head - 0xd4)
        item.kind = _K_TIMESTAMP if <int8_t>body[0] == -1 else _K_EXT
        item.data = pos + 2
        return item.data + item.length
    if head <= 0xdb:
        width = 1 << (head - 0xd9)
        item.kind = _K_STR
        item.length = _load(body, width)
        item.data = pos + 1 + width
        return item.data + item.length
    width = 2 if head == 0xdc or head == 0xde else 4
    item.kind = _K_MAP if head >= 0xde else _K_ARRAY
    item.length = _load(body, width)
    return pos + 1 + width


cdef unsigned char _FIXED_SIZE[256]  # bytes of an int/float/nil/bool item by its first byte; 0 for the rest


cdef void _fill_fixed_sizes() noexcept:
    cdef int head
    for head in range(256):
        _FIXED_SIZE[head] = 0
    for head in range(0x80):
        _FIXED_SIZE[head] = 1  # positive fixint
    for head in range(0xe0, 0x100):
        _FIXED_SIZE[head] = 1  # negative fixint
    _FIXED_SIZE[0xc0] = _FIXED_SIZE[0xc2] = _FIXED_SIZE[0xc3] = 1
    _FIXED_SIZE[0xca] = 5
    _FIXED_SIZE[0xcb] = 9
    for head in range(4):
        _FIXED_SIZE[0xcc + head] = _FIXED_SIZE[0xd0 + head] = 1 + (1 << head)


_fill_fixed_sizes()


cdef inline Py_ssize_t _skip(const unsigned char* buf, Py_ssize_t pos) noexcept nogil:
    """Offset just past the (framed) object at ``pos``; a number/nil/bool in one table lookup."""
    cdef unsigned char fixed = _FIXED_SIZE[buf[pos]]
    if fixed:
        return pos + fixed
    return _skip_any(buf, pos)


cdef Py_ssize_t _skip_any(const unsigned char* buf, Py_ssize_t pos) noexcept nogil:
    """Offset just past the (framed) object at ``pos``, unread: counts the objects still owed, no stack."""
    cdef Py_ssize_t owed = 1
    cdef _Item item
    while owed > 0:
        owed -= 1
        pos = _read_item(buf, pos, &item)
        if item.kind == _K_ARRAY:
            owed += item.length
        elif item.kind == _K_MAP:
            owed += 2 * item.length
    return pos


cdef inline bint _utf8(const unsigned char* text, Py_ssize_t size) noexcept nogil:
    """A str that is read must be valid UTF-8 (framing does not look inside strs)."""
    return _ascii(text, size) or _valid_utf8(text, size)


cdef inline bint _str_len_ok(const unsigned char* text, Py_ssize_t size, Py_ssize_t max_len) noexcept nogil:
    """0 < len(decoded) <= max_len, counting code points of valid UTF-8 (continuation bytes do not count)."""
    cdef Py_ssize_t i, points = 0
    if size == 0:
        return False
    if size <= max_len:  # a code point takes at least one byte
        return True
    for i in range(size):
        points += (text[i] & 0xc0) != 0x80
    return points <= max_len


cdef inline bint _is_topic(const unsigned char* text, Py_ssize_t size) noexcept nogil:
    """Kafka topic name: ASCII letters, digits, '.', '_', '-', at most 249 of them."""
    cdef Py_ssize_t i
    cdef unsigned char c
    if size > _MAX_TOPIC_LEN:
        return False
    for i in range(size):
        c = text[i]
        if not ((c'a' <= c <= c'z') or (c'A' <= c <= c'Z') or (c'0' <= c <= c'9') or c == c'.' or c == c'_'
                or c == c'-'):
            return False
    return True


cdef inline int _number(const _Item* item, float* out) noexcept nogil:
    """float32 of a msgpack number, as np.float32 of the unpacked value: 0 not a number, 1 finite, 2 not."""
    cdef double wide
    if item.kind == _K_INT:
        wide = <double>item.integer  # an int goes through float64 first, exactly like np.float32(int)
    elif item.kind == _K_UINT:
        wide = <double>item.unsigned_integer
    elif item.kind == _K_FLOAT32 or item.kind == _K_FLOAT64:
        wide = item.real
    else:
        return 0
    out[0] = <float>wide
    return 1 if isfinite(out[0]) else 2


cdef object _decimal(const _Item* item):
    """str() of a msgpack int, without building the int."""
    cdef char digits[24]
    cdef Py_ssize_t at = 24
    cdef uint64_t magnitude
    cdef bint negative = item.kind == _K_INT and item.integer < 0
    if item.kind == _K_UINT:
        magnitude = item.unsigned_integer
    elif negative:
        magnitude = <uint64_t>0 - <uint64_t>item.integer
    else:
        magnitude = <uint64_t>item.integer
    while True:
        at -= 1
        digits[at] = <char>(c'0' + magnitude % 10)
        magnitude //= 10
        if magnitude == 0:
            break
    if negative:
        at -= 1
        digits[at] = c'-'
    return _ascii_str(digits + at, 24 - at)


cdef inline object _ascii_str(const char* data, Py_ssize_t size):
    """A str of ASCII bytes, filled directly: the common case of ids and keys, without the UTF-8 decoder."""
    text = PyUnicode_New(size, 127)
    memcpy(PyUnicode_DATA(text), data, size)
    return text


cdef inline object _text(const unsigned char* buf, const _Item* item):
    """The str of a msgpack str that ``_utf8`` accepted."""
    if _ascii(buf + item.data, item.length):
        return _ascii_str(<const char*>buf + item.data, item.length)
    return PyUnicode_DecodeUTF8(<const char*>buf + item.data, item.length, NULL)


# ------------------------------------------------------------------------------------------------------------
# The spec, compiled once per DecodeSpec object
# ------------------------------------------------------------------------------------------------------------

cdef enum:
    _F_ID
    _F_ENTITIES
    _F_FEATURES
    _F_DEADLINE
    _F_SENT
    _F_REPLY_TO
    _F_VERSION
    _FIELDS


cdef inline bint _same(const unsigned char* key, const char* name, Py_ssize_t size) noexcept nogil:
    """memcmp for the short names of a request, without a library call per key."""
    cdef Py_ssize_t i
    for i in range(size):
        if key[i] != <unsigned char>name[i]:
            return False
    return True


cdef inline int _request_field(const unsigned char* key, Py_ssize_t size) noexcept nogil:
    """Which top-level request field a str key names, or -1."""
    if size == 2:
        return _F_ID if key[0] == c'i' and key[1] == c'd' else -1
    if size == 8:
        if key[0] == c'e':
            return _F_ENTITIES if _same(key, b"entities", 8) else -1
        if key[0] == c'f':
            return _F_FEATURES if _same(key, b"features", 8) else -1
        return _F_REPLY_TO if _same(key, b"reply_to", 8) else -1
    if size == 7:
        if key[0] == c'v':
            return _F_VERSION if _same(key, b"version", 7) else -1
        return _F_SENT if _same(key, b"sent_ms", 7) else -1
    if size == 11 and _same(key, b"deadline_ms", 11):
        return _F_DEADLINE
    return -1


cdef class _Names:
    """UTF-8 bytes of a tuple of names, for matching map keys without decoding them."""

    cdef Py_ssize_t count
    cdef list encoded  # owns the bytes the pointers point into
    cdef list names
    cdef const char** data
    cdef Py_ssize_t* size
    cdef Py_ssize_t* first  # index of the first name equal to this one: duplicates read the same value

    def __cinit__(self, names):
        cdef Py_ssize_t i, j
        self.names = list(names)
        self.count = len(self.names)
        # a name that is not valid UTF-8 (a lone surrogate) matches no key, as no str of the twin's equals it
        self.encoded = [_strict_utf8(name) for name in self.names]
        self.data = <const char**>PyMem_Malloc(max(1, self.count) * sizeof(char*))
        self.size = <Py_ssize_t*>PyMem_Malloc(max(1, self.count) * sizeof(Py_ssize_t))
        self.first = <Py_ssize_t*>PyMem_Malloc(max(1, self.count) * sizeof(Py_ssize_t))
        if self.data == NULL or self.size == NULL or self.first == NULL:
            raise MemoryError()
        for i in range(self.count):
            if self.encoded[i] is None:
                self.data[i] = NULL
                self.size[i] = -1  # no key has a negative size
            else:
                self.data[i] = PyBytes_AS_STRING(self.encoded[i])
                self.size[i] = PyBytes_GET_SIZE(self.encoded[i])
            self.first[i] = i
            for j in range(i):
                if self.encoded[j] == self.encoded[i]:
                    self.first[i] = j
                    break

    def __dealloc__(self):
        PyMem_Free(self.data)
        PyMem_Free(self.size)
        PyMem_Free(self.first)

    cdef inline Py_ssize_t find(self, const unsigned char* key, Py_ssize_t size, Py_ssize_t hint) noexcept:
        """Index of the first name equal to ``key``, or -1; ``hint`` is tried first (keys tend to come in order)."""
        cdef Py_ssize_t i
        if hint < self.count and self.size[hint] == size and _same(key, self.data[hint], size):
            return self.first[hint]
        for i in range(self.count):
            if self.size[i] == size and _same(key, self.data[i], size):
                return i
        return -1


cdef object _strict_utf8(str name):
    try:
        return name.encode("utf-8")
    except UnicodeEncodeError:
        return None


cdef Py_ssize_t _clamp(object value):
    return <Py_ssize_t>max(-1, min(value, PY_SSIZE_T_MAX))


cdef class _Spec:
    cdef object spec
    cdef _Names entity_names
    cdef _Names feature_names
    cdef Py_ssize_t columns
    cdef object feature_sizes  # int64 array: size of each request feature
    cdef object feature_columns  # int64 array: first column of each request feature
    cdef object has_default  # uint8 array
    cdef object defaults  # float32 array, one per column
    cdef int64_t* size_of
    cdef int64_t* column_of
    cdef unsigned char* defaulted
    cdef float* default_of
    cdef Py_ssize_t max_str_len
    cdef Py_ssize_t max_message_bytes
    cdef Py_ssize_t max_requests

    def __cinit__(self, spec):
        cdef Py_ssize_t index, column = 0
        self.spec = spec
        features = tuple(spec.request_features)
        for feature in features:
            if feature.size < 0:
                raise ValueError(f"request feature {feature.name!r} has size {feature.size}: a size is at least 0")
        self.entity_names = _Names(spec.entity_keys)
        self.feature_names = _Names([feature.name for feature in features])
        self.columns = sum(feature.size for feature in features)
        self.feature_sizes = np.array([feature.size for feature in features] or [0], dtype=np.int64)
        self.feature_columns = np.zeros(max(1, len(features)), dtype=np.int64)
        self.has_default = np.zeros(max(1, len(features)), dtype=np.uint8)
        self.defaults = np.zeros(max(1, self.columns), dtype=np.float32)
        for index, feature in enumerate(features):
            self.feature_columns[index] = column
            if feature.default is not None:
                self.has_default[index] = 1
                # the twin's own assignment, so the default is rounded exactly as there
                self.defaults[column:column + feature.size] = feature.default
            column += feature.size
        self.size_of = <int64_t*>cnp.PyArray_DATA(self.feature_sizes)
        self.column_of = <int64_t*>cnp.PyArray_DATA(self.feature_columns)
        self.defaulted = <unsigned char*>cnp.PyArray_DATA(self.has_default)
        self.default_of = <float*>cnp.PyArray_DATA(self.defaults)
        self.max_str_len = _clamp(spec.max_str_len)
        self.max_message_bytes = _clamp(spec.max_message_bytes)
        self.max_requests = _clamp(spec.max_requests_per_message)


_compiled_specs: dict = {}


cdef _Spec _compile(object spec):
    """Specs are frozen, so one compiled form per spec object is kept (keyed by identity, bounded)."""
    cdef _Spec compiled = _compiled_specs.get(id(spec))
    if compiled is not None and compiled.spec is spec:
        return compiled
    compiled = _Spec(spec)
    if len(_compiled_specs) >= 64:
        _compiled_specs.clear()
    _compiled_specs[id(spec)] = compiled
    return compiled


# ------------------------------------------------------------------------------------------------------------
# Decode
# ------------------------------------------------------------------------------------------------------------

cdef class _Decoder:
    """Columns of one decode_batch call; requests are appended row by row, errors one per bad message/element."""

    cdef _Spec spec
    cdef Py_ssize_t count  # requests accepted
    cdef Py_ssize_t capacity
    cdef object features_out
    cdef object deadline_out
    cdef object sent_out
    cdef object source_out
    cdef object element_out
    cdef object span_out
    cdef float* features
    cdef int64_t* deadline
    cdef int64_t* sent
    cdef int32_t* source
    cdef int32_t* element
    cdef int64_t* span
    cdef list ids
    cdef list entities
    cdef list reply_to
    cdef list version
    cdef list errors
    cdef list pending_keys  # entity keys of the request being read, appended once it is accepted
    cdef Py_ssize_t field_at[_FIELDS]  # offset of each request field's value, -1 when absent
    cdef Py_ssize_t* entity_at
    cdef Py_ssize_t* feature_at
    cdef Py_ssize_t start, end  # byte span of the request being read

    def __cinit__(self, _Spec spec, Py_ssize_t capacity):
        self.spec = spec
        self.count = 0
        self.ids = []
        self.entities = [[] for _ in range(spec.entity_names.count)]
        self.reply_to = []
        self.version = []
        self.errors = []
        self.pending_keys = [None] * spec.entity_names.count
        self.entity_at = <Py_ssize_t*>PyMem_Malloc(max(1, spec.entity_names.count) * sizeof(Py_ssize_t))
        self.feature_at = <Py_ssize_t*>PyMem_Malloc(max(1, spec.feature_names.count) * sizeof(Py_ssize_t))
        if self.entity_at == NULL or self.feature_at == NULL:
            raise MemoryError()
        self._allocate(max(1, capacity))

    def __dealloc__(self):
        PyMem_Free(self.entity_at)
        PyMem_Free(self.feature_at)

    cdef int _allocate(self, Py_ssize_t capacity) except -1:
        """(Re)allocate the numeric columns for ``capacity`` requests, keeping the rows accepted so far."""
        cdef Py_ssize_t columns = self.spec.columns
        features = _empty(capacity, columns, cnp.NPY_FLOAT32, self.features, self.count * columns * sizeof(float))
        deadline = _empty(capacity, -1, cnp.NPY_INT64, self.deadline, self.count * sizeof(int64_t))
        sent = _empty(capacity, -1, cnp.NPY_INT64, self.sent, self.count * sizeof(int64_t))
        source = _empty(capacity, -1, cnp.NPY_INT32, self.source, self.count * sizeof(int32_t))
        element = _empty(capacity, -1, cnp.NPY_INT32, self.element, self.count * sizeof(int32_t))
        span = _empty(capacity, 2, cnp.NPY_INT64, self.span, self.count * 2 * sizeof(int64_t))
        self.features_out, self.deadline_out, self.sent_out, self.source_out = features, deadline, sent, source
        self.element_out, self.span_out = element, span
        self.features = <float*>cnp.PyArray_DATA(features)
        self.deadline = <int64_t*>cnp.PyArray_DATA(deadline)
        self.sent = <int64_t*>cnp.PyArray_DATA(sent)
        self.source = <int32_t*>cnp.PyArray_DATA(source)
        self.element = <int32_t*>cnp.PyArray_DATA(element)
        self.span = <int64_t*>cnp.PyArray_DATA(span)
        self.capacity = capacity
        return 0

    cdef int _reserve(self, Py_ssize_t more) except -1:
        if self.count + more > self.capacity:
            self._allocate(max(16, 2 * self.capacity, self.count + more))
        return 0

    cdef int _error(self, Py_ssize_t message_index, Py_ssize_t element_index, str kind, str detail,
                    object request_id=None) except -1:
        """An error of the whole message (element_index -1), or of the element being read (with its span)."""
        span = (self.start, self.end) if element_index >= 0 else None
        self.errors.append(DecodeError(message_index, element_index, kind, detail, request_id, span))
        return 1

    cdef int add_message(self, object message, Py_ssize_t message_index) except -1:
        cdef const unsigned char* buf
        cdef Py_ssize_t size, pos, element, where = 0
        cdef int status
        cdef _Item item
        if not PyBytes_CheckExact(message):
            if message is None:
                return self._error(message_index, -1, NULL_VALUE, NULL_DETAIL)
            try:
                message = bytes(memoryview(message))
            except Exception:  # not bytes-like, a released memoryview, a failing exporter: as the twin
                return self._error(message_index, -1, UNDECODABLE, f"not a valid msgpack message: a message value "
                                                                   f"must be bytes, got {type(message).__name__}")
        buf = <const unsigned char*>PyBytes_AS_STRING(message)
        size = PyBytes_GET_SIZE(message)
        if size == 0:
            return self._error(message_index, -1, EMPTY_VALUE, EMPTY_DETAIL)
        if size > self.spec.max_message_bytes:
            return self._error(message_index, -1, TOO_LARGE, f"message of {size} bytes is over the limit of "
                                                             f"{self.spec.spec.max_message_bytes}")
        status = _frame(buf, size, &where)
        if status != _VALID:
            if status == _E_TRUNCATED:
                detail = TRUNCATED_DETAIL
            elif status == _E_RESERVED:
                detail = f"not a valid msgpack message: the reserved byte 0xc1 at offset {where}"
            else:
                detail = f"not a valid msgpack message: {where} trailing byte(s) after the object"
            return self._error(message_index, -1, UNDECODABLE, detail)
        pos = _read_item(buf, 0, &item)
        if item.kind != _K_ARRAY:
            self.add_request(buf, 0, message_index, -1)
        elif item.length == 0:
            self._error(message_index, -1, EMPTY_BATCH, "a msgpack array with no request")
        elif item.length > self.spec.max_requests:
            self._error(message_index, -1, TOO_LARGE, f"{item.length} requests in one message, over the limit "
                                                      f"of {self.spec.spec.max_requests_per_message}")
        else:
            self._reserve(item.length)
            for element in range(item.length):
                pos = self.add_request(buf, pos, message_index, element)
        return 0

    cdef Py_ssize_t add_request(self, const unsigned char* buf, Py_ssize_t pos, Py_ssize_t message_index,
                                Py_ssize_t element_index) except -1:
        """Read the request at ``pos`` into the next row, or record why not; returns the offset past it."""
        cdef _Item item, key
        cdef Py_ssize_t entry, field
        cdef Py_ssize_t after = _read_item(buf, pos, &item)
        self.start = pos
        if item.kind != _K_MAP:
            self.end = _skip(buf, pos)
            self._error(message_index, element_index, NOT_A_MAP,
                        f"a request must be a msgpack map, got {_TYPE_NAMES[item.kind]}")
            return self.end
        for field in range(_FIELDS):
            self.field_at[field] = -1
        pos = after
        for entry in range(item.length):
            after = _read_item(buf, pos, &key)
            field = _request_field(buf + key.data, key.length) if key.kind == _K_STR else -1
            if key.kind != _K_STR:
                after = _skip(buf, pos)
            if field >= 0:
                self.field_at[field] = after  # a repeated key keeps its last value, as in a dict
            pos = _skip(buf, after)
        self.end = pos
        self._reserve(1)
        self._read_request(buf, message_index, element_index)
        return pos

    cdef int _find_keys(self, const unsigned char* buf, Py_ssize_t pos, _Names names, Py_ssize_t* found) except -1:
        """Record the offset of the value of each name in the map at ``pos`` (last one wins), -1 if absent."""
        cdef _Item item, key
        cdef Py_ssize_t entry, index, hint = 0
        cdef Py_ssize_t after
        for index in range(names.count):
            found[index] = -1
        pos = _read_item(buf, pos, &item)
        for entry in range(item.length):
            after = _read_item(buf, pos, &key)
            if key.kind == _K_STR:
                index = names.find(buf + key.data, key.length, hint)
                if index >= 0:
                    found[index] = after
                    hint = index + 1
            else:
                after = _skip(buf, pos)
            pos = _skip(buf, after)
        return 0

    cdef int _read_request(self, const unsigned char* buf, Py_ssize_t message_index,
                           Py_ssize_t element_index) except -1:
        """The twin's checks in the twin's order; the row is kept only if every one passes."""
        cdef _Item item
        cdef _Spec spec = self.spec
        cdef object request_id = None
        cdef int status
        cdef Py_ssize_t index
        cdef int64_t deadline = _NO_DEADLINE, sent = 0
        if self.field_at[_F_ID] < 0:
            return self._error(message_index, element_index, MISSING_ID, "request has no 'id'")
        _read_item(buf, self.field_at[_F_ID], &item)
        if item.kind == _K_STR and not _utf8(buf + item.data, item.length):
            return self._error(message_index, element_index, BAD_ID, "'id' is not valid UTF-8")
        if item.kind != _K_STR or not _str_len_ok(buf + item.data, item.length, spec.max_str_len):
            return self._error(message_index, element_index, BAD_ID, f"'id' must be a non-empty str of at most "
                                                                     f"{spec.spec.max_str_len} characters")
        request_id = _text(buf, &item)
        status = self._read_entities(buf, message_index, element_index, request_id)
        if status:
            return status
        status = self._read_features(buf, message_index, element_index, request_id)
        if status:
            return status
        status = self._read_int(buf, _F_DEADLINE, &deadline)
        if status:
            return self._error(message_index, element_index, BAD_FIELD,
                               "'deadline_ms' must be an int64 (epoch milliseconds)", request_id)
        status = self._read_int(buf, _F_SENT, &sent)
        if status:
            return self._error(message_index, element_index, BAD_FIELD,
                               "'sent_ms' must be an int64 (epoch milliseconds)", request_id)
        reply_to = self._read_str(buf, _F_REPLY_TO, message_index, element_index, request_id, True)
        if reply_to is False:
            return 1
        version = self._read_str(buf, _F_VERSION, message_index, element_index, request_id, False)
        if version is False:
            return 1
        PyList_Append(self.ids, request_id)
        for index in range(spec.entity_names.count):
            PyList_Append(<list>self.entities[index], self.pending_keys[index])
        self.deadline[self.count] = deadline
        self.sent[self.count] = sent
        self.source[self.count] = <int32_t>message_index
        self.element[self.count] = <int32_t>element_index
        self.span[2 * self.count] = self.start
        self.span[2 * self.count + 1] = self.end
        PyList_Append(self.reply_to, reply_to)
        PyList_Append(self.version, version)
        self.count += 1
        return 0

    cdef int _read_entities(self, const unsigned char* buf, Py_ssize_t message_index, Py_ssize_t element_index,
                            object request_id) except -1:
        cdef _Item item
        cdef _Names names = self.spec.entity_names
        cdef Py_ssize_t index, at
        if self.field_at[_F_ENTITIES] >= 0:
            _read_item(buf, self.field_at[_F_ENTITIES], &item)
            if item.kind != _K_MAP:
                return self._error(message_index, element_index, BAD_ENTITIES,
                                   f"'entities' must be a map, got {_TYPE_NAMES[item.kind]}", request_id)
            self._find_keys(buf, self.field_at[_F_ENTITIES], names, self.entity_at)
        else:
            for index in range(names.count):
                self.entity_at[index] = -1
        for index in range(names.count):
            at = self.entity_at[names.first[index]]
            if at < 0:
                return self._error(message_index, element_index, MISSING_ENTITY,
                                   f"entity key {names.names[index]!r} is missing from 'entities'", request_id)
            _read_item(buf, at, &item)
            if item.kind == _K_INT or item.kind == _K_UINT:
                self.pending_keys[index] = _decimal(&item)
            elif item.kind == _K_STR and not _utf8(buf + item.data, item.length):
                return self._error(message_index, element_index, BAD_ENTITY,
                                   f"entity key {names.names[index]!r} is not valid UTF-8", request_id)
            elif item.kind == _K_STR and _str_len_ok(buf + item.data, item.length, self.spec.max_str_len):
                self.pending_keys[index] = _text(buf, &item)
            else:
                return self._error(message_index, element_index, BAD_ENTITY,
                                   f"entity key {names.names[index]!r} must be an int or a non-empty str of at "
                                   f"most {self.spec.spec.max_str_len} characters", request_id)
        return 0

    cdef int _read_features(self, const unsigned char* buf, Py_ssize_t message_index, Py_ssize_t element_index,
                            object request_id) except -1:
        cdef _Item item
        cdef _Spec spec = self.spec
        cdef _Names names = spec.feature_names
        cdef float* row = self.features + self.count * spec.columns
        cdef Py_ssize_t index, at, offset, column, size, pos
        cdef int status
        if self.field_at[_F_FEATURES] >= 0:
            _read_item(buf, self.field_at[_F_FEATURES], &item)
            if item.kind != _K_MAP:
                return self._error(message_index, element_index, BAD_FEATURES,
                                   f"'features' must be a map, got {_TYPE_NAMES[item.kind]}", request_id)
            self._find_keys(buf, self.field_at[_F_FEATURES], names, self.feature_at)
        else:
            for index in range(names.count):
                self.feature_at[index] = -1
        for index in range(names.count):
            at = self.feature_at[names.first[index]]
            column = spec.column_of[index]
            size = spec.size_of[index]
            if at < 0:
                if not spec.defaulted[index]:
                    return self._error(message_index, element_index, MISSING_FEATURE,
                                       f"request feature {names.names[index]!r} is missing and has no default",
                                       request_id)
                memcpy(row + column, spec.default_of + column, size * sizeof(float))
                continue
            pos = _read_item(buf, at, &item)
            if size == 1:
                if item.kind == _K_ARRAY:  # a one-element list stands for its number
                    if item.length != 1:
                        return self._error(message_index, element_index, BAD_FEATURE,
                                           f"feature {names.names[index]!r} must be a number or a list of one "
                                           f"number, got a list of {item.length}", request_id)
                    _read_item(buf, pos, &item)
                status = _number(&item, row + column)
                if status != 1:
                    return self._bad_number(buf, &item, status, index, message_index, element_index, request_id)
                continue
            if item.kind != _K_ARRAY or item.length != size:
                return self._error(message_index, element_index, BAD_FEATURE,
                                   f"feature {names.names[index]!r} must be a list of {size} numbers", request_id)
            for offset in range(size):
                pos = _read_item(buf, pos, &item)
                status = _number(&item, row + column + offset)
                if status != 1:
                    return self._bad_number(buf, &item, status, index, message_index, element_index, request_id)
        return 0

    cdef int _bad_number(self, const unsigned char* buf, const _Item* item, int status, Py_ssize_t index,
                         Py_ssize_t message_index, Py_ssize_t element_index, object request_id) except -1:
        name = self.spec.feature_names.names[index]
        if status == 0:
            detail = f"feature {name!r} must be a number, got {_TYPE_NAMES[item.kind]}"
        else:  # only a float can fail to be finite: a msgpack int is below 2**64
            detail = f"feature {name!r} must be finite in float32, got {PyFloat_FromDouble(item.real)!r}"
        return self._error(message_index, element_index, BAD_FEATURE, detail, request_id)

    cdef int _read_int(self, const unsigned char* buf, int field, int64_t* out) except -1:
        """1 when the field is neither absent, nil nor an int64 (``out`` is left as it is when absent or nil)."""
        cdef _Item item
        if self.field_at[field] < 0:
            return 0
        _read_item(buf, self.field_at[field], &item)
        if item.kind == _K_NIL:
            return 0
        if item.kind != _K_INT:
            return 1
        out[0] = item.integer
        return 0

    cdef object _read_str(self, const unsigned char* buf, int field, Py_ssize_t message_index,
                          Py_ssize_t element_index, object request_id, bint is_topic):
        """None when absent or nil, the str when valid, False after recording the error."""
        cdef _Item item
        if self.field_at[field] < 0:
            return None
        _read_item(buf, self.field_at[field], &item)
        if item.kind == _K_NIL:
            return None
        name = "reply_to" if is_topic else "version"
        if item.kind == _K_STR and not _utf8(buf + item.data, item.length):
            self._error(message_index, element_index, BAD_FIELD, f"{name!r} is not valid UTF-8", request_id)
            return False
        if item.kind != _K_STR or not _str_len_ok(buf + item.data, item.length, self.spec.max_str_len):
            self._error(message_index, element_index, BAD_FIELD, f"{name!r} must be a non-empty str of at most "
                                                                 f"{self.spec.spec.max_str_len} characters",
                        request_id)
            return False
        if is_topic and not _is_topic(buf + item.data, item.length):
            self._error(message_index, element_index, BAD_FIELD,
                        "'reply_to' must be a Kafka topic name: letters, digits, '.', '_', '-'", request_id)
            return False
        return _text(buf, &item)

    cdef object batch(self):
        cdef Py_ssize_t n = self.count, columns = self.spec.columns
        features, deadline, sent, source = self.features_out, self.deadline_out, self.sent_out, self.source_out
        element, span = self.element_out, self.span_out
        if n != self.capacity:  # exact-size arrays, as the twin returns
            features = _empty(n, columns, cnp.NPY_FLOAT32, self.features, n * columns * sizeof(float))
            deadline = _empty(n, -1, cnp.NPY_INT64, self.deadline, n * sizeof(int64_t))
            sent = _empty(n, -1, cnp.NPY_INT64, self.sent, n * sizeof(int64_t))
            source = _empty(n, -1, cnp.NPY_INT32, self.source, n * sizeof(int32_t))
            element = _empty(n, -1, cnp.NPY_INT32, self.element, n * sizeof(int32_t))
            span = _empty(n, 2, cnp.NPY_INT64, self.span, n * 2 * sizeof(int64_t))
        # positional (the field order of _types.DecodedBatch): measurably cheaper than keywords for small batches
        return DecodedBatch(self.ids, self.entities, features, deadline, sent, self.reply_to, self.version, source,
                            self.errors, element, span)


cdef cnp.ndarray _empty(Py_ssize_t rows, Py_ssize_t columns, int type_number, const void* start, size_t size):
    """A new C-ordered array of (rows,) or, with columns >= 0, (rows, columns), its first ``size`` bytes copied
    from ``start``."""
    cdef cnp.npy_intp dims[2]
    dims[0] = rows
    dims[1] = columns
    cdef cnp.ndarray array = cnp.PyArray_EMPTY(1 if columns < 0 else 2, dims, type_number, 0)
    if size:
        memcpy(cnp.PyArray_DATA(array), start, size)
    return array


def decode_batch(messages, spec):
    """Decode raw request messages (single requests or msgpack arrays of them) into columns.

    Never raises for a message: each bad message (or bad element of a batch message) becomes one DecodeError.
    """
    cdef _Decoder decoder = _Decoder(_compile(spec), len(messages))
    cdef Py_ssize_t message_index = 0
    for message in messages:
        decoder.add_message(message, message_index)
        message_index += 1
    return decoder.batch()


# ------------------------------------------------------------------------------------------------------------
# Assemble
# ------------------------------------------------------------------------------------------------------------

cdef Py_ssize_t _wrap_index(Py_ssize_t index, Py_ssize_t size, str axis) except? -2:
    """numpy's reading of one index: negative counts from the end, out of range is an IndexError."""
    if -size <= index < size:
        return index + size if index < 0 else index
    raise IndexError(f"index {index} is out of bounds for {axis} with size {size}")


cdef cnp.ndarray _typed_array(object values, int ndim, int type_number, str what):
    """``values`` as an ndarray of ``ndim`` dimensions and that numpy type (converted only when it is not)."""
    cdef cnp.ndarray array = values if type(values) is np.ndarray else np.asarray(values)
    if cnp.PyArray_NDIM(array) != ndim:
        raise IndexError(f"{what} must be {ndim}-dimensional, got {cnp.PyArray_NDIM(array)} dimension(s)")
    if cnp.PyArray_TYPE(array) != type_number:
        array = array.astype(cnp.PyArray_DescrFromType(type_number))
    return array


cdef class _Block:
    """A ViewBlock's arrays as float32 / int64 with raw pointers and strides, prepared once per assemble call."""

    cdef cnp.ndarray values_array
    cdef cnp.ndarray rows_array
    cdef cnp.ndarray defaults_array
    cdef const char* values
    cdef const char* row_of_request
    cdef const char* defaults
    cdef Py_ssize_t value_rows, value_columns, value_stride, column_stride
    cdef Py_ssize_t requests, row_stride, default_count, default_stride
    cdef bint rows_are_int32

    def __cinit__(self, block):
        self.values_array = _typed_array(block.values, 2, cnp.NPY_FLOAT32, "a view block's values")
        rows = block.row_of_request if type(block.row_of_request) is np.ndarray else np.asarray(block.row_of_request)
        self.rows_are_int32 = cnp.PyArray_TYPE(rows) == cnp.NPY_INT32
        self.rows_array = rows if self.rows_are_int32 else _typed_array(rows, 1, cnp.NPY_INT64, "row_of_request")
        if cnp.PyArray_NDIM(self.rows_array) != 1:
            raise IndexError("row_of_request must be 1-dimensional")
        self.defaults_array = _typed_array(block.defaults, 1, cnp.NPY_FLOAT32, "a view block's defaults")
        self.values = cnp.PyArray_BYTES(self.values_array)
        self.value_rows, self.value_columns = self.values_array.shape[0], self.values_array.shape[1]
        self.value_stride, self.column_stride = self.values_array.strides[0], self.values_array.strides[1]
        self.row_of_request = cnp.PyArray_BYTES(self.rows_array)
        self.requests, self.row_stride = self.rows_array.shape[0], self.rows_array.strides[0]
        self.defaults = cnp.PyArray_BYTES(self.defaults_array)
        self.default_count, self.default_stride = self.defaults_array.shape[0], self.defaults_array.strides[0]

    cdef int fill(self, float* matrix, Py_ssize_t rows, Py_ssize_t width, Py_ssize_t out,
                  Py_ssize_t column) except -1:
        """One output column: each request's row of ``values``, or the view's default where that row is < 0."""
        cdef Py_ssize_t row, view_row, value_column = -1, default_column = -1
        if self.requests < rows:
            raise IndexError(f"index {self.requests} is out of bounds for axis 0 with size {self.requests}")
        for row in range(rows):
            if self.rows_are_int32:
                view_row = (<const int32_t*>(self.row_of_request + row * self.row_stride))[0]
            else:
                view_row = (<const int64_t*>(self.row_of_request + row * self.row_stride))[0]
            if view_row < 0:
                if default_column < 0:
                    default_column = _wrap_index(column, self.default_count, "axis 0")
                matrix[row * width + out] = (<const float*>(self.defaults + default_column * self.default_stride))[0]
                continue
            if view_row >= self.value_rows:
                raise IndexError(f"index {view_row} is out of bounds for axis 0 with size {self.value_rows}")
            if value_column < 0:
                value_column = _wrap_index(column, self.value_columns, "axis 1")
            matrix[row * width + out] = (<const float*>(self.values + view_row * self.value_stride
                                                        + value_column * self.column_stride))[0]
        return 0


cdef class _Plan:
    """The InputColumns of one model, read once: a manifest's column list is the same objects on every call."""

    cdef object columns  # the sequence, kept so that its id is not reused while cached
    cdef tuple items  # the InputColumn objects, compared by identity (they are frozen)
    cdef Py_ssize_t width
    cdef unsigned char* from_request
    cdef Py_ssize_t* block
    cdef Py_ssize_t* column

    def __cinit__(self, columns):
        cdef Py_ssize_t out
        self.columns = columns
        self.items = tuple(columns)
        self.width = len(self.items)
        self.from_request = <unsigned char*>PyMem_Malloc(max(1, self.width))
        self.block = <Py_ssize_t*>PyMem_Malloc(max(1, self.width) * sizeof(Py_ssize_t))
        self.column = <Py_ssize_t*>PyMem_Malloc(max(1, self.width) * sizeof(Py_ssize_t))
        if self.from_request == NULL or self.block == NULL or self.column == NULL:
            raise MemoryError()
        for out, source in enumerate(self.items):
            self.from_request[out] = bool(source.from_request)
            self.column[out] = source.column
            self.block[out] = 0 if self.from_request[out] else source.block

    def __dealloc__(self):
        PyMem_Free(self.from_request)
        PyMem_Free(self.block)
        PyMem_Free(self.column)

    cdef bint describes(self, object columns):
        cdef Py_ssize_t out
        if len(columns) != self.width:
            return False
        for out in range(self.width):
            if columns[out] is not self.items[out]:
                return False
        return True


_plans: dict = {}


cdef _Plan _plan_for(object columns):
    cdef _Plan plan = _plans.get(id(columns))
    if plan is not None and plan.columns is columns and plan.describes(columns):
        return plan
    plan = _Plan(columns)
    if len(_plans) >= 64:
        _plans.clear()
    _plans[id(columns)] = plan
    return plan


def assemble(request_features, blocks, columns):
    """Build the float32 (n x inputs) model input in the manifest's column order."""
    cdef _Plan plan = _plan_for(columns)
    cdef cnp.ndarray request = _typed_array(request_features, 2, cnp.NPY_FLOAT32, "request_features")
    cdef Py_ssize_t rows = request.shape[0], width = plan.width, out, row, column
    cdef Py_ssize_t request_stride = request.strides[0], request_column_stride = request.strides[1]
    cdef const char* request_data = cnp.PyArray_BYTES(request)
    cdef cnp.npy_intp dims[2]
    dims[0], dims[1] = rows, width
    cdef cnp.ndarray matrix = cnp.PyArray_EMPTY(2, dims, cnp.NPY_FLOAT32, 0)
    cdef float* output = <float*>cnp.PyArray_DATA(matrix)
    cdef dict prepared = {}  # block index -> _Block: each block converted once per call
    cdef _Block block
    for out in range(width):
        if plan.from_request[out]:
            column = _wrap_index(plan.column[out], request.shape[1], "axis 1")
            for row in range(rows):
                output[row * width + out] = (<const float*>(request_data + row * request_stride
                                                            + column * request_column_stride))[0]
            continue
        view_block = blocks[plan.block[out]]
        if rows == 0:  # the twin reads nothing more from a block when there is no row
            continue
        block = prepared.get(plan.block[out])
        if block is None:
            block = prepared[plan.block[out]] = _Block(view_block)
        block.fill(output, rows, width, out, plan.column[out])
    return matrix


# ------------------------------------------------------------------------------------------------------------
# Encode
# ------------------------------------------------------------------------------------------------------------

cdef enum:
    _RECURSE_LIMIT = 1024  # msgpack's Packer: an object reached with a nest limit below 0 is an error

ctypedef struct _Buffer:
    char* data
    Py_ssize_t length
    Py_ssize_t capacity


cdef int _grow(_Buffer* out, Py_ssize_t more) except -1:
    cdef Py_ssize_t capacity = max(256, 2 * out.capacity, out.length + more)
    cdef char* data = <char*>PyMem_Realloc(out.data, capacity)
    if data == NULL:
        raise MemoryError()
    out.data = data
    out.capacity = capacity
    return 0


cdef inline int _put(_Buffer* out, const void* data, Py_ssize_t size) except -1:
    if out.length + size > out.capacity:
        _grow(out, size)
    memcpy(out.data + out.length, data, size)
    out.length += size
    return 0


cdef inline int _put_head(_Buffer* out, unsigned char head, uint64_t value, int width) except -1:
    """One header byte followed by ``value`` as a big-endian number of ``width`` bytes."""
    cdef unsigned char bytes_[9]
    cdef int i
    bytes_[0] = head
    for i in range(width):
        bytes_[width - i] = <unsigned char>(value >> (8 * i))
    return _put(out, bytes_, 1 + width)


cdef int _pack_int64(_Buffer* out, int64_t value) except -1:
    if value >= 0:
        return _pack_uint64(out, <uint64_t>value)
    if value >= -32:
        return _put_head(out, <unsigned char>(value & 0xff), 0, 0)
    if value >= -128:
        return _put_head(out, 0xd0, <uint64_t>value, 1)
    if value >= -32768:
        return _put_head(out, 0xd1, <uint64_t>value, 2)
    if value >= -2147483648:
        return _put_head(out, 0xd2, <uint64_t>value, 4)
    return _put_head(out, 0xd3, <uint64_t>value, 8)


cdef int _pack_uint64(_Buffer* out, uint64_t value) except -1:
    if value < 0x80:
        return _put_head(out, <unsigned char>value, 0, 0)
    if value < 0x100:
        return _put_head(out, 0xcc, value, 1)
    if value < 0x10000:
        return _put_head(out, 0xcd, value, 2)
    if value < 0x100000000:
        return _put_head(out, 0xce, value, 4)
    return _put_head(out, 0xcf, value, 8)


cdef int _pack_pylong(_Buffer* out, object value) except -1:
    cdef int overflow = 0
    cdef long long signed_value = PyLong_AsLongLongAndOverflow(value, &overflow)
    if overflow == 0:
        return _pack_int64(out, signed_value)
    if overflow > 0:
        try:
            return _pack_uint64(out, PyLong_AsUnsignedLongLong(value))
        except OverflowError:
            pass
    raise OverflowError("Integer value out of range")


cdef inline int _pack_double(_Buffer* out, double value) except -1:
    cdef uint64_t bits
    memcpy(&bits, &value, 8)
    return _put_head(out, 0xcb, bits, 8)


cdef int _pack_length(_Buffer* out, Py_ssize_t size, unsigned char fix, unsigned char fix_limit,
                      unsigned char head8, unsigned char head16) except -1:
    """Header of a str (fix 0xa0), array (0x90) or map (0x80): fix form, then 8 (str only), 16, 32 bits."""
    if size < fix_limit:
        return _put_head(out, fix | <unsigned char>size, 0, 0)
    if head8 and size < 0x100:
        return _put_head(out, head8, size, 1)
    if size < 0x10000:
        return _put_head(out, head16, size, 2)
    if size <= 0xffffffff:
        return _put_head(out, head16 + 1, size, 4)
    raise ValueError("object too large to pack in msgpack")


cdef inline int _pack_str(_Buffer* out, object text) except -1:
    cdef Py_ssize_t size
    cdef const char* data = PyUnicode_AsUTF8AndSize(text, &size)  # strict: a lone surrogate raises, as in msgpack
    _pack_length(out, size, 0xa0, 32, 0xd9, 0xda)
    return _put(out, data, size)


cdef int _pack(_Buffer* out, object value, int nest_limit) except -1:
    """msgpack.Packer(use_bin_type=True)._pack for the plain types; anything else is handed to msgpack."""
    cdef Py_ssize_t size
    if nest_limit < 0:
        raise ValueError("recursion limit exceeded")
    if value is None:
        return _put(out, b"\xc0", 1)
    if value is True:
        return _put(out, b"\xc3", 1)
    if value is False:
        return _put(out, b"\xc2", 1)
    # subclasses too (np.float64, np.str_, IntEnum), in msgpack's order: int, float, (bytes,) str
    if PyLong_Check(value):
        return _pack_pylong(out, value)
    if PyFloat_Check(value):
        return _pack_double(out, PyFloat_AS_DOUBLE(value))
    if PyUnicode_Check(value) and not PyBytes_Check(value) and not PyByteArray_Check(value):
        return _pack_str(out, value)
    if type(value) is dict:
        _pack_length(out, len(<dict>value), 0x80, 16, 0, 0xde)
        for key, item in (<dict>value).items():
            _pack(out, key, nest_limit - 1)
            _pack(out, item, nest_limit - 1)
        return 0
    if type(value) is list or type(value) is tuple:
        size = len(value)
        _pack_length(out, size, 0x90, 16, 0, 0xdc)
        for item in value:
            _pack(out, item, nest_limit - 1)
        return 0
    return _pack_with_msgpack(out, value, nest_limit)


cdef int _pack_with_msgpack(_Buffer* out, object value, int nest_limit) except -1:
    """Bytes, subclasses, ExtType, numpy scalars...: msgpack packs them, at the same depth (wrapped in lists)."""
    cdef Py_ssize_t depth = _RECURSE_LIMIT - nest_limit, level
    for level in range(depth):
        value = [value]
    packed = msgpack.packb(value, use_bin_type=True)
    return _put(out, PyBytes_AS_STRING(packed) + depth, PyBytes_GET_SIZE(packed) - depth)


def _output_value(values, row):
    """The twin's reading of one output row, for arrays the typed path does not cover (strings included)."""
    convert = str if values.dtype.kind in "UO" else float
    if values.ndim == 1:
        return convert(values[row])
    return [convert(value) for value in values[row]]


cdef cnp.ndarray _column_as(object values, int max_ndim, str kinds, int type_number):
    """``values`` with direct typed access when reading it row by row as the twin does gives the same numbers.

    An array of that type is used as it is; another numeric kind in ``kinds`` is converted once (exactly, for
    these kinds); anything else (object arrays, lists, uint64 for int64) returns None: read per row as the twin.
    """
    if type(values) is not np.ndarray:
        return None
    cdef cnp.ndarray array = values
    cdef int ndim = cnp.PyArray_NDIM(array)
    if ndim < 1 or ndim > max_ndim:
        return None
    if cnp.PyArray_TYPE(array) == type_number or (type_number == cnp.NPY_FLOAT64
                                                  and cnp.PyArray_TYPE(array) == cnp.NPY_FLOAT32):
        return array
    if array.dtype.kind not in kinds or (type_number == cnp.NPY_INT64 and array.dtype.kind == "u"
                                         and array.dtype.itemsize >= 8):
        return None
    return array.astype(cnp.PyArray_DescrFromType(type_number))


cdef class _Output:
    """One model output, read per row: float32/float64 directly, other arrays as the twin reads them."""

    cdef object values
    cdef cnp.ndarray typed
    cdef const char* data
    cdef bint single  # float32 (else float64)
    cdef Py_ssize_t rows, width, row_stride, column_stride  # width -1: one value per row

    def __cinit__(self, values):
        self.values = values
        self.typed = _column_as(values, 2, "fiub", cnp.NPY_FLOAT64)
        if self.typed is None:
            return
        self.data = cnp.PyArray_BYTES(self.typed)
        self.single = cnp.PyArray_TYPE(self.typed) == cnp.NPY_FLOAT32
        self.rows, self.row_stride = self.typed.shape[0], self.typed.strides[0]
        if cnp.PyArray_NDIM(self.typed) == 2:
            self.width, self.column_stride = self.typed.shape[1], self.typed.strides[1]
        else:
            self.width, self.column_stride = -1, 0

    cdef inline double _at(self, Py_ssize_t row, Py_ssize_t column) noexcept:
        cdef const char* at = self.data + row * self.row_stride + column * self.column_stride
        return (<const float*>at)[0] if self.single else (<const double*>at)[0]

    cdef int pack_row(self, _Buffer* out, Py_ssize_t row) except -1:
        cdef Py_ssize_t column
        if self.typed is None:
            return _pack(out, _output_value(self.values, row), _RECURSE_LIMIT - 2)
        if row >= self.rows:
            raise IndexError(f"index {row} is out of bounds for axis 0 with size {self.rows}")
        if self.width < 0:
            return _pack_double(out, self._at(row, 0))
        _pack_length(out, self.width, 0x90, 16, 0, 0xdc)
        for column in range(self.width):
            _pack_double(out, self._at(row, column))
        return 0


cdef class _IntColumn:
    """An int column read per row as ``int(values[row])``: int64 directly, other arrays as the twin reads them."""

    cdef object values
    cdef cnp.ndarray typed
    cdef const char* data
    cdef Py_ssize_t rows, stride

    def __cinit__(self, values):
        self.values = values
        self.typed = _column_as(values, 1, "iub", cnp.NPY_INT64)
        if self.typed is not None:
            self.data = cnp.PyArray_BYTES(self.typed)
            self.rows, self.stride = self.typed.shape[0], self.typed.strides[0]

    cdef int pack_row(self, _Buffer* out, Py_ssize_t row, bint zero_is_nil, int nest_limit) except -1:
        cdef int64_t value
        if self.typed is None:
            python_value = int(self.values[row])
            return _pack(out, (python_value or None) if zero_is_nil else python_value, nest_limit)
        if row >= self.rows:
            raise IndexError(f"index {row} is out of bounds for axis 0 with size {self.rows}")
        value = (<const int64_t*>(self.data + row * self.stride))[0]
        if zero_is_nil and value == 0:
            return _put(out, b"\xc0", 1)
        return _pack_int64(out, value)


cdef object _as_list(object values):
    return values if type(values) is list else list(values)


cdef inline int _put_part(_Buffer* out, const _Buffer* parts, Py_ssize_t start, Py_ssize_t end) except -1:
    return _put(out, parts.data + start, end - start)


cdef class _Encoder:
    """The parts of one PredictionBatch that every row shares, packed once into ``parts``."""

    cdef _Buffer parts
    cdef Py_ssize_t[5] cut  # parts: [0, cut0) model..status key; [cut0, cut1) lineage up to feature_ts_ms;
    # [cut1, cut2) the packed view names; [cut2, cut3) rest of lineage, timings_us, received_ms key; [cut3, cut4) sent
    cdef list views  # (start, end) of each view name in parts
    cdef list timestamps  # _IntColumn per view
    cdef list output_names  # (start, end) of each output name in parts
    cdef list outputs  # _Output per output

    def __cinit__(self):
        self.parts.data = NULL
        self.parts.length = self.parts.capacity = 0

    def __dealloc__(self):
        PyMem_Free(self.parts.data)

    cdef int prepare(self, object batch, object sent_ms) except -1:
        """Pack what is shared, in the twin's key order, at the depth each value has in the prediction."""
        cdef _Buffer* parts = &self.parts
        cdef int value_limit = _RECURSE_LIMIT - 1, entry_limit = _RECURSE_LIMIT - 2
        _put(parts, b"\xa5model", 6)
        _pack(parts, batch.model, value_limit)
        _put(parts, b"\xa7version", 8)
        _pack(parts, batch.version, value_limit)
        _put(parts, b"\xa6status", 7)
        self.cut[0] = parts.length
        entries = dict(batch.lineage)
        entries["feature_ts_ms"] = None  # keeps its place when lineage already has the key, as ** does
        keys = list(entries)
        split = keys.index("feature_ts_ms")
        _put(parts, b"\xa7lineage", 8)
        _pack_length(parts, len(keys), 0x80, 16, 0, 0xde)
        for key in keys[:split]:
            _pack(parts, key, entry_limit)
            _pack(parts, entries[key], entry_limit)
        _put(parts, b"\xadfeature_ts_ms", 14)
        feature_ts_ms = batch.feature_ts_ms
        _pack_length(parts, len(feature_ts_ms), 0x80, 16, 0, 0xde)
        self.cut[1] = parts.length
        self.views, self.timestamps = [], []
        for view, timestamps in feature_ts_ms.items():
            start = parts.length
            _pack(parts, view, entry_limit - 1)
            self.views.append((start, parts.length))
            self.timestamps.append(_IntColumn(timestamps))
        self.cut[2] = parts.length
        for key in keys[split + 1:]:
            _pack(parts, key, entry_limit)
            _pack(parts, entries[key], entry_limit)
        _put(parts, b"\xaatimings_us", 11)
        _pack(parts, batch.timings_us, value_limit)
        _put(parts, b"\xabreceived_ms", 12)
        self.cut[3] = parts.length
        _put(parts, b"\xa7sent_ms", 8)
        _pack(parts, sent_ms, value_limit)
        self.cut[4] = parts.length
        self.output_names, self.outputs = [], []
        for name, values in batch.outputs.items():
            start = parts.length
            _pack(parts, name, entry_limit)
            self.output_names.append((start, parts.length))
            self.outputs.append(_Output(values))
        return 0

    cdef int pack_outputs(self, _Buffer* out, Py_ssize_t row) except -1:
        cdef Py_ssize_t index
        cdef Py_ssize_t start, end
        _pack_length(out, len(self.outputs), 0x80, 16, 0, 0xde)
        for index in range(len(self.outputs)):
            start, end = self.output_names[index]
            _put_part(out, &self.parts, start, end)
            (<_Output>self.outputs[index]).pack_row(out, row)
        return 0

    cdef int pack_lineage(self, _Buffer* out, Py_ssize_t row) except -1:
        cdef Py_ssize_t index
        cdef Py_ssize_t start, end
        _put_part(out, &self.parts, self.cut[0], self.cut[1])
        for index in range(len(self.views)):
            start, end = self.views[index]
            _put_part(out, &self.parts, start, end)
            (<_IntColumn>self.timestamps[index]).pack_row(out, row, True, _RECURSE_LIMIT - 3)
        return _put_part(out, &self.parts, self.cut[2], self.cut[3])


def encode_predictions(batch, sent_ms):
    """One msgpack map per prediction, keys in the documented order: the bytes ``msgpack.packb`` gives."""
    cdef list ids = _as_list(batch.ids)
    cdef Py_ssize_t rows = len(ids), row
    cdef list encoded = []
    cdef _Buffer out
    cdef int value_limit = _RECURSE_LIMIT - 1
    cdef _Encoder shared
    if rows == 0:
        return encoded
    status, errors, degraded = _as_list(batch.status), _as_list(batch.errors), _as_list(batch.degraded)
    for column in (status, errors, degraded):
        if len(column) < rows:
            raise IndexError("list index out of range")
    shared = _Encoder()
    shared.prepare(batch, sent_ms)
    received = _IntColumn(batch.received_ms)
    out.data = NULL
    out.length = out.capacity = 0
    try:
        for row in range(rows):
            out.length = 0
            _put(&out, b"\x8b\xa2id", 4)
            _pack(&out, ids[row], value_limit)
            _put_part(&out, &shared.parts, 0, shared.cut[0])
            row_status = status[row]
            _pack(&out, row_status, value_limit)
            _put(&out, b"\xa7outputs", 8)
            if row_status == "ok":
                shared.pack_outputs(&out, row)
            else:
                _put(&out, b"\x80", 1)
            error = errors[row]
            _put(&out, b"\xa5error", 6)
            if error is None:
                _put(&out, b"\xc0", 1)
            else:
                _put(&out, b"\x82\xa4kind", 6)
                _pack(&out, error[0], value_limit - 1)
                _put(&out, b"\xa7message", 8)
                _pack(&out, error[1], value_limit - 1)
            _put(&out, b"\xa8degraded", 9)
            _pack(&out, degraded[row], value_limit)
            shared.pack_lineage(&out, row)
            received.pack_row(&out, row, False, value_limit)
            _put_part(&out, &shared.parts, shared.cut[3], shared.cut[4])
            encoded.append(PyBytes_FromStringAndSize(out.data, out.length))
    finally:
        PyMem_Free(out.data)
    return encoded
