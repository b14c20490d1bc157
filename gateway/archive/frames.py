"""Frames of stored pixel data: where each one lies in the blob, and reading one alone.

At ingest ``frame_ranges`` turns the structure found by ``part10.read_layout`` and the
Image Pixel attributes into one byte range of the blob per frame, kept in
``instances.frame_offsets`` as JSON ``[[offset, length], ...]``:

- native pixel data: the frame's pixel bytes (``pixel offset + i * frame size``);
- encapsulated pixel data: the items holding the frame's fragments, from the item
  header of its first fragment to the end of its last one. A frame of one fragment
  is that one item; a frame of several fragments (found from the Basic Offset Table,
  or failing that from where each codestream starts) spans their items, and
  ``FrameReader.stored`` drops the 8-byte item headers in between.

Serving a frame is then one ranged read, never a parse or decode of the whole
instance. ``FrameReader.decoded`` decodes one frame (pydicom's decoders, fed that
frame alone) for transcoding and rendering.
"""

from __future__ import annotations

import contextlib
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian

from gateway.archive.attributes import PYDICOM, plain_integer, plain_string, tag_of
from gateway.archive.errors import InvalidDataset, InvalidQuery
from gateway.archive.part10 import ITEM, Layout, read_layout

if TYPE_CHECKING:
    import numpy as np

    from gateway.archive.blobstore import BlobStore
    from gateway.archive.retrieve import StoredInstance

Range = tuple[int, int]

# The first bytes of a codestream: a fragment starting so begins a new frame.
_JPEG_SOI = b"\xff\xd8"
_J2K_SOC = b"\xff\x4f\xff\x51"
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  "


@dataclass(frozen=True)
class PixelAttributes:
    """The Image Pixel attributes that size a frame."""

    rows: int
    columns: int
    samples_per_pixel: int
    bits_allocated: int
    photometric: str
    number_of_frames: int

    @classmethod
    def from_dataset(cls, ds: Dataset) -> PixelAttributes | None:
        def number(keyword: str, default: int | None = None) -> int | None:
            plain = plain_integer(ds, tag_of(keyword))
            if plain is not PYDICOM:
                return default if plain is None else plain
            try:
                value = ds.get(keyword)
                return int(value) if value not in (None, "") else default
            except (TypeError, ValueError):
                return default

        photometric = plain_string(ds, tag_of("PhotometricInterpretation"))
        if photometric is PYDICOM:
            photometric = ds.get("PhotometricInterpretation", "")

        rows, columns = number("Rows"), number("Columns")
        bits = number("BitsAllocated")
        if not rows or not columns or not bits or rows < 0 or columns < 0 or bits < 0:
            return None
        frames = number("NumberOfFrames", 1) or 1
        return cls(
            rows=rows,
            columns=columns,
            samples_per_pixel=number("SamplesPerPixel", 1) or 1,
            bits_allocated=bits,
            photometric=str(photometric or "").strip().upper(),
            number_of_frames=max(frames, 1),
        )

    @property
    def native_frame_bits(self) -> int:
        pixels = self.rows * self.columns
        if self.photometric == "YBR_FULL_422":
            # Two chroma samples shared by two pixels (PS3.3 C.7.6.3.1.2).
            return pixels * 2 * self.bits_allocated
        return pixels * self.samples_per_pixel * self.bits_allocated


def frame_ranges(
    fp: BinaryIO | None, layout: Layout, ds: Dataset, *, path: Any = None
) -> list[Range] | None:
    """Byte ranges of each frame in the file, or None when they cannot be known cheaply.

    ``fp`` (or ``path``) is read only for encapsulated pixel data whose fragments do
    not map one to one onto frames and which has no Basic Offset Table: then the
    first bytes of each fragment tell where a codestream starts.
    """
    if layout.pixel_offset is None:
        return None
    attrs = PixelAttributes.from_dataset(ds)
    if layout.encapsulated:
        frames = attrs.number_of_frames if attrs else 1
        return _encapsulated_ranges(fp, layout, frames, path=path)
    if attrs is None or layout.pixel_length is None:
        return None
    return _native_ranges(layout.pixel_offset, layout.pixel_length, attrs)


def _native_ranges(offset: int, length: int, attrs: PixelAttributes) -> list[Range] | None:
    bits = attrs.native_frame_bits
    if bits % 8 and attrs.number_of_frames > 1:
        return None  # bit-packed frames that do not start on a byte boundary
    size = (bits + 7) // 8
    if size <= 0 or size * attrs.number_of_frames > length:
        return None
    return [(offset + i * size, size) for i in range(attrs.number_of_frames)]


def _encapsulated_ranges(
    fp: BinaryIO | None, layout: Layout, frames: int, *, path: Any = None
) -> list[Range] | None:
    fragments = layout.fragments
    if not fragments:
        return None
    starts = [pos - 8 for pos, _length in fragments]  # item header of each fragment
    end = fragments[-1][0] + fragments[-1][1]
    if frames == 1:
        return [(starts[0], end - starts[0])]
    if len(fragments) == frames:
        return [(pos - 8, length + 8) for pos, length in fragments]
    first: list[int] | None = None
    bot = layout.basic_offset_table
    if len(bot) == frames:
        first_starts = [starts[0] + offset for offset in bot]
        known = set(starts)
        if all(s in known for s in first_starts) and first_starts == sorted(set(first_starts)):
            first = [starts.index(s) for s in first_starts]
    if first is None and len(fragments) > frames:
        first = _codestream_starts(fp, fragments, path=path)
        if first is None or len(first) != frames or first[0] != 0:
            return None
    if first is None:
        return None
    ranges = []
    for n, index in enumerate(first):
        stop = starts[first[n + 1]] if n + 1 < len(first) else end
        ranges.append((starts[index], stop - starts[index]))
    return ranges


def _codestream_starts(
    fp: BinaryIO | None, fragments: Sequence[Range], *, path: Any = None
) -> list[int] | None:
    """Indexes of the fragments that begin a JPEG, JPEG-LS or JPEG 2000 codestream."""
    with contextlib.ExitStack() as stack:
        if fp is None:
            if path is None:
                return None
            fp = stack.enter_context(open(path, "rb"))
        found = []
        for index, (pos, length) in enumerate(fragments):
            fp.seek(pos)
            head = fp.read(min(length, 12))
            if (
                head.startswith(_JPEG_SOI)
                or head.startswith(_J2K_SOC)
                or head.startswith(_JP2_SIGNATURE)
            ):
                found.append(index)
        return found


def encode_ranges(ranges: Sequence[Range] | None) -> str | None:
    if not ranges:
        return None
    return json.dumps([[int(o), int(n)] for o, n in ranges], separators=(",", ":"))


def decode_ranges(text: str | None) -> list[Range] | None:
    if not text:
        return None
    try:
        return [(int(o), int(n)) for o, n in json.loads(text)]
    except (ValueError, TypeError):
        return None


def unwrap_items(data: bytes) -> bytes:
    """The fragment values of consecutive encapsulated items (headers dropped)."""
    if len(data) < 8:
        raise InvalidDataset("encapsulated frame range is too short")
    parts = []
    pos = 0
    while pos + 8 <= len(data):
        group, elem, length = struct.unpack_from("<HHL", data, pos)
        if (group << 16 | elem) != ITEM:
            raise InvalidDataset(f"expected an item at byte {pos} of a frame")
        pos += 8
        parts.append(data[pos : pos + length])
        pos += length
    if pos != len(data):
        raise InvalidDataset("frame range does not end on an item boundary")
    return parts[0] if len(parts) == 1 else b"".join(parts)


# -- media types of frames (PS3.18 table 8.7.3-5) ----------------------------------------
FRAME_MEDIA_TYPES: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx",
    "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
    "1.2.840.10008.1.2.4.100": "video/mpeg",
    "1.2.840.10008.1.2.4.101": "video/mpeg",
    "1.2.840.10008.1.2.4.102": "video/mp4",
    "1.2.840.10008.1.2.4.103": "video/mp4",
    "1.2.840.10008.1.2.4.104": "video/mp4",
    "1.2.840.10008.1.2.4.105": "video/mp4",
    "1.2.840.10008.1.2.4.106": "video/mp4",
    "1.2.840.10008.1.2.4.107": "video/H265",
    "1.2.840.10008.1.2.4.108": "video/H265",
}
# Older names some clients still send.
MEDIA_TYPE_ALIASES = {"image/x-dicom-rle": "image/dicom-rle", "image/x-jls": "image/jls"}


def frame_media_type(transfer_syntax: str) -> str:
    """Media type of a frame as stored: compressed ones per table 8.7.3-5."""
    return FRAME_MEDIA_TYPES.get(transfer_syntax, "application/octet-stream")


def is_encapsulated(transfer_syntax: str) -> bool:
    uid = UID(transfer_syntax)
    return bool(uid.is_transfer_syntax and uid.is_encapsulated)


def can_decode(transfer_syntax: str) -> bool:
    """Whether a frame stored in this transfer syntax can be decoded here."""
    uid = UID(transfer_syntax)
    if not uid.is_transfer_syntax:
        return False
    if not uid.is_encapsulated:
        return True
    try:
        from pydicom.pixels import get_decoder

        decoder = get_decoder(uid)
        if uid == _JPEG_EXTENDED:
            # JPEG Extended is mostly 12-bit, which Pillow cannot decode; without
            # another plugin a "decodable" answer would break a response midway.
            return bool(set(decoder.available_plugins) - {"pillow"})
        return bool(decoder.is_available)
    except (NotImplementedError, ValueError, ImportError):
        return False


_JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"


# Image Pixel module attributes a decoder needs, copied into a one-frame data set.
_PIXEL_MODULE = (
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "SmallestImagePixelValue",
    "LargestImagePixelValue",
    "RedPaletteColorLookupTableDescriptor",
    "GreenPaletteColorLookupTableDescriptor",
    "BluePaletteColorLookupTableDescriptor",
    "RedPaletteColorLookupTableData",
    "GreenPaletteColorLookupTableData",
    "BluePaletteColorLookupTableData",
    "ICCProfile",
)


class FrameReader:
    """Frames of one stored instance, read one at a time by byte range."""

    def __init__(self, store: BlobStore, inst: StoredInstance) -> None:
        self.store = store
        self.inst = inst
        self.transfer_syntax = inst.transfer_syntax_uid
        self.encapsulated = is_encapsulated(self.transfer_syntax)
        uid = UID(self.transfer_syntax)
        self.deflated = bool(uid.is_transfer_syntax and uid.is_deflated)
        self._inflated_pixels = b""
        self._ranges = None if self.deflated else decode_ranges(inst.frame_offsets)
        self._header: Dataset | None = None
        # The top-level pixel data element as stored: its tag and VR (explicit VR only).
        self._pixel_tag: int | None = None
        self._pixel_vr = ""

    # -- structure ---------------------------------------------------------------
    def _load(self) -> None:
        """Parse the header (pixel data excluded) and see which pixel element follows."""
        import pydicom

        if self.deflated:
            self._load_deflated()
            return
        with self.store.open(self.inst.blob_key) as fh:
            try:
                header = pydicom.dcmread(fh, force=True, stop_before_pixels=True)
            except Exception as exc:
                raise InvalidDataset(f"stored instance cannot be parsed: {exc}") from exc
            head = fh.read(12)
        if len(head) >= 8:
            little = UID(self.transfer_syntax).is_little_endian is not False
            group, elem = struct.unpack("<HH" if little else ">HH", head[:4])
            tag = group << 16 | elem
            if tag in (0x7FE00010, 0x7FE00008, 0x7FE00009):
                self._pixel_tag = tag
                if head[4:6].isalpha() and head[4:6].isupper():
                    self._pixel_vr = head[4:6].decode("ascii")
        self._header = header

    def _load_deflated(self) -> None:
        """A deflated data set has no byte offsets in the blob: it is inflated (pydicom)
        and its native pixel data kept in memory. Rare, and small in practice."""
        import pydicom

        with self.store.open(self.inst.blob_key) as fh:
            try:
                header = pydicom.dcmread(fh, force=True)
            except Exception as exc:
                raise InvalidDataset(f"stored instance cannot be parsed: {exc}") from exc
        for tag in (0x7FE00010, 0x7FE00008, 0x7FE00009):
            if tag in header:
                self._pixel_tag = tag
                self._pixel_vr = str(header[tag].VR)
                self._inflated_pixels = bytes(header[tag].value)
                del header[tag]
                break
        self._header = header

    def _locate(self) -> None:
        """Frame ranges of an instance ingested before they were recorded."""
        if self.deflated:
            attrs = PixelAttributes.from_dataset(self.header)
            pixels = self._inflated_pixels
            ranges = _native_ranges(0, len(pixels), attrs) if attrs and pixels else None
            self._ranges = ranges or []
            return
        with self.store.open(self.inst.blob_key) as fh:
            layout = read_layout(fh, self.store.size(self.inst.blob_key))
            self._ranges = frame_ranges(fh, layout, self.header) or []

    @property
    def header(self) -> Dataset:
        if self._header is None:
            self._load()
        assert self._header is not None
        return self._header

    @property
    def ranges(self) -> list[Range]:
        if self._ranges is None:
            self._locate()
        return self._ranges or []

    @property
    def number_of_frames(self) -> int:
        return len(self.ranges)

    def check_frames(self, numbers: Sequence[int]) -> None:
        count = self.number_of_frames
        if count == 0:
            raise InvalidQuery("the instance has no pixel data frames to retrieve")
        bad = [n for n in numbers if n < 1 or n > count]
        if bad:
            raise InvalidQuery(
                f"frame number {bad[0]} is out of range: the instance has {count} frame(s)"
            )

    @property
    def pixel_tag(self) -> int | None:
        """Tag of the top-level pixel data element (None without pixel data)."""
        if self._header is None:
            self._load()
        return self._pixel_tag

    @property
    def pixel_vr(self) -> str:
        """The VR of the stored pixel data (derived from Bits Allocated if implicit)."""
        if self._header is None:
            self._load()
        if self._pixel_vr:
            return self._pixel_vr
        if self.pixel_tag == 0x7FE00008:
            return "OF"
        if self.pixel_tag == 0x7FE00009:
            return "OD"
        if self.encapsulated:
            return "OB"
        bits = self.header.get("BitsAllocated", 16)
        return "OB" if isinstance(bits, int) and bits <= 8 else "OW"

    # -- reading -----------------------------------------------------------------
    def stored(self, number: int) -> bytes:
        """Frame ``number`` (1-based) as stored: native pixel bytes or its codestream."""
        self.check_frames([number])
        offset, length = self.ranges[number - 1]
        if self.deflated:
            return self._inflated_pixels[offset : offset + length]
        data = self.store.read_range(self.inst.blob_key, offset, length)
        if len(data) != length:
            raise InvalidDataset("stored instance is shorter than its frame table says")
        return unwrap_items(data) if self.encapsulated else data

    def decoded(self, number: int, *, as_rgb: bool = True) -> tuple[np.ndarray, dict[str, Any]]:
        """Frame ``number`` decoded to an array, with pydicom's image pixel description."""
        from pydicom.encaps import encapsulate
        from pydicom.pixels import get_decoder

        raw = self.stored(number)
        header = self.header
        one = Dataset()
        for keyword in _PIXEL_MODULE:
            if keyword in header:
                one[keyword] = header[keyword]
        one.NumberOfFrames = 1
        one.file_meta = FileMetaDataset()
        one.file_meta.TransferSyntaxUID = self.transfer_syntax
        if self.encapsulated:
            one.PixelData = encapsulate([raw])
            one["PixelData"].VR = "OB"
        elif self.pixel_tag == 0x7FE00008:
            one.FloatPixelData = raw
        elif self.pixel_tag == 0x7FE00009:
            one.DoubleFloatPixelData = raw
        else:
            one.PixelData = raw
            one["PixelData"].VR = self.pixel_vr if self.pixel_vr in ("OB", "OW") else "OW"
        try:
            decoder = get_decoder(UID(self.transfer_syntax))
            arr, meta = decoder.as_array(one, as_rgb=as_rgb)
        except (NotImplementedError, RuntimeError, ValueError, AttributeError) as exc:
            raise InvalidDataset(f"frame {number} cannot be decoded: {exc}") from exc
        return arr, dict(meta)

    def uncompressed(self, number: int) -> tuple[bytes, dict[str, Any]]:
        """Frame ``number`` as Explicit VR Little Endian pixel bytes (decoded if needed)."""
        uid = UID(self.transfer_syntax)
        if not self.encapsulated and uid.is_little_endian:
            return self.stored(number), {}
        arr, meta = self.decoded(number)
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        return arr.tobytes(), meta


def explicit_little_endian() -> str:
    return str(ExplicitVRLittleEndian)
