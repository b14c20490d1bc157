"""Structure of a DICOM Part 10 file without decoding values.

``read_layout`` finds where the data set starts (after preamble and file meta),
checks that every element, item and sequence ends inside the file (a truncated
transfer or copy is caught here), bounds how deeply sequences nest, and locates
the pixel data: its value offset for native pixel data, or the offsets of the
basic offset table and fragments for encapsulated pixel data, so frames can later
be read by byte range. It seeks past values instead of reading them, so a 500 MB
instance costs a few hundred small reads.

With ``header=True`` the same walk also keeps the top-level elements before the
pixel data as pydicom raw elements (``Layout.header``, values over ``DEFER_SIZE``
left unread as pydicom's ``defer_size`` does), so ingest builds its dataset from
them (``header_dataset``) instead of parsing the file a second time with
``dcmread``. The file meta information, nearly always a well-formed explicit VR
little endian group with a correct group length, is read by a byte-level reader
(``_fast_meta``) and anything else by pydicom's own.
"""

from __future__ import annotations

import functools
import struct
import tempfile
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO

from pydicom.charset import default_encoding
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement, empty_value_for_VR
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.tag import BaseTag
from pydicom.uid import UID
from pydicom.valuerep import VR as _VR

from gateway.archive.attributes import value_of
from gateway.archive.errors import InvalidDataset
from gateway.archive.uids import check_uid

UNDEFINED = 0xFFFFFFFF
ITEM = 0xFFFEE000
ITEM_DELIM = 0xFFFEE00D
SEQ_DELIM = 0xFFFEE0DD
PIXEL_DATA = 0x7FE00010
FLOAT_PIXEL_DATA = 0x7FE00008
DOUBLE_PIXEL_DATA = 0x7FE00009
_LONG_VRS = {
    b"OB",
    b"OD",
    b"OF",
    b"OL",
    b"OV",
    b"OW",
    b"SQ",
    b"SV",
    b"UC",
    b"UN",
    b"UR",
    b"UT",
    b"UV",
}

# Header values larger than this are not read (pydicom's ``defer_size`` of ingest):
# pydicom reads them from the file if they are ever asked for.
DEFER_SIZE = 65536
_KNOWN_VRS = frozenset(vr.encode() for vr in _VR)
_VR_TEXT = {vr.encode(): str(vr) for vr in _VR}
_PIXEL_TAGS = (PIXEL_DATA, FLOAT_PIXEL_DATA, DOUBLE_PIXEL_DATA)
_META_MAX = 65536  # a file meta group longer than this goes to pydicom's reader
_BLOCK = 8192  # bytes read at once by the walk (a file object's usual buffer size)

DEFAULT_MAX_DEPTH = 32
# A deflated data set is inflated (to a spooled temporary file) to check its structure;
# past this size it is refused as a likely decompression bomb.
DEFAULT_MAX_INFLATED = 1024 * 1024 * 1024
_INFLATE_CHUNK = 1024 * 1024


@dataclass
class Layout:
    """Where things are in a Part 10 file."""

    size: int
    dataset_offset: int
    file_meta: FileMetaDataset | None
    transfer_syntax: str
    pixel_offset: int | None = None
    pixel_length: int | None = None  # None when encapsulated (undefined length)
    basic_offset_table: list[int] = field(default_factory=list)
    fragments: list[tuple[int, int]] = field(default_factory=list)
    # With ``read_layout(header=True)``: the top-level elements before the pixel data
    # (None when not collected, or for a deflated data set), and how they are encoded.
    header: dict[BaseTag, RawDataElement] | None = None
    implicit_vr: bool = False
    little_endian: bool = True

    @property
    def encapsulated(self) -> bool:
        return self.pixel_offset is not None and self.pixel_length is None


def read_meta(fp: BinaryIO) -> tuple[FileMetaDataset | None, int]:
    """File meta information (None if the file has no preamble) and the data set offset."""
    fast = _fast_meta(fp)
    if fast is not None:
        return fast
    fp.seek(0)
    try:
        preamble = read_preamble(fp, force=True)
        if preamble is None:
            fp.seek(0)
            return None, 0
        meta = _read_file_meta_info(fp)
    except Exception as exc:  # pydicom raises several kinds for garbage
        raise InvalidDataset(f"unreadable file meta information: {exc}") from exc
    return meta, fp.tell()


def _fast_meta(fp: BinaryIO) -> tuple[FileMetaDataset, int] | None:
    """The file meta information of an ordinary Part 10 file, read without pydicom's
    reader: preamble, ``DICM``, then explicit VR little endian group 0002 elements
    whose group length (first element) spans exactly the rest of the group. None for
    anything else (no preamble, no group length, a wrong one, odd VRs): pydicom's
    reader then decides, as before."""
    fp.seek(0)
    head = fp.read(144)
    if (
        len(head) < 144
        or head[128:132] != b"DICM"
        or head[132:140] != b"\x02\x00\x00\x00UL\x04\x00"
    ):
        return None
    (group_length,) = struct.unpack_from("<L", head, 140)
    if group_length > _META_MAX:
        return None
    body = fp.read(group_length + 2)
    # The group must end where its length says: the next element is of another group.
    if len(body) < group_length or body[group_length : group_length + 2] == b"\x02\x00":
        return None
    start = 132
    elements: dict[BaseTag, RawDataElement] = {
        BaseTag(0x00020000): RawDataElement(
            BaseTag(0x00020000), "UL", 4, head[140:144], start + 8, False, True
        )
    }
    pos = 0
    while pos < group_length:
        if pos + 8 > group_length:
            return None
        group, elem, vr = struct.unpack_from("<HH2s", body, pos)
        if group != 2 or vr not in _KNOWN_VRS:
            return None
        if vr in _LONG_VRS:
            if pos + 12 > group_length:
                return None
            (length,) = struct.unpack_from("<L", body, pos + 8)
            value_pos = pos + 12
        else:
            (length,) = struct.unpack_from("<H", body, pos + 6)
            value_pos = pos + 8
        if length == UNDEFINED or value_pos + length > group_length:
            return None
        tag = BaseTag(0x00020000 | elem)
        text_vr = vr.decode()
        value = body[value_pos : value_pos + length] if length else None
        if value is None:
            value = empty_value_for_VR(text_vr, raw=True)  # type: ignore[assignment]
        elements[tag] = RawDataElement(
            tag, text_vr, length, value, start + 12 + value_pos, False, True
        )
        pos = value_pos + length
    meta = FileMetaDataset(elements)
    meta.set_original_encoding(False, True, default_encoding)
    return meta, start + 12 + group_length


def read_layout(
    fp: BinaryIO,
    size: int,
    *,
    max_depth: int = DEFAULT_MAX_DEPTH,
    transfer_syntax: str = "",
    max_inflated: int = DEFAULT_MAX_INFLATED,
    header: bool = False,
) -> Layout:
    meta, offset = read_meta(fp)
    if meta is not None:
        ts = str(value_of(meta, "TransferSyntaxUID") or "").strip("\x00 ")
        if not ts:
            raise InvalidDataset("file meta information has no Transfer Syntax UID")
    else:
        ts = transfer_syntax
        if not ts:
            raise InvalidDataset("not a DICOM Part 10 file and no transfer syntax given")
    ts = check_uid(ts, "Transfer Syntax UID")
    layout = Layout(size=size, dataset_offset=offset, file_meta=meta, transfer_syntax=ts)
    uid = syntax_uid(ts)
    if uid.is_transfer_syntax and uid.is_deflated:
        # The data set is zlib-compressed: nothing to locate by offset in the file, but
        # its structure (truncation, nesting) is checked on the inflated bytes.
        _check_deflated(fp, offset, max_depth, max_inflated)
        return layout
    # A TS pydicom does not know is explicit VR little endian (all newer ones are).
    little = uid.is_little_endian if uid.is_transfer_syntax else True
    implicit = uid.is_implicit_VR if uid.is_transfer_syntax else False
    layout.implicit_vr, layout.little_endian = implicit, little
    walker = _Walker(fp, size, little, implicit, max_depth, layout)
    if header:
        walker.header = layout.header = {}
    walker.walk_dataset(offset, size, 0)
    return layout


@functools.lru_cache(maxsize=64)
def syntax_uid(ts: str) -> UID:
    """``UID(ts)``, made once per transfer syntax: pydicom checks a UID's form with a
    regular expression each time one is made, and ingest asks about the transfer
    syntax of every instance several times."""
    return UID(ts)


def header_dataset(path: str, layout: Layout) -> FileDataset:
    """The dataset of ``layout.header`` as ``dcmread(path, stop_before_pixels=True,
    defer_size=DEFER_SIZE)`` would give it for this file (values are decoded when
    first asked for, deferred ones read from ``path``)."""
    assert layout.header is not None
    ds = FileDataset(
        path,
        layout.header,
        file_meta=layout.file_meta,
        is_implicit_VR=layout.implicit_vr,
        is_little_endian=layout.little_endian,
    )
    ds.set_original_encoding(layout.implicit_vr, layout.little_endian, ds._character_set)
    return ds


def declared_encoding_differs(fp: BinaryIO, layout: Layout) -> bool:
    """Whether the first element of the data set looks encoded with the other VR
    encoding than its transfer syntax says (pydicom's test: an explicit VR element
    has two capital letters after its tag)."""
    if layout.dataset_offset + 6 > layout.size:
        return False
    fp.seek(layout.dataset_offset)
    first = fp.read(6)
    group, elem = struct.unpack("<HH" if layout.little_endian else ">HH", first[:4])
    if (group << 16 | elem) in _PIXEL_TAGS:
        return False  # nothing before the pixel data: nothing read, nothing to check
    vr = first[4:6]
    looks_implicit = not (len(vr) == 2 and 0x40 < vr[0] < 0x5B and 0x40 < vr[1] < 0x5B)
    return looks_implicit != layout.implicit_vr


class _Walker:
    def __init__(
        self, fp: BinaryIO, size: int, little: bool, implicit: bool, max_depth: int, layout: Layout
    ) -> None:
        self.fp = fp
        self.size = size
        self.e = "<" if little else ">"
        self.little = little
        self.implicit = implicit
        self.max_depth = max_depth
        self.layout = layout
        # Top-level elements before the pixel data, collected when not None.
        self.header: dict[BaseTag, RawDataElement] | None = None
        self._block = b""  # the bytes of the file from _block_pos, last read
        self._block_pos = 0
        # An element header in one unpack (implicit VR: tag and 32-bit length; explicit
        # VR: tag, VR and 16-bit length), formats compiled once per walk.
        self._implicit_head = struct.Struct(self.e + "HHL")
        self._explicit_head = struct.Struct(self.e + "HH2sH")
        self._long = struct.Struct(self.e + "L")

    def _read(self, pos: int, n: int) -> bytes:
        if pos + n > self.size:
            raise InvalidDataset(f"data set truncated at byte {pos} (file has {self.size})")
        # Element headers and header values lie one after another: served from one
        # block read, not a seek and a read each.
        start = pos - self._block_pos
        if start >= 0 and start + n <= len(self._block):
            return self._block[start : start + n]
        self.fp.seek(pos)
        self._block = self.fp.read(min(max(n, _BLOCK), self.size - pos))
        self._block_pos = pos
        if len(self._block) < n:
            raise InvalidDataset(f"data set truncated at byte {pos}")
        return self._block[:n]

    def _tag(self, raw: bytes) -> int:
        group, elem = struct.unpack(self.e + "HH", raw)
        return (group << 16) | elem

    def walk_dataset(self, pos: int, end: int, depth: int, *, implicit: bool | None = None) -> int:
        """Walk elements from pos to end (or an item delimiter); return the position after."""
        implicit = self.implicit if implicit is None else implicit
        while pos < end:
            if end - pos < 8 and depth == 0:
                # Trailing bytes too short for an element header: tolerated padding.
                if self._read(pos, end - pos).strip(b"\x00") == b"":
                    return end
                raise InvalidDataset(f"data set truncated at byte {pos}")
            # The element header is unpacked where it lies in the block last read (this
            # loop runs for every element of every instance: no slices, no calls).
            start = pos - self._block_pos
            if start < 0 or start + 8 > len(self._block):
                self._read(pos, 8)  # reads the block from pos (or finds the file short)
                start = 0
            if implicit:
                group, elem, length = self._implicit_head.unpack_from(self._block, start)
                tag = (group << 16) | elem
                vr = None
                value_pos = pos + 8
            else:
                group, elem, vr, length = self._explicit_head.unpack_from(self._block, start)
                tag = (group << 16) | elem
                value_pos = pos + 8
            if tag == ITEM_DELIM:
                if depth == 0:
                    raise InvalidDataset(f"item delimiter outside a sequence item at byte {pos}")
                return pos + 8
            if vr is not None:
                if vr not in _KNOWN_VRS and not (vr.isalpha() and vr.isupper()):
                    raise InvalidDataset(f"invalid VR at byte {pos}")
                if vr in _LONG_VRS:
                    if start + 12 <= len(self._block):
                        (length,) = self._long.unpack_from(self._block, start + 8)
                    else:
                        (length,) = self._long.unpack(self._read(pos + 8, 4))
                    value_pos = pos + 12
            collect = depth == 0 and self.header is not None and tag not in _PIXEL_TAGS
            if tag == PIXEL_DATA and (depth == 0 or length == UNDEFINED):
                if depth == 0:
                    self.header = None  # stop_before_pixels: nothing after it is kept
                # Nested pixel data (an icon image) may be encapsulated too; only the
                # top-level pixel data is located for frame reads.
                pos = self._pixel_data(value_pos, length, record=depth == 0)
                continue
            if tag in (FLOAT_PIXEL_DATA, DOUBLE_PIXEL_DATA) and depth == 0:
                self.layout.pixel_offset, self.layout.pixel_length = value_pos, length
                self.header = None
            is_sq = vr == b"SQ" or (vr is None and _implicit_vr(tag) == "SQ")
            if length == UNDEFINED:
                if vr in (None, b"SQ", b"UN") or is_sq:
                    # Undefined-length UN is a sequence encoded implicit VR little endian.
                    item_implicit = True if vr == b"UN" else implicit
                    after = self._sequence(value_pos, None, depth + 1, item_implicit)
                    if collect:
                        # pydicom parses such a sequence as it reads it (never deferred):
                        # keep its items, without the delimiter, for it to parse when asked.
                        # (pydicom reads its items with the data set's encoding, then
                        # tells implicit VR items by looking at them, as it does here.)
                        size = after - 8 - value_pos
                        self._keep(tag, "SQ", UNDEFINED, value_pos, size, implicit, defer=False)
                    pos = after
                    continue
                raise InvalidDataset(f"undefined length on a non-sequence at byte {pos}")
            if value_pos + length > end:
                raise InvalidDataset(
                    f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) runs past the end of "
                    f"its container (data set truncated?)"
                )
            if is_sq and length:
                self._sequence(value_pos, value_pos + length, depth + 1, implicit)
            if collect:
                text_vr = (_VR_TEXT.get(vr) or vr.decode()) if vr is not None else None
                self._keep(tag, text_vr, length, value_pos, length, implicit)
            pos = value_pos + length
        return pos

    def _keep(
        self,
        tag: int,
        vr: str | None,
        length: int,
        value_pos: int,
        size: int,
        implicit: bool,
        *,
        defer: bool = True,
    ) -> None:
        """Add a top-level element to the header, as pydicom's reader would give it."""
        assert self.header is not None
        value: bytes | None
        if defer and size > DEFER_SIZE:
            value = None  # read from the file by pydicom if ever asked for
        elif size:
            start = value_pos - self._block_pos
            if start >= 0 and start + size <= len(self._block):
                value = self._block[start : start + size]
            else:
                value = self._read(value_pos, size)
        else:
            value = empty_value_for_VR(vr, raw=True)  # type: ignore[assignment]
        key = BaseTag(tag)
        self.header[key] = RawDataElement(key, vr, length, value, value_pos, implicit, self.little)

    def _sequence(self, pos: int, end: int | None, depth: int, implicit: bool) -> int:
        if depth > self.max_depth:
            raise InvalidDataset(f"sequences nested deeper than {self.max_depth} levels")
        limit = self.size if end is None else end
        while pos < limit:
            tag = self._tag(self._read(pos, 4))
            (length,) = struct.unpack(self.e + "L", self._read(pos + 4, 4))
            pos += 8
            if tag == SEQ_DELIM:
                return pos
            if tag != ITEM:
                raise InvalidDataset(f"expected a sequence item at byte {pos - 8}")
            if length == UNDEFINED:
                pos = self.walk_dataset(pos, self.size, depth, implicit=implicit)
            else:
                if pos + length > limit:
                    raise InvalidDataset("sequence item runs past the end of its sequence")
                self.walk_dataset(pos, pos + length, depth, implicit=implicit)
                pos += length
        if end is None:
            raise InvalidDataset("sequence not terminated (data set truncated?)")
        return pos

    def _pixel_data(self, value_pos: int, length: int, *, record: bool = True) -> int:
        if record:
            self.layout.pixel_offset = value_pos
        if length != UNDEFINED:
            if value_pos + length > self.size:
                raise InvalidDataset(
                    f"data set truncated: pixel data declares {length} bytes but the file "
                    f"ends after {self.size - value_pos}"
                )
            if record:
                self.layout.pixel_length = length
            return value_pos + length
        # Encapsulated: items, the first the basic offset table, then fragments.
        pos = value_pos
        first = True
        while True:
            tag = self._tag(self._read(pos, 4))
            (item_len,) = struct.unpack(self.e + "L", self._read(pos + 4, 4))
            pos += 8
            if tag == SEQ_DELIM:
                return pos
            if tag != ITEM or item_len == UNDEFINED:
                raise InvalidDataset("malformed encapsulated pixel data")
            if pos + item_len > self.size:
                raise InvalidDataset("encapsulated pixel data truncated")
            if first and record and item_len:
                if item_len % 4:
                    raise InvalidDataset("basic offset table length is not a multiple of 4")
                raw = self._read(pos, item_len)
                count = item_len // 4
                self.layout.basic_offset_table = list(struct.unpack(f"{self.e}{count}L", raw))
            elif not first and record:
                self.layout.fragments.append((pos, item_len))
            first = False
            pos += item_len


def _check_deflated(fp: BinaryIO, offset: int, max_depth: int, max_inflated: int) -> None:
    """Inflate a deflated data set (bounded) and walk it: truncation and nesting checks."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    with tempfile.SpooledTemporaryFile(max_size=16 * 1024 * 1024) as out:
        fp.seek(offset)
        pending = b""
        try:
            while not inflater.eof:
                if not pending:
                    pending = fp.read(_INFLATE_CHUNK)
                    if not pending:
                        break
                data = inflater.decompress(pending, _INFLATE_CHUNK)
                pending = inflater.unconsumed_tail
                total += len(data)
                if total > max_inflated:
                    raise InvalidDataset(
                        f"deflated data set inflates to more than {max_inflated} bytes"
                    )
                out.write(data)
        except zlib.error as exc:
            raise InvalidDataset(f"deflated data set is corrupt: {exc}") from exc
        if not inflater.eof:
            raise InvalidDataset("deflated data set truncated (no end of stream)")
        scratch = Layout(size=total, dataset_offset=0, file_meta=None, transfer_syntax="")
        _Walker(out, total, True, False, max_depth, scratch).walk_dataset(0, total, 0)  # type: ignore[arg-type]


def _implicit_vr(tag: int) -> str | None:
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return None
