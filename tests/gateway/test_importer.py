"""Importing discs, folders, DICOMDIRs and zip files through the one ingest path."""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import pydicom
import pytest
from pydicom.fileset import FileSet
from rich.console import Console
from sqlalchemy import select

from gateway.archive import Archive
from gateway.archive.models import Instance
from gateway.import_cli import run_import
from gateway.importer import (
    ImportItem,
    ImportLimits,
    ImportOutcome,
    ImportSourceError,
    _key,
    _looks_like_bare_dataset,
    _safe_member_name,
    _screen,
    count_import,
    import_path,
    plan_import,
    render_summary,
)
from tests.factories import ct_slice, uid, write

STORED = ImportOutcome.STORED
DUPLICATE = ImportOutcome.DUPLICATE
SKIPPED = ImportOutcome.SKIPPED
FAILED = ImportOutcome.FAILED


# -- helpers ------------------------------------------------------------------------


def make_disc(folder: Path, count: int = 4, *, studies: int = 2) -> list[str]:
    """A disc image folder written by pydicom's File-set API; returns the SOP UIDs."""
    fs = FileSet()
    study_uids = [uid() for _ in range(studies)]
    series_uids = [uid() for _ in range(studies)]
    sops = []
    for i in range(count):
        k = i % studies
        ds = ct_slice(
            study_uid=study_uids[k],
            series_uid=series_uids[k],
            instance_number=i + 1,
            rows=16,
            columns=16,
        )
        fs.add(ds)
        sops.append(ds.SOPInstanceUID)
    folder.mkdir(parents=True, exist_ok=True)
    fs.write(folder)
    return sops


def referenced_files(folder: Path) -> list[Path]:
    ds = pydicom.dcmread(folder / "DICOMDIR")
    out = []
    for record in ds.DirectoryRecordSequence:
        ref = record.get("ReferencedFileID")
        if ref is not None:
            parts = [ref] if isinstance(ref, str) else list(ref)
            out.append(folder.joinpath(*parts))
    return out


def stored_sops(archive: Archive) -> dict[str, tuple[str, str, str]]:
    with archive.db.read_conn() as session:
        rows = session.execute(
            select(
                Instance.sop_uid,
                Instance.door,
                Instance.source_institution,
                Instance.received_issuer,
            )
        ).all()
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def outcomes(report) -> dict[str, ImportOutcome]:
    return {i.name: i.outcome for i in report.items}


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def staging_files(archive: Archive) -> list[Path]:
    return [p for p in archive.settings.staging_dir.iterdir() if p.is_file()]


def zip_folder(folder: Path, target: Path) -> Path:
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(folder).as_posix())
    return target


def console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=160, force_terminal=False, color_system=None), buf


# -- pure helpers (no archive) --------------------------------------------------------


@pytest.mark.fast
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("DICOM/IM0001", "DICOM/IM0001"),
        ("a\\b\\c.dcm", "a/b/c.dcm"),
        ("./x/./y", "x/y"),
        ("../evil", None),
        ("a/../../evil", None),
        ("/etc/passwd", None),
        ("\\\\server\\share", None),
        ("C:/windows/evil", None),
        ("c:evil", None),
        ("", None),
        ("a\x00b", None),
    ],
)
def test_safe_member_name(name: str, expected: str | None) -> None:
    assert _safe_member_name(name) == expected


@pytest.mark.fast
def test_key_is_case_and_iso9660_insensitive() -> None:
    assert _key("PT000000/ST000000/IM000001") == _key("pt000000/st000000/im000001")
    assert _key("DICOM/IM0001;1") == _key("dicom/im0001")
    assert _key("DICOM/IM0001.") == _key("dicom/im0001")
    assert _key("DICOMDIR;1") == "dicomdir"


@pytest.mark.fast
def test_screen() -> None:
    part10 = b"\x00" * 128 + b"DICM"
    assert _screen("IM0001", part10, 1000) is None
    assert _screen("readme.txt", b"hello world" * 20, 220) is not None
    assert _screen("autorun.inf", b"[autorun]\r\nopen=viewer.exe\r\n", 30) is not None
    assert _screen("viewer.exe", b"MZ\x90\x00" + b"\x00" * 200, 204) is not None
    assert _screen("empty.dcm", b"", 0) == "empty file"
    # Named .dcm: ingest decides (and reports the damage) even without a marker.
    assert _screen("broken.dcm", b"garbage" * 30, 210) is None
    # Bare data sets (no preamble): explicit and implicit VR little endian.
    assert _looks_like_bare_dataset(b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100")
    assert _looks_like_bare_dataset(b"\x08\x00\x16\x00\x1a\x00\x00\x001.2.840.10008")
    assert not _looks_like_bare_dataset(b"<html><body>")
    assert not _looks_like_bare_dataset(b"\x89PNG\r\n\x1a\n")


# -- discs and folders ------------------------------------------------------------------


@pytest.mark.fast
def test_disc_image_imports_completely(archive: Archive, tmp_path: Path) -> None:
    disc = tmp_path / "disc"
    sops = make_disc(disc, count=5)
    before = snapshot(disc)
    seen: list[ImportItem] = []

    assert count_import(archive, disc) == 5
    report = import_path(
        archive, disc, issuer="HOSP-A", institution="General Hospital", progress=seen.append
    )

    assert report.kind == "dicomdir"
    assert report.dicomdirs == ["DICOMDIR"]
    assert report.counts["stored"] == 5
    assert report.failed == 0
    assert len(seen) == 5 == len(report.items)
    assert all(i.in_dicomdir is True for i in report.items)
    assert "DICOMDIR" not in outcomes(report)  # read, never ingested
    assert len(report.studies) == 2
    assert report.bytes_stored == report.bytes_read > 0
    stored = stored_sops(archive)
    assert set(stored) == set(sops)
    assert set(stored.values()) == {("import", "General Hospital", "HOSP-A")}
    # The user's files are untouched; nothing is left in staging.
    assert snapshot(disc) == before
    assert staging_files(archive) == []

    text = render_summary(report)
    assert "stored" in text and "DICOMDIR" in text
    data = json.loads(json.dumps(report.as_dict()))
    assert data["counts"]["stored"] == 5
    assert data["total"] == 5
    assert len(data["files"]) == 5


@pytest.mark.fast
def test_reimport_is_all_duplicate(archive: Archive, tmp_path: Path) -> None:
    disc = tmp_path / "disc"
    make_disc(disc, count=4)
    (disc / "README.TXT").write_text("Open the viewer to see your images.\n")
    first = import_path(archive, disc, issuer=None)
    assert first.counts["stored"] == 4

    second = import_path(archive, disc, issuer=None)
    assert second.counts["duplicate"] == 4
    assert second.counts["stored"] == 0
    assert second.counts["skipped-not-dicom"] == 1
    assert second.failed == 0
    assert second.bytes_stored == 0
    assert second.bytes_imported == first.bytes_imported
    # Issuer defaults to the archive's when the import names none.
    assert {v[2] for v in stored_sops(archive).values()} == {archive.settings.default_issuer}


@pytest.mark.fast
def test_lowercased_disc_with_extras(archive: Archive, tmp_path: Path) -> None:
    """A disc mounted lower-case, with a viewer, autorun and an unreferenced instance."""
    disc = tmp_path / "disc"
    sops = make_disc(disc, count=3, studies=1)
    # Lower-case every name below the root, as `mount -o map=normal` shows ISO 9660.
    for p in sorted(disc.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        p.rename(p.with_name(p.name.lower()))
    (disc / "autorun.inf").write_text("[autorun]\r\nopen=viewer\\viewer.exe\r\n")
    (disc / "viewer").mkdir()
    (disc / "viewer" / "viewer.exe").write_bytes(b"MZ\x90\x00" + os.urandom(4096))
    (disc / "index.html").write_text("<html><body>Patient images</body></html>")
    (disc / "thumbs.db").write_bytes(os.urandom(1024))
    extra = ct_slice(rows=8, columns=8)
    write(extra, disc / "extra" / "IMG0001.dcm")

    report = import_path(archive, disc, issuer="HOSP-A")
    result = outcomes(report)

    assert report.kind == "dicomdir"
    assert report.dicomdirs == ["dicomdir"]
    referenced = [i for i in report.items if i.in_dicomdir]
    assert [i.outcome for i in referenced] == [STORED] * 3
    assert result["extra/IMG0001.dcm"] is STORED
    assert report.unreferenced == 5  # four junk files and the extra instance
    for junk in ("autorun.inf", "viewer/viewer.exe", "index.html", "thumbs.db"):
        assert result[junk] is SKIPPED
        item = next(i for i in report.items if i.name == junk)
        assert "not DICOM" in item.reason
        assert item.in_dicomdir is False
    assert "dicomdir" not in result
    assert set(stored_sops(archive)) == {*sops, extra.SOPInstanceUID}
    assert report.failed == 0


@pytest.mark.fast
def test_path_naming_the_dicomdir_imports_its_folder(archive: Archive, tmp_path: Path) -> None:
    disc = tmp_path / "disc"
    make_disc(disc, count=2, studies=1)
    report = import_path(archive, disc / "DICOMDIR", issuer=None)
    assert report.kind == "dicomdir"
    assert report.counts["stored"] == 2


@pytest.mark.fast
def test_dicomdir_referencing_missing_file(archive: Archive, tmp_path: Path) -> None:
    disc = tmp_path / "disc"
    make_disc(disc, count=3, studies=1)
    gone = referenced_files(disc)[1]
    gone.unlink()
    missing_name = gone.relative_to(disc).as_posix()

    report = import_path(archive, disc, issuer=None)
    result = outcomes(report)

    assert result[missing_name] is FAILED
    item = next(i for i in report.items if i.name == missing_name)
    assert item.reason == "referenced by DICOMDIR but missing"
    assert report.counts["stored"] == 2
    assert report.failed == 1
    assert "referenced by DICOMDIR but missing" in render_summary(report)


@pytest.mark.fast
def test_unreadable_dicomdir_falls_back_to_walking(archive: Archive, tmp_path: Path) -> None:
    folder = tmp_path / "disc"
    for i in range(2):
        write(ct_slice(rows=8, columns=8, instance_number=i + 1), folder / "IMAGES" / f"IM{i}")
    (folder / "DICOMDIR").write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00")  # truncated

    report = import_path(archive, folder, issuer=None)
    result = outcomes(report)

    assert report.kind == "folder"
    assert any("DICOMDIR" in w for w in report.warnings)
    assert result["IMAGES/IM0"] is STORED and result["IMAGES/IM1"] is STORED
    assert result["DICOMDIR"] is FAILED  # a damaged disc is worth reporting


@pytest.mark.fast
def test_folder_with_junk(archive: Archive, tmp_path: Path) -> None:
    folder = tmp_path / "export"
    good = [
        write(ct_slice(instance_number=i, rows=8, columns=8), folder / f"{i}.dcm") for i in (1, 2)
    ]
    (folder / "notes.txt").write_text("not an image\n")
    (folder / "report.html").write_text("<!doctype html><html><body>report</body></html>")
    (folder / "empty.dcm").write_bytes(b"")
    truncated = ct_slice(rows=32, columns=32)
    write(truncated, folder / "cut.dcm")
    data = (folder / "cut.dcm").read_bytes()
    (folder / "cut.dcm").write_bytes(data[: len(data) // 2])
    # A data set written without preamble or file meta, as old discs have them.
    bare = ct_slice(rows=8, columns=8, instance_number=9)
    del bare.file_meta
    bare_path = folder / "OLDDISC" / "IM000009"
    bare_path.parent.mkdir(parents=True)
    pydicom.dcmwrite(
        bare_path, bare, enforce_file_format=False, implicit_vr=True, little_endian=True
    )
    bare_bytes = bare_path.read_bytes()
    assert bare_bytes[128:132] != b"DICM"

    report = import_path(archive, folder, issuer=None)
    result = outcomes(report)

    assert report.kind == "folder"
    assert result["1.dcm"] is STORED and result["2.dcm"] is STORED
    assert result["OLDDISC/IM000009"] is STORED
    assert result["notes.txt"] is SKIPPED
    assert result["report.html"] is SKIPPED
    assert result["empty.dcm"] is SKIPPED
    assert result["cut.dcm"] is FAILED
    cut = next(i for i in report.items if i.name == "cut.dcm")
    assert "file ends" in cut.reason or "truncated" in cut.reason
    assert cut.code == "invalid-dataset"
    assert all(i.in_dicomdir is None for i in report.items)
    assert report.counts == {
        "stored": 3,
        "duplicate": 0,
        "alternate-syntax": 0,
        "reconciled-copy": 0,
        "skipped-not-dicom": 3,
        "failed": 1,
    }
    # Never lose the user's files.
    assert all(p.exists() for p in good)
    assert bare_path.read_bytes() == bare_bytes
    text = render_summary(report)
    assert "cut.dcm" in text and "notes.txt" in text


@pytest.mark.fast
def test_single_file(archive: Archive, tmp_path: Path) -> None:
    path = write(ct_slice(rows=8, columns=8), tmp_path / "one.dcm")
    report = import_path(archive, path, issuer=None)
    assert report.kind == "file"
    assert [(i.name, i.outcome) for i in report.items] == [("one.dcm", STORED)]
    assert path.exists()


@pytest.mark.fast
def test_archive_data_folder_is_never_walked(archive: Archive, tmp_path: Path) -> None:
    # The settings keep the archive under tmp_path/var: importing tmp_path must not
    # re-import the blobs.
    make_disc(tmp_path / "disc", count=2, studies=1)
    report = import_path(archive, tmp_path, issuer=None)
    assert report.counts["stored"] == 2
    assert not any(i.name.startswith("var/") for i in report.items)
    assert any("data folder" in w for w in report.warnings)
    with pytest.raises(ImportSourceError):
        import_path(archive, archive.settings.data_dir, issuer=None)


@pytest.mark.fast
def test_missing_path(archive: Archive, tmp_path: Path) -> None:
    with pytest.raises(ImportSourceError):
        import_path(archive, tmp_path / "nope", issuer=None)


# -- zip files ----------------------------------------------------------------------------


@pytest.mark.fast
def test_zip_of_a_disc(archive: Archive, tmp_path: Path) -> None:
    disc = tmp_path / "disc"
    sops = make_disc(disc, count=4)
    (disc / "AUTORUN.INF").write_text("[autorun]\r\n")
    archive_zip = zip_folder(disc, tmp_path / "images.zip")
    zip_bytes = archive_zip.read_bytes()
    seen: list[ImportItem] = []

    assert count_import(archive, archive_zip) == 5
    report = import_path(archive, archive_zip, issuer="HOSP-B", progress=seen.append)
    result = outcomes(report)

    assert report.kind == "zip"
    assert report.dicomdirs == ["DICOMDIR"]
    assert report.counts["stored"] == 4
    assert result["AUTORUN.INF"] is SKIPPED
    assert len(seen) == 5
    assert set(stored_sops(archive)) == set(sops)
    assert staging_files(archive) == []
    assert archive_zip.read_bytes() == zip_bytes

    again = import_path(archive, archive_zip, issuer="HOSP-B")
    assert again.counts["duplicate"] == 4
    assert again.counts["stored"] == 0
    assert staging_files(archive) == []


@pytest.mark.fast
def test_zip_of_a_plain_folder(archive: Archive, tmp_path: Path) -> None:
    folder = tmp_path / "export"
    for i in (1, 2, 3):
        write(ct_slice(instance_number=i, rows=8, columns=8), folder / "series" / f"{i}.dcm")
    (folder / "info.txt").write_text("exported\n")
    archive_zip = zip_folder(folder, tmp_path / "export.zip")
    report = import_path(archive, archive_zip, issuer=None)
    result = outcomes(report)
    assert report.kind == "zip"
    assert [result[f"series/{i}.dcm"] for i in (1, 2, 3)] == [STORED] * 3
    assert result["info.txt"] is SKIPPED
    assert all(i.in_dicomdir is None for i in report.items)


@pytest.mark.fast
def test_zip_with_dicomdir_referencing_missing_member(archive: Archive, tmp_path: Path) -> None:
    disc = tmp_path / "disc"
    make_disc(disc, count=3, studies=1)
    gone = referenced_files(disc)[0]
    gone.unlink()
    archive_zip = zip_folder(disc, tmp_path / "disc.zip")
    report = import_path(archive, archive_zip, issuer=None)
    result = outcomes(report)
    assert result[gone.relative_to(disc).as_posix()] is FAILED
    assert report.counts["stored"] == 2


@pytest.mark.fast
def test_hostile_zip(archive: Archive, tmp_path: Path) -> None:
    good = write(ct_slice(rows=8, columns=8), tmp_path / "src" / "good.dcm").read_bytes()
    evil = write(ct_slice(rows=8, columns=8), tmp_path / "src" / "evil.dcm").read_bytes()
    big = write(ct_slice(rows=256, columns=256), tmp_path / "src" / "big.dcm").read_bytes()
    hostile = tmp_path / "upload" / "hostile.zip"
    hostile.parent.mkdir()
    with zipfile.ZipFile(hostile, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("good.dcm", good)
        zf.writestr("../evil", evil)
        zf.writestr("sub/../../evil2.dcm", evil)
        zf.writestr("/abs/evil3.dcm", evil)
        zf.writestr("big.dcm", big)
    limits = ImportLimits(max_member_size=64 * 1024)  # big.dcm is about 130 KB

    report = import_path(archive, hostile, issuer=None, limits=limits)
    by_name = {i.name: i for i in report.items}

    assert by_name["good.dcm"].outcome is STORED
    for name in ("../evil", "sub/../../evil2.dcm", "/abs/evil3.dcm"):
        assert by_name[name].outcome is FAILED
        assert by_name[name].code == "unsafe-member-name"
        assert "unsafe member name" in by_name[name].reason
    assert by_name["big.dcm"].outcome is FAILED
    assert by_name["big.dcm"].code == "member-too-large"
    assert "above the limit" in by_name["big.dcm"].reason
    # Nothing was written under a member's own name, anywhere.
    assert {p.name for p in tmp_path.rglob("evil*")} == {"evil.dcm"}  # the source only
    assert not Path("/abs/evil3.dcm").exists()
    assert staging_files(archive) == []
    assert set(stored_sops(archive)) == {pydicom.dcmread(io.BytesIO(good)).SOPInstanceUID}


@pytest.mark.fast
def test_zip_bomb_by_ratio(archive: Archive, tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        # 24 MB of zeros behind a DICOM preamble compress about 1000:1.
        zf.writestr("bomb.dcm", b"\x00" * 128 + b"DICM" + b"\x00" * (24 * 1024 * 1024))
    report = import_path(archive, bomb, issuer=None)  # the default limits
    [item] = report.items
    assert item.outcome is FAILED
    assert item.code == "compression-ratio"
    assert "zip bomb" in item.reason
    assert staging_files(archive) == []


@pytest.mark.fast
def test_member_larger_than_declared_is_cut_off(archive: Archive, tmp_path: Path) -> None:
    """A member whose header understates its size fails; zipfile checks the CRC."""
    data = (write(ct_slice(rows=16, columns=16), tmp_path / "x.dcm")).read_bytes()
    path = tmp_path / "lying.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("x.dcm", data)
    # Patch the sizes in the central directory and local header to claim 200 bytes.
    raw = bytearray(path.read_bytes())
    size = len(data).to_bytes(4, "little")
    assert raw.count(size) >= 2
    raw = bytearray(bytes(raw).replace(size, (200).to_bytes(4, "little")))
    path.write_bytes(bytes(raw))
    report = import_path(archive, path, issuer=None)
    assert [i.outcome for i in report.items] == [FAILED]
    assert report.items[0].code == "unreadable-member"
    assert "CRC" in report.items[0].reason
    assert staging_files(archive) == []


@pytest.mark.fast
def test_not_a_zip(archive: Archive, tmp_path: Path) -> None:
    path = tmp_path / "broken.zip"
    path.write_bytes(b"PK\x03\x04 this is not really a zip")
    with pytest.raises(ImportSourceError):
        import_path(archive, path, issuer=None)


# -- console front -----------------------------------------------------------------------


@pytest.mark.fast
def test_plan_total_matches_items(archive: Archive, tmp_path: Path) -> None:
    disc = tmp_path / "disc"
    make_disc(disc, count=3)
    (disc / "junk.txt").write_text("x")
    plan = plan_import(archive, disc)
    report = import_path(archive, disc, issuer=None, plan=plan)
    assert plan.total == len(report.items) == 4


@pytest.mark.fast
def test_run_import_exit_codes(archive: Archive, tmp_path: Path) -> None:
    disc = tmp_path / "disc"
    make_disc(disc, count=2, studies=1)
    con, buf = console()
    assert (
        run_import(archive, disc, issuer=None, institution="", json_output=False, console=con) == 0
    )
    out = buf.getvalue()
    assert "stored" in out and "2" in out

    con, buf = console()
    assert (
        run_import(archive, disc, issuer=None, institution="", json_output=True, console=con) == 0
    )
    data = json.loads(buf.getvalue())
    assert data["counts"]["duplicate"] == 2

    referenced_files(disc)[0].unlink()
    con, buf = console()
    assert (
        run_import(archive, disc, issuer=None, institution="", json_output=True, console=con) == 1
    )
    data = json.loads(buf.getvalue())
    assert data["counts"]["failed"] == 1
    failed = [f for f in data["files"] if f["outcome"] == "failed"]
    assert failed[0]["reason"] == "referenced by DICOMDIR but missing"

    con, buf = console()
    code = run_import(
        archive, tmp_path / "nope", issuer=None, institution="", json_output=False, console=con
    )
    assert code == 2
    assert "no such file" in buf.getvalue()
    con, buf = console()
    code = run_import(
        archive, tmp_path / "nope", issuer=None, institution="", json_output=True, console=con
    )
    assert code == 2
    assert "error" in json.loads(buf.getvalue())


@pytest.mark.fast
def test_names_with_control_characters_are_escaped(archive: Archive, tmp_path: Path) -> None:
    path = tmp_path / "names.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("\x1b[31mred.txt", "hello")
    report = import_path(archive, path, issuer=None)
    assert report.items[0].name == "\\x1b[31mred.txt"
    assert "\x1b" not in render_summary(report)


@pytest.mark.fast
def test_stops_after_repeated_storage_failures(
    archive: Archive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.archive.errors import StorageUnavailable

    folder = tmp_path / "export"
    for i in range(1, 7):
        write(ct_slice(instance_number=i, rows=8, columns=8), folder / f"{i}.dcm")
    (folder / "z.txt").write_text("x")

    def down(*args, **kwargs):
        raise StorageUnavailable("blob store unreachable")

    monkeypatch.setattr(archive, "ingest_file", down)
    report = import_path(archive, folder, issuer=None)
    codes = [i.code for i in report.items]
    assert codes == ["storage-unavailable"] * 3 + ["not-attempted"] * 4
    assert report.stopped
    assert "Stopped early" in render_summary(report)
    assert all(p.exists() for p in folder.iterdir())
