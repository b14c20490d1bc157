"""part10.read_layout: structure checks without decoding values."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import generate_frames
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from gateway.archive.errors import InvalidDataset, InvalidUID
from gateway.archive.part10 import (
    DEFER_SIZE,
    Layout,
    _fast_meta,
    declared_encoding_differs,
    header_dataset,
    read_layout,
    read_meta,
)
from tests.factories import (
    UNDEFINED,
    bare,
    ct_slice,
    dataset_bytes,
    element_header,
    nested_sequence,
    with_inserted_before_pixels,
    write,
)

pytestmark = [pytest.mark.fast, pytest.mark.filterwarnings("ignore::UserWarning")]

ITEM = struct.pack("<HH", 0xFFFE, 0xE000)
ITEM_DELIM = struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
SEQ_DELIM = struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)


def layout_of(data: bytes, **kw):
    return read_layout(io.BytesIO(data), len(data), **kw)


def test_native_pixel_data_is_located(tmp_path: Path):
    ds = ct_slice(rows=32, columns=16)
    path = write(ds, tmp_path / "a.dcm")
    raw = path.read_bytes()
    layout = layout_of(raw)
    assert layout.transfer_syntax == ExplicitVRLittleEndian
    assert raw[layout.dataset_offset :] == dataset_bytes(path)
    assert layout.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert not layout.encapsulated
    assert layout.pixel_length == 32 * 16 * 2
    assert raw[layout.pixel_offset : layout.pixel_offset + layout.pixel_length] == ds.PixelData


@pytest.mark.parametrize("ts", [ImplicitVRLittleEndian, ExplicitVRBigEndian])
def test_other_native_syntaxes(tmp_path: Path, ts: str):
    ds = ct_slice(rows=8, columns=8)
    ds.file_meta.TransferSyntaxUID = ts
    path = tmp_path / "a.dcm"
    ds.save_as(path, enforce_file_format=True)
    raw = path.read_bytes()
    layout = layout_of(raw)
    assert layout.transfer_syntax == ts
    stored = raw[layout.pixel_offset : layout.pixel_offset + layout.pixel_length]
    assert stored == pydicom.dcmread(path).PixelData


@pytest.mark.parametrize(
    "name",
    ["JPEG2000.dcm", "SC_rgb_rle_2frame.dcm", "MR_small_RLE.dcm", "SC_rgb_jpeg_dcmtk.dcm"],
)
def test_encapsulated_fragments_are_located(name: str):
    path = Path(get_testdata_file(name))
    raw = path.read_bytes()
    layout = layout_of(raw)
    assert layout.encapsulated
    ds = pydicom.dcmread(path)
    frames = list(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1))))
    fragments = [raw[pos : pos + length] for pos, length in layout.fragments]
    # One fragment per frame in these files (padding aside).
    assert len(fragments) == len(frames)
    for fragment, frame in zip(fragments, frames, strict=True):
        assert fragment.rstrip(b"\x00") == frame.rstrip(b"\x00")


def test_basic_offset_table_is_read():
    path = Path(get_testdata_file("SC_rgb_rle_2frame.dcm"))
    raw = path.read_bytes()
    layout = layout_of(raw)
    assert layout.basic_offset_table == [0, 672]
    # Offsets count from the first fragment's item header; fragments hold value offsets.
    first = layout.fragments[0][0]
    assert [first + off for off in layout.basic_offset_table] == [
        pos for pos, _ in layout.fragments
    ]


def test_bare_data_set_needs_a_transfer_syntax(tmp_path: Path):
    path = bare(ct_slice(rows=8, columns=8), tmp_path / "bare.dcm", implicit_vr=True)
    raw = path.read_bytes()
    with pytest.raises(InvalidDataset):
        layout_of(raw)
    layout = layout_of(raw, transfer_syntax=ImplicitVRLittleEndian)
    assert layout.dataset_offset == 0 and layout.file_meta is None
    assert layout.pixel_length == 8 * 8 * 2


def test_invalid_transfer_syntax_uid():
    with pytest.raises(InvalidUID):
        layout_of(b"\x08\x00\x05\x00CS\x00\x00", transfer_syntax="1.2.3/../4")


def test_private_transfer_syntax_is_walked_as_explicit_little_endian(tmp_path: Path):
    raw = write(ct_slice(rows=8, columns=8), tmp_path / "a.dcm").read_bytes()
    data = raw[layout_of(raw).dataset_offset :]
    layout = layout_of(data, transfer_syntax="1.2.826.0.1.3680043.10.1234.99")
    assert layout.pixel_length == 128


@pytest.mark.parametrize("cut", [1, 2, 7, 100, 129, 500])
def test_truncation_anywhere_in_the_data_set_is_caught(tmp_path: Path, cut: int):
    raw = write(ct_slice(rows=8, columns=8), tmp_path / "a.dcm").read_bytes()
    with pytest.raises(InvalidDataset):
        layout_of(raw[:-cut])


def test_trailing_zero_padding_is_tolerated(tmp_path: Path):
    raw = write(ct_slice(rows=8, columns=8), tmp_path / "a.dcm").read_bytes()
    assert layout_of(raw + b"\x00" * 4).pixel_length == 128
    with pytest.raises(InvalidDataset):
        layout_of(raw + b"\x01\x02\x03")


@pytest.mark.parametrize("explicit", [True, False])
def test_nesting_depth_limit(tmp_path: Path, explicit: bool):
    ts = ExplicitVRLittleEndian if explicit else ImplicitVRLittleEndian
    ds = ct_slice(rows=8, columns=8)
    ds.file_meta.TransferSyntaxUID = ts
    base = tmp_path / "base.dcm"
    ds.save_as(base, enforce_file_format=True)
    for depth, ok in [(4, True), (5, False)]:
        for undefined in (True, False):
            path = with_inserted_before_pixels(
                base,
                nested_sequence(depth, explicit=explicit, undefined=undefined),
                tmp_path / f"d{depth}{undefined}.dcm",
            )
            raw = path.read_bytes()
            if ok:
                assert layout_of(raw, max_depth=4).pixel_length == 128
                # pydicom agrees the file is well formed.
                assert pydicom.dcmread(path).ContentSequence
            else:
                with pytest.raises(InvalidDataset, match="nested deeper"):
                    layout_of(raw, max_depth=4)


def test_invalid_vr_is_refused(tmp_path: Path):
    base = write(ct_slice(rows=8, columns=8), tmp_path / "a.dcm")
    bad = struct.pack("<HH", 0x0040, 0xA160) + b"x1" + struct.pack("<H", 2) + b"ab"
    path = with_inserted_before_pixels(base, bad, tmp_path / "bad.dcm")
    with pytest.raises(InvalidDataset, match="VR"):
        layout_of(path.read_bytes())


def test_undefined_length_on_a_non_sequence_is_refused(tmp_path: Path):
    base = write(ct_slice(rows=8, columns=8), tmp_path / "a.dcm")
    bad = element_header(0x0040A160, "UT", UNDEFINED) + b"abcd" + SEQ_DELIM
    path = with_inserted_before_pixels(base, bad, tmp_path / "bad.dcm")
    with pytest.raises(InvalidDataset, match="undefined length"):
        layout_of(path.read_bytes())


def test_item_delimiter_outside_an_item_is_refused(tmp_path: Path):
    """A stray item delimiter at the top level must not end the walk early (the rest of
    the file would go unchecked)."""
    base = write(ct_slice(rows=8, columns=8), tmp_path / "a.dcm")
    path = with_inserted_before_pixels(base, ITEM_DELIM, tmp_path / "bad.dcm")
    raw = path.read_bytes()
    with pytest.raises(InvalidDataset):
        layout_of(raw)
    with pytest.raises(InvalidDataset):
        layout_of(raw[:-10])


def test_sequence_item_running_past_its_sequence(tmp_path: Path):
    base = write(ct_slice(rows=8, columns=8), tmp_path / "a.dcm")
    inner = element_header(0x0040A160, "UT", 4) + b"leaf"
    item = ITEM + struct.pack("<L", len(inner) + 50) + inner
    seq = element_header(0x0040A730, "SQ", len(item)) + item
    path = with_inserted_before_pixels(base, seq, tmp_path / "bad.dcm")
    with pytest.raises(InvalidDataset):
        layout_of(path.read_bytes())


def test_unterminated_sequence_is_truncation():
    head = element_header(0x0040A730, "SQ", UNDEFINED) + ITEM + struct.pack("<L", UNDEFINED)
    data = head + element_header(0x0040A160, "UT", 4) + b"leaf" + ITEM_DELIM
    with pytest.raises(InvalidDataset):
        layout_of(data, transfer_syntax=ExplicitVRLittleEndian)
    assert layout_of(data + SEQ_DELIM, transfer_syntax=ExplicitVRLittleEndian).pixel_offset is None


def test_encapsulated_icon_in_a_sequence_is_accepted():
    """An Icon Image Sequence item of a compressed image has encapsulated pixel data of
    its own (undefined length): it is not the image's pixel data."""
    path = Path(get_testdata_file("JPEG2000.dcm"))
    icon_pixels = (
        element_header(0x7FE00010, "OB", UNDEFINED)
        + ITEM
        + struct.pack("<L", 0)
        + ITEM
        + struct.pack("<L", 4)
        + b"\xff\xd8\xff\xd9"
        + SEQ_DELIM
    )
    item_body = element_header(0x00280010, "US", 2) + struct.pack("<H", 1) + icon_pixels
    icon = (
        element_header(0x00880200, "SQ", UNDEFINED)
        + ITEM
        + struct.pack("<L", UNDEFINED)
        + item_body
        + ITEM_DELIM
        + SEQ_DELIM
    )
    out = io.BytesIO()
    raw = path.read_bytes()
    plain = layout_of(raw)
    header_start = plain.pixel_offset - 12
    data = raw[:header_start] + icon + raw[header_start:]
    out.write(data)
    layout = layout_of(data)
    assert layout.pixel_offset == plain.pixel_offset + len(icon)
    assert [(p + 0, n) for p, n in layout.fragments] == [
        (p + len(icon), n) for p, n in plain.fragments
    ]
    # pydicom reads the file the same way.
    ds = pydicom.dcmread(io.BytesIO(data))
    assert ds.IconImageSequence[0].Rows == 1


def test_basic_offset_table_of_odd_length_is_refused(tmp_path: Path):
    raw = Path(get_testdata_file("JPEG2000.dcm")).read_bytes()
    layout = layout_of(raw)
    # Rewrite the BOT item: 6 bytes long (not a multiple of 4).
    bot_at = layout.pixel_offset
    (bot_len,) = struct.unpack("<L", raw[bot_at + 4 : bot_at + 8])
    rest = raw[bot_at + 8 + bot_len :]
    data = raw[:bot_at] + ITEM + struct.pack("<L", 6) + b"\x00" * 6 + rest
    with pytest.raises(InvalidDataset):
        layout_of(data)


def test_un_sequence_of_undefined_length_is_walked():
    raw = Path(get_testdata_file("UN_sequence.dcm")).read_bytes()
    layout_of(raw)  # no error


def test_deflated_data_set_is_checked_after_inflating():
    path = Path(get_testdata_file("image_dfl.dcm"))
    raw = path.read_bytes()
    layout = layout_of(raw)
    assert layout.transfer_syntax == "1.2.840.10008.1.2.1.99"
    assert layout.pixel_offset is None  # no byte ranges inside a deflate stream
    with pytest.raises(InvalidDataset, match="inflates"):
        layout_of(raw, max_inflated=1000)
    with pytest.raises(InvalidDataset):
        layout_of(raw[: layout.dataset_offset + 100])
    garbage = raw[: layout.dataset_offset] + b"\xff" * 200
    with pytest.raises(InvalidDataset):
        layout_of(garbage)


def test_deflate_bomb_is_refused_without_inflating_it_all():
    data = b"\x00" * (64 * 1024 * 1024)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bomb = compressor.compress(data) + compressor.flush()
    assert len(bomb) < 100_000
    with pytest.raises(InvalidDataset, match="inflates"):
        layout_of(bomb, transfer_syntax="1.2.840.10008.1.2.1.99", max_inflated=8 * 1024 * 1024)


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",
        "MR_small.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
        "JPEG2000-embedded-sequence-delimiter.dcm",
        "rtplan.dcm",
        "waveform_ecg.dcm",
        "nested_priv_SQ.dcm",
        "priv_SQ.dcm",
        "test-SR.dcm",
        "reportsi.dcm",
    ],
)
def test_well_formed_pydicom_files_pass(name: str):
    path = Path(get_testdata_file(name))
    raw = path.read_bytes()
    ts = "" if raw[128:132] == b"DICM" else ImplicitVRLittleEndian
    layout = layout_of(raw, transfer_syntax=ts)
    if layout.pixel_offset is not None and layout.pixel_length is not None:
        ds = pydicom.dcmread(path, force=True)
        assert raw[layout.pixel_offset : layout.pixel_offset + layout.pixel_length] == ds.PixelData


# -- the header kept by the walk (ingest's dataset, instead of a second dcmread) -------


def _header_files() -> list[str]:
    # The files in pydicom's wheel (get_testdata_files would also try to download).
    root = Path(pydicom.data.DATA_ROOT)
    return sorted(str(p) for p in root.rglob("*") if p.is_file() and p.suffix in (".dcm", ""))


def _same_as_dcmread(path: str) -> bool | None:
    """Whether header_dataset gives what dcmread gives for ``path`` (None: not a file
    read_layout accepts with a header, e.g. deflated, bare or broken)."""
    try:
        with open(path, "rb") as fh:
            layout = read_layout(fh, Path(path).stat().st_size, header=True)
    except Exception:
        return None
    if layout.header is None:
        return None
    ours = header_dataset(path, layout)
    theirs = pydicom.dcmread(path, force=True, stop_before_pixels=True, defer_size=DEFER_SIZE)
    return (
        [e.tag for e in ours] == [e.tag for e in theirs]
        and ours == theirs
        and ours.file_meta == theirs.file_meta
        and ours.original_encoding == theirs.original_encoding
    )


def test_header_is_what_dcmread_reads_from_every_pydicom_file():
    outcomes = {name: _same_as_dcmread(name) for name in _header_files()}
    compared = [name for name, same in outcomes.items() if same is not None]
    # pydicom's own files: every transfer syntax, charsets, nested and private sequences.
    assert len(compared) > 100
    assert [name for name in compared if not outcomes[name]] == []


@pytest.mark.parametrize("explicit", [True, False])
@pytest.mark.parametrize("undefined", [True, False])
def test_header_keeps_sequences_as_dcmread_does(tmp_path: Path, explicit: bool, undefined: bool):
    ds = ct_slice(rows=4, columns=4)
    if not explicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    path = tmp_path / "a.dcm"
    ds.save_as(path, enforce_file_format=True)
    extra = nested_sequence(5, explicit=explicit, undefined=undefined)
    out = with_inserted_before_pixels(path, extra, tmp_path / "nested.dcm")
    assert _same_as_dcmread(str(out))
    with open(out, "rb") as fh:
        layout = read_layout(fh, out.stat().st_size, header=True)
    seq = header_dataset(str(out), layout).ContentSequence
    for _ in range(4):
        seq = seq[0].ContentSequence
    assert seq[0].TextValue == "leaf"


@pytest.mark.parametrize("explicit", [True, False])
def test_elements_across_the_walks_read_blocks_are_kept_as_dcmread_reads_them(
    tmp_path: Path, explicit: bool
):
    """The walk reads the file in blocks of 8 KiB and unpacks element headers and values
    inside the block it holds: short and long element headers, and values, that start
    before a block's end and end after it are read whole."""
    ds = ct_slice(rows=4, columns=4)
    if not explicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    path = tmp_path / "a.dcm"
    ds.save_as(path, enforce_file_format=True)
    with open(path, "rb") as fh:
        layout = read_layout(fh, path.stat().st_size)
    assert layout.pixel_offset is not None
    before = layout.pixel_offset - (12 if explicit else 8) - layout.dataset_offset
    for shift in range(0, 26, 2):
        # Padding that ends ``shift`` bytes before the first block's end, then a short-VR
        # and a long-VR element (their headers and values cross that end in turn).
        pad = 8192 - before - (12 if explicit else 8) - shift
        extra = (
            element_header(0x7FD00010, "OB" if explicit else None, pad)
            + b"\x01" * pad
            + element_header(0x7FD00011, "LO" if explicit else None, 6)
            + b"ABCDEF"
            + element_header(0x7FD00012, "OB" if explicit else None, 10)
            + b"0123456789"
        )
        out = with_inserted_before_pixels(path, extra, tmp_path / f"{shift}.dcm")
        assert _same_as_dcmread(str(out)), shift
        with open(out, "rb") as fh:
            header = read_layout(fh, out.stat().st_size, header=True).header
        assert header is not None
        assert header[pydicom.tag.Tag(0x7FD00011)].value == b"ABCDEF"
        assert header[pydicom.tag.Tag(0x7FD00012)].value == b"0123456789"


def test_large_header_values_are_deferred_and_read_when_asked(tmp_path: Path):
    ds = ct_slice(rows=4, columns=4)
    ds.EncapsulatedDocument = b"x" * (DEFER_SIZE + 2)  # OB
    path = write(ds, tmp_path / "a.dcm")
    with open(path, "rb") as fh:
        layout = read_layout(fh, path.stat().st_size, header=True)
    assert layout.header is not None
    raw = layout.header[pydicom.tag.Tag("EncapsulatedDocument")]
    assert raw.value is None and raw.length == DEFER_SIZE + 2
    assert header_dataset(str(path), layout).EncapsulatedDocument == ds.EncapsulatedDocument


def test_nothing_after_the_pixel_data_is_kept(tmp_path: Path):
    ds = ct_slice(rows=4, columns=4)
    path = write(ds, tmp_path / "a.dcm")
    trailer = element_header(0xFFFCFFFC, "OB", 4) + b"\x00" * 4  # Data Set Trailing Padding
    padded = tmp_path / "padded.dcm"
    padded.write_bytes(path.read_bytes() + trailer)
    with open(padded, "rb") as fh:
        layout = read_layout(fh, padded.stat().st_size, header=True)
    assert layout.header is not None
    assert max(layout.header) < 0x7FE00010
    assert _same_as_dcmread(str(padded))


def test_file_meta_with_a_wrong_group_length_is_read_as_pydicom_reads_it(tmp_path: Path):
    from pydicom.filereader import _read_file_meta_info, read_preamble

    path = write(ct_slice(rows=4, columns=4), tmp_path / "a.dcm")
    raw = bytearray(path.read_bytes())
    (length,) = struct.unpack_from("<L", raw, 140)
    for wrong in (length - 2, length + 6):  # ends inside the group / past it
        struct.pack_into("<L", raw, 140, wrong)
        data = bytes(raw)
        ours = read_meta(io.BytesIO(data))
        fp = io.BytesIO(data)
        read_preamble(fp, force=True)
        theirs = _read_file_meta_info(fp)
        assert ours[0] == theirs and ours[1] == fp.tell()
        assert layout_of(data).dataset_offset == fp.tell()


def test_fast_file_meta_reader_agrees_with_pydicom(tmp_path: Path):
    from pydicom.filereader import _read_file_meta_info, read_preamble

    path = write(ct_slice(rows=4, columns=4), tmp_path / "a.dcm")
    data = path.read_bytes()
    fast = _fast_meta(io.BytesIO(data))
    assert fast is not None
    fp = io.BytesIO(data)
    read_preamble(fp, force=True)
    theirs = _read_file_meta_info(fp)
    assert fast[0] == theirs and fast[1] == fp.tell()
    assert [e.tag for e in fast[0]] == [e.tag for e in theirs]


@pytest.mark.parametrize(
    ("declared", "written_implicit"),
    [(ExplicitVRLittleEndian, True), (ImplicitVRLittleEndian, False)],
)
def test_data_set_in_the_other_vr_encoding_is_noticed(
    tmp_path: Path, declared: str, written_implicit: bool
):
    ds = ct_slice(rows=4, columns=4)
    ds.file_meta.TransferSyntaxUID = declared
    same = tmp_path / "b.dcm"
    ds.save_as(same, enforce_file_format=True)
    # The declared file meta, then the data set in the other encoding.
    offset = layout_of(same.read_bytes()).dataset_offset
    other = bare(ds, tmp_path / "bare.dcm", implicit_vr=written_implicit).read_bytes()
    path = tmp_path / "a.dcm"
    path.write_bytes(same.read_bytes()[:offset] + other)
    implicit = declared == ImplicitVRLittleEndian
    layout = Layout(len(other) + offset, offset, None, declared, implicit_vr=implicit)
    with open(path, "rb") as fh:
        assert declared_encoding_differs(fh, layout)
    with open(same, "rb") as fh:
        assert not declared_encoding_differs(fh, read_layout(fh, same.stat().st_size))
