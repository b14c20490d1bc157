"""Import a CD/DVD, a plain folder, a DICOMDIR or a .zip file into the archive.

Every instance goes through the archive's one ingest path,
``Archive.ingest_file(path, Source(door="import", ...), owned=...)``: this module only
finds the files, screens out what is plainly not DICOM, and reports what happened to
each one.

How the work is found (``plan_import``):

- a folder is walked; every file named ``DICOMDIR`` in it (PS3.3 Annex F, read with
  pydicom) lists files relative to its own folder. Referenced files are imported
  first, in DICOMDIR order, resolved case-insensitively (discs are ISO 9660
  upper-case, mounts often lower-case them, and some show ``;1`` version suffixes);
  references to absent files are reported as failed; files present but not
  referenced are imported too and flagged as such. The DICOMDIR itself is read,
  never ingested. The archive's own data folder is never walked into.
- a path naming a DICOMDIR imports the folder it sits in.
- a .zip file is read from its central directory; a DICOMDIR inside is honoured the
  same way. Each member is streamed to one staging file in
  ``settings.staging_dir`` and ingested with ``owned=True``: members are never
  extracted under their own names, never held in memory whole, and members with
  unsafe names ('..', absolute paths), an uncompressed size above the limit or a
  suspicious compression ratio (a zip bomb) are refused with a clear reason.
- any other file is imported on its own.

Files in the user's folder are ingested with ``owned=False``: the archive copies
them and never moves or deletes them. Importing the same source twice reports every
instance as ``duplicate`` the second time (the archive's idempotency rule).

Non-DICOM files (autorun.inf, viewer programs, html, thumbnails) are skipped cheaply
by looking at their first bytes: a Part 10 file has 'DICM' at offset 128; a data set
written without preamble (old discs) starts with a group 0000/0002/0008 element. A
file that shows neither is still handed to ingest when its name says it is DICOM
(.dcm, .dic, .dicom), so that a damaged file is reported as failed, not skipped.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import re
import shutil
import stat
import struct
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, BinaryIO

import pydicom
from pydicom.uid import MediaStorageDirectoryStorage

from gateway.archive.errors import ArchiveError
from gateway.archive.ingest import Source

if TYPE_CHECKING:
    from gateway.archive import Archive

log = logging.getLogger(__name__)

DOOR = "import"

_HEAD = 132
_CHUNK = 1024 * 1024
_DICOM_SUFFIXES = frozenset({".dcm", ".dic", ".dicom"})
_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI "
    b"UL UN UR US UT UV".split()
)
_ISO_VERSION = re.compile(r";\d*$")


class ImportOutcome(StrEnum):
    STORED = "stored"
    DUPLICATE = "duplicate"
    ALTERNATE_SYNTAX = "alternate-syntax"
    RECONCILED_COPY = "reconciled-copy"
    SKIPPED = "skipped-not-dicom"
    FAILED = "failed"


# Outcomes that mean "the archive holds this instance".
IMPORTED = frozenset(
    {
        ImportOutcome.STORED,
        ImportOutcome.DUPLICATE,
        ImportOutcome.ALTERNATE_SYNTAX,
        ImportOutcome.RECONCILED_COPY,
    }
)


class ImportSourceError(Exception):
    """The path cannot be imported at all (missing, unreadable, a broken zip...)."""


@dataclass(frozen=True)
class ImportLimits:
    """Guards for zip files (zip bombs) and other resource limits of an import."""

    # Largest uncompressed zip member (a large multi-frame instance is a few GB).
    max_member_size: int = 4 * 1024**3
    # Largest uncompressed/compressed ratio of a zip member ...
    max_ratio: float = 200.0
    # ... judged only once the member is at least this large (DICOM with blank
    # pixel data legitimately compresses very well).
    ratio_floor: int = 16 * 1024**2
    # Members a zip file may list.
    max_members: int = 500_000
    # A DICOMDIR is parsed in memory: refuse absurd ones.
    max_dicomdir_size: int = 256 * 1024**2
    # Stop after this many consecutive "storage/index unavailable" failures.
    max_consecutive_unavailable: int = 3


DEFAULT_LIMITS = ImportLimits()


@dataclass
class ImportItem:
    """What happened to one file (or zip member) of an import."""

    # Path relative to the import root (posix separators) or the zip member name.
    name: str
    outcome: ImportOutcome
    # Why a file was skipped or failed (the ArchiveError message for failures).
    reason: str = ""
    # Machine-readable reason: the ArchiveError's ``reason``, or one of ours.
    code: str = ""
    size: int = 0
    sop_uid: str = ""
    study_uid: str = ""
    # True/False when the source had a DICOMDIR: whether it referenced this file.
    in_dicomdir: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "outcome": self.outcome.value,
            "size": self.size,
        }
        if self.reason:
            out["reason"] = self.reason
            out["code"] = self.code
        if self.sop_uid:
            out["sop_instance_uid"] = self.sop_uid
            out["study_instance_uid"] = self.study_uid
        if self.in_dicomdir is not None:
            out["in_dicomdir"] = self.in_dicomdir
        return out


@dataclass
class ImportReport:
    source: str
    kind: str  # "folder", "dicomdir", "zip" or "file"
    dicomdirs: list[str] = field(default_factory=list)
    items: list[ImportItem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # Why the import stopped before the end ("" when it ran to completion).
    stopped: str = ""
    started_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    finished_at: dt.datetime | None = None

    @property
    def counts(self) -> dict[str, int]:
        counts = {o.value: 0 for o in ImportOutcome}
        for item in self.items:
            counts[item.outcome.value] += 1
        return counts

    @property
    def failed(self) -> int:
        return sum(1 for i in self.items if i.outcome is ImportOutcome.FAILED)

    @property
    def imported(self) -> int:
        return sum(1 for i in self.items if i.outcome in IMPORTED)

    @property
    def bytes_read(self) -> int:
        """Bytes of every file looked at (uncompressed size for zip members)."""
        return sum(i.size for i in self.items)

    @property
    def bytes_imported(self) -> int:
        """Bytes of the files the archive now holds (stored now or before)."""
        return sum(i.size for i in self.items if i.outcome in IMPORTED)

    @property
    def bytes_stored(self) -> int:
        """Bytes of the files that became new copies in the archive."""
        new = (ImportOutcome.STORED, ImportOutcome.RECONCILED_COPY)
        return sum(i.size for i in self.items if i.outcome in new)

    @property
    def studies(self) -> list[str]:
        return sorted({i.study_uid for i in self.items if i.outcome in IMPORTED and i.study_uid})

    @property
    def unreferenced(self) -> int:
        return sum(1 for i in self.items if i.in_dicomdir is False)

    @property
    def duration(self) -> float:
        end = self.finished_at or dt.datetime.now(dt.UTC)
        return (end - self.started_at).total_seconds()

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "kind": self.kind,
            "dicomdirs": list(self.dicomdirs),
            "started_at": self.started_at.isoformat(),
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "duration_seconds": round(self.duration, 3),
            "total": len(self.items),
            "counts": self.counts,
            "bytes_read": self.bytes_read,
            "bytes_imported": self.bytes_imported,
            "bytes_stored": self.bytes_stored,
            "studies": self.studies,
            "unreferenced_by_dicomdir": self.unreferenced,
            "warnings": list(self.warnings),
            "stopped": self.stopped or None,
            "files": [i.as_dict() for i in self.items],
        }


# -- planning ----------------------------------------------------------------------


@dataclass
class _Work:
    name: str
    path: Path | None = None
    member: zipfile.ZipInfo | None = None
    in_dicomdir: bool | None = None
    # Decided while planning (missing reference, unsafe member name).
    preset: ImportItem | None = None


@dataclass
class ImportPlan:
    """The work an import will do, found before any file is ingested."""

    source: Path
    kind: str
    work: list[_Work] = field(default_factory=list)
    dicomdirs: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        """Items the import will report (for a progress bar)."""
        return len(self.work)


def plan_import(
    archive: Archive, path: Path, *, limits: ImportLimits = DEFAULT_LIMITS, staged: bool = False
) -> ImportPlan:
    """Find the work of importing ``path`` (folder, DICOMDIR, zip or one file).

    ``staged``: ``path`` is an upload the gateway itself put in its staging folder,
    so being inside the data folder is expected.
    """
    path = Path(path).expanduser()
    try:
        st = path.stat()
    except FileNotFoundError as exc:
        raise ImportSourceError(f"{path}: no such file or folder") from exc
    except OSError as exc:
        raise ImportSourceError(f"{path}: {exc.strerror}") from exc
    data_dir = archive.settings.data_dir.resolve()
    resolved = path.resolve()
    if not staged and (resolved == data_dir or data_dir in resolved.parents):
        raise ImportSourceError(f"{path} is inside the archive's own data folder")
    if stat.S_ISDIR(st.st_mode):
        return _plan_folder(path, {data_dir}, limits)
    if not stat.S_ISREG(st.st_mode):
        raise ImportSourceError(f"{path} is neither a folder nor a regular file")
    if _key(path.name) == "dicomdir":
        return _plan_folder(path.parent, {data_dir}, limits)
    if _is_zip(path):
        return _plan_zip(path, limits)
    plan = ImportPlan(source=path, kind="file")
    plan.work.append(_Work(name=_display(path.name), path=path))
    return plan


def count_import(archive: Archive, path: Path, *, limits: ImportLimits = DEFAULT_LIMITS) -> int:
    """How many items importing ``path`` will report (for a progress bar's total)."""
    return plan_import(archive, path, limits=limits).total


def _plan_folder(root: Path, skip: set[Path], limits: ImportLimits) -> ImportPlan:
    plan = ImportPlan(source=root, kind="folder")
    files = list(_walk(root, skip, plan.warnings))
    index: dict[str, str] = {}
    for rel in files:
        index.setdefault(_key(rel), rel)
    dicomdirs = [rel for rel in files if _key(PurePosixPath(rel).name) == "dicomdir"]
    referenced: dict[str, None] = {}  # insertion-ordered set of rel paths
    directories: set[str] = set()
    for dd in dicomdirs:
        refs = _read_dicomdir_file(root / dd, dd, limits, plan.warnings)
        if refs is None:
            continue  # not readable as a DICOMDIR: imported as an ordinary file
        directories.add(dd)
        plan.dicomdirs.append(_display(dd))
        base = str(PurePosixPath(dd).parent)
        for components in refs:
            ref = _join(base, components)
            if isinstance(components, str):  # an unsafe reference, explained
                plan.work.append(_failed_ref(ref, components))
                continue
            found = index.get(_key(ref))
            if found is None:
                plan.work.append(_missing_ref(ref))
            elif found not in referenced and found not in directories:
                referenced[found] = None
                plan.work.append(_Work(_display(found), path=root / found, in_dicomdir=True))
    has_dicomdir = bool(directories)
    if has_dicomdir:
        plan.kind = "dicomdir"
    for rel in files:
        if rel in referenced or rel in directories:
            continue
        plan.work.append(
            _Work(_display(rel), path=root / rel, in_dicomdir=False if has_dicomdir else None)
        )
    return plan


def _walk(root: Path, skip: set[Path], warn: list[str]) -> Iterator[str]:
    """Relative posix paths of the files under root, sorted, not following links."""

    def onerror(exc: OSError) -> None:
        where = _rel(root, exc.filename) if exc.filename else "?"
        warn.append(f"cannot read folder {where}: {exc.strerror}")

    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror):
        here = Path(dirpath)
        kept = []
        for d in sorted(dirnames):
            if (here / d).resolve() in skip:
                warn.append(f"skipped folder {_rel(root, here / d)}: the archive's data folder")
            else:
                kept.append(d)
        dirnames[:] = kept
        for name in sorted(filenames):
            yield _rel(root, here / name)


def _rel(root: Path, path: str | os.PathLike[str]) -> str:
    return Path(path).relative_to(root).as_posix()


def _plan_zip(path: Path, limits: ImportLimits) -> ImportPlan:
    plan = ImportPlan(source=path, kind="zip")
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            if len(infos) > limits.max_members:
                raise ImportSourceError(
                    f"{path}: the zip file lists {len(infos)} members, more than the "
                    f"limit of {limits.max_members}"
                )
            members: list[tuple[str, zipfile.ZipInfo]] = []
            for info in infos:
                if info.is_dir():
                    continue
                safe = _safe_member_name(info.filename)
                if safe is None:
                    plan.work.append(
                        _Work(
                            _display(info.filename),
                            preset=ImportItem(
                                name=_display(info.filename),
                                outcome=ImportOutcome.FAILED,
                                reason="unsafe member name (absolute path or '..'); not extracted",
                                code="unsafe-member-name",
                                size=info.file_size,
                            ),
                        )
                    )
                    continue
                members.append((safe, info))
            index: dict[str, int] = {}
            for i, (safe, _info) in enumerate(members):
                index.setdefault(_key(safe), i)
            directories: set[int] = set()
            referenced: dict[int, None] = {}
            for i, (safe, info) in enumerate(members):
                if _key(PurePosixPath(safe).name) != "dicomdir":
                    continue
                refs = _read_dicomdir_member(zf, info, safe, limits, plan.warnings)
                if refs is None:
                    continue
                directories.add(i)
                plan.dicomdirs.append(_display(info.filename))
                base = str(PurePosixPath(safe).parent)
                for components in refs:
                    ref = _join(base, components)
                    if isinstance(components, str):
                        plan.work.append(_failed_ref(ref, components))
                        continue
                    j = index.get(_key(ref))
                    if j is None:
                        plan.work.append(_missing_ref(ref))
                    elif j not in referenced and j not in directories:
                        referenced[j] = None
                        plan.work.append(
                            _Work(
                                _display(members[j][1].filename),
                                member=members[j][1],
                                in_dicomdir=True,
                            )
                        )
            has_dicomdir = bool(directories)
            for i, (_safe, info) in enumerate(members):
                if i in referenced or i in directories:
                    continue
                plan.work.append(
                    _Work(
                        _display(info.filename),
                        member=info,
                        in_dicomdir=False if has_dicomdir else None,
                    )
                )
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as exc:
        raise ImportSourceError(f"{path}: cannot read the zip file: {exc}") from exc
    return plan


def _safe_member_name(name: str) -> str | None:
    """The member name as a relative posix path, or None when it could escape a folder."""
    if not name or "\x00" in name:
        return None
    norm = name.replace("\\", "/")
    if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm):
        return None
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return "/".join(parts)


def _is_zip(path: Path) -> bool:
    if path.suffix.lower() == ".zip":
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(_HEAD)
    except OSError:
        return False
    if head[:4] != b"PK\x03\x04" or head[128:132] == b"DICM":
        return False
    return zipfile.is_zipfile(path)


# -- DICOMDIR ----------------------------------------------------------------------

# A reference is a tuple of path components, or a str explaining why it is unusable.
_Ref = tuple[str, ...] | str


def _read_dicomdir_file(
    path: Path, rel: str, limits: ImportLimits, warn: list[str]
) -> list[_Ref] | None:
    try:
        size = path.stat().st_size
        if size > limits.max_dicomdir_size:
            warn.append(f"{_display(rel)}: DICOMDIR of {size} bytes is too large to read")
            return None
        with open(path, "rb") as fh:
            return _dicomdir_refs(fh)
    except Exception as exc:
        warn.append(
            f"{_display(rel)}: not a readable DICOMDIR ({_brief(exc)}); "
            "the folder was scanned instead"
        )
        return None


def _read_dicomdir_member(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, rel: str, limits: ImportLimits, warn: list[str]
) -> list[_Ref] | None:
    if info.file_size > limits.max_dicomdir_size or _bomb_ratio(
        info.file_size, info.compress_size, limits
    ):
        warn.append(f"{_display(rel)}: DICOMDIR member too large or too compressed to read")
        return None
    try:
        with zf.open(info) as fh:
            return _dicomdir_refs(fh)
    except Exception as exc:
        warn.append(
            f"{_display(rel)}: not a readable DICOMDIR ({_brief(exc)}); "
            "the zip file was scanned instead"
        )
        return None


def _dicomdir_refs(fh: BinaryIO) -> list[_Ref]:
    """ReferencedFileID of every record in use, in order, without repeats."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(fh)
        if ds.file_meta.get("MediaStorageSOPClassUID") != MediaStorageDirectoryStorage:
            raise ValueError("not a Media Storage Directory")
        records = ds.get("DirectoryRecordSequence")
        if records is None:
            raise ValueError("no Directory Record Sequence")
        out: dict[_Ref, None] = {}
        for record in records:
            if record.get("RecordInUseFlag", 0xFFFF) == 0:
                continue  # inactive record (retired attribute, still written by some)
            value = record.get("ReferencedFileID")
            if value is None or value == "":
                continue
            raw = [value] if isinstance(value, str) else list(value)
            components = tuple(str(c).strip() for c in raw)
            out.setdefault(_check_components(components), None)
    return list(out)


def _check_components(components: tuple[str, ...]) -> _Ref:
    for c in components:
        if c in ("", ".", "..") or "/" in c or "\\" in c or ":" in c or "\x00" in c:
            return "unsafe ReferencedFileID in DICOMDIR (empty, '..' or a separator); not read"
    return components


def _join(base: str, components: _Ref) -> str:
    if isinstance(components, str):
        return f"{base}/<unsafe reference>" if base not in ("", ".") else "<unsafe reference>"
    rel = "/".join(components)
    return rel if base in ("", ".") else f"{base}/{rel}"


def _missing_ref(ref: str) -> _Work:
    name = _display(ref)
    return _Work(
        name,
        in_dicomdir=True,
        preset=ImportItem(
            name=name,
            outcome=ImportOutcome.FAILED,
            reason="referenced by DICOMDIR but missing",
            code="missing-file",
            in_dicomdir=True,
        ),
    )


def _failed_ref(ref: str, reason: str) -> _Work:
    name = _display(ref)
    return _Work(
        name,
        in_dicomdir=True,
        preset=ImportItem(
            name=name,
            outcome=ImportOutcome.FAILED,
            reason=reason,
            code="unsafe-reference",
            in_dicomdir=True,
        ),
    )


def _key(rel: str) -> str:
    """Case- and ISO 9660-insensitive form of a relative path, for matching."""
    parts = []
    for part in rel.replace("\\", "/").split("/"):
        part = _ISO_VERSION.sub("", part).rstrip(".").lower()
        if part:
            parts.append(part)
    return "/".join(parts)


# -- screening ---------------------------------------------------------------------


def _screen(name: str, head: bytes, size: int) -> str | None:
    """Why a file is plainly not DICOM, or None to let ingest decide."""
    if size == 0:
        return "empty file"
    if len(head) >= _HEAD and head[128:132] == b"DICM":
        return None
    if _looks_like_bare_dataset(head):
        return None
    if PurePosixPath(name).suffix.lower() in _DICOM_SUFFIXES:
        return None
    return "not DICOM (no 'DICM' marker at offset 128, and does not start like a data set)"


def _looks_like_bare_dataset(head: bytes) -> bool:
    """Whether the first bytes look like a DICOM data set written without preamble.

    Such a data set starts with an element of group 0000 (group length), 0002 (file
    meta without preamble) or 0008 (the first group of every valid data set), low
    element numbers, and either an explicit VR or a short implicit VR length.
    """
    if len(head) < 8:
        return False
    for fmt in ("<", ">"):
        group, element = struct.unpack(fmt + "HH", head[:4])
        if group not in (0x0000, 0x0002, 0x0008) or element >= 0x0100:
            continue
        if group == 0x0000 and element != 0x0000:
            continue
        if head[4:6] in _VRS:
            return True  # explicit VR
        (length,) = struct.unpack(fmt + "L", head[4:8])
        if fmt == "<" and 0 < length < 0x1000:
            return True  # implicit VR little endian, a plausible first element
    return False


# -- running -----------------------------------------------------------------------


def import_path(
    archive: Archive,
    path: Path,
    *,
    issuer: str | None,
    institution: str = "",
    transfer_id: int | None = None,
    progress: Callable[[ImportItem], None] | None = None,
    plan: ImportPlan | None = None,
    limits: ImportLimits = DEFAULT_LIMITS,
    admit: Callable[[str], None] | None = None,
) -> ImportReport:
    """Import every instance found at ``path``; one ``ImportItem`` per file found.

    ``progress`` is called after each item; ``admit`` is the door's admission check
    (``Source.admit``: an HTTP upload may add only to studies its sender sees). Pass
    the ``plan`` from ``plan_import`` to avoid finding the work twice. Raises
    ImportSourceError when the path cannot be imported at all; problems with single
    files are reported, never raised.
    """
    if plan is None:
        plan = plan_import(archive, path, limits=limits)
    source = Source(
        door=DOOR,
        institution=institution,
        issuer=issuer or "",
        transfer_id=transfer_id,
        admit=admit,
    )
    runner = _Runner(archive, source, limits)
    report = ImportReport(
        source=str(plan.source),
        kind=plan.kind,
        dicomdirs=list(plan.dicomdirs),
        warnings=list(plan.warnings),
    )
    with contextlib.ExitStack() as stack:
        zf: zipfile.ZipFile | None = None
        if plan.kind == "zip":
            try:
                zf = stack.enter_context(zipfile.ZipFile(plan.source))
            except (zipfile.BadZipFile, OSError) as exc:
                raise ImportSourceError(f"{plan.source}: cannot read the zip file: {exc}") from exc
        for work in plan.work:
            if work.preset is not None:
                item = work.preset
            elif runner.stopped:
                item = ImportItem(
                    name=work.name,
                    outcome=ImportOutcome.FAILED,
                    reason=f"not attempted: the import stopped ({runner.stopped})",
                    code="not-attempted",
                )
            elif work.member is not None:
                assert zf is not None
                item = runner.member(zf, work)
            else:
                assert work.path is not None
                item = runner.file(work)
            item.in_dicomdir = work.in_dicomdir
            report.items.append(item)
            if progress is not None:
                progress(item)
    report.stopped = runner.stopped
    report.finished_at = dt.datetime.now(dt.UTC)
    log.info(
        "import of %s: %s",
        plan.source,
        ", ".join(f"{n} {k}" for k, n in report.counts.items() if n),
    )
    return report


class _MemberRefused(Exception):
    def __init__(self, reason: str, code: str) -> None:
        super().__init__(reason)
        self.code = code


class _Runner:
    def __init__(self, archive: Archive, source: Source, limits: ImportLimits) -> None:
        self.archive = archive
        self.source = source
        self.limits = limits
        self.staging = archive.settings.staging_dir
        self.staging.mkdir(parents=True, exist_ok=True)
        self.unavailable = 0
        self.stopped = ""

    def file(self, work: _Work) -> ImportItem:
        assert work.path is not None
        item = ImportItem(name=work.name, outcome=ImportOutcome.FAILED)
        try:
            st = os.stat(work.path)
            if not stat.S_ISREG(st.st_mode):
                return _skip(item, "not a regular file", "not-a-file")
            item.size = st.st_size
            with open(work.path, "rb") as fh:
                head = fh.read(_HEAD)
        except OSError as exc:
            return _fail(item, f"cannot read file: {exc.strerror}", "unreadable")
        reason = _screen(work.name, head, item.size)
        if reason is not None:
            return _skip(item, reason, "not-dicom")
        return self._ingest(work.path, item, owned=False)

    def member(self, zf: zipfile.ZipFile, work: _Work) -> ImportItem:
        info = work.member
        assert info is not None
        item = ImportItem(name=work.name, outcome=ImportOutcome.FAILED, size=info.file_size)
        staged: Path | None = None
        try:
            if info.flag_bits & 0x1:
                raise _MemberRefused("encrypted zip member; not supported", "encrypted-member")
            with zf.open(info) as src:
                # The first bytes tell a viewer or a picture from DICOM: such members
                # are skipped without expanding them, whatever their size.
                head = src.read(_HEAD)
                reason = _screen(work.name, head, info.file_size)
                if reason is not None:
                    return _skip(item, reason, "not-dicom")
                self._check_member(info)
                free = shutil.disk_usage(self.staging).free
                if free < info.file_size + 64 * 1024**2:
                    raise _MemberRefused(
                        f"not enough free space in the staging folder for "
                        f"{_fmt_bytes(info.file_size)}",
                        "no-space",
                    )
                staged = self._stage(src, head, info)
        except _MemberRefused as exc:
            return _fail(item, str(exc), exc.code)
        except RuntimeError as exc:  # zipfile: encrypted member, no password
            return _fail(item, f"cannot read zip member: {exc}", "unreadable-member")
        except NotImplementedError as exc:  # zipfile: unsupported compression method
            return _fail(item, f"cannot read zip member: {exc}", "unreadable-member")
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
            return _fail(item, f"cannot read zip member: {_brief(exc)}", "unreadable-member")
        return self._ingest(staged, item, owned=True)

    def _check_member(self, info: zipfile.ZipInfo) -> None:
        limits = self.limits
        if info.file_size > limits.max_member_size:
            raise _MemberRefused(
                f"zip member expands to {_fmt_bytes(info.file_size)}, above the limit of "
                f"{_fmt_bytes(limits.max_member_size)}",
                "member-too-large",
            )
        if _bomb_ratio(info.file_size, info.compress_size, limits):
            raise _MemberRefused(
                f"zip member compressed {info.file_size / max(info.compress_size, 1):.0f}:1, "
                f"above the limit of {limits.max_ratio:.0f}:1 (zip bomb?)",
                "compression-ratio",
            )

    def _stage(self, src: BinaryIO, head: bytes, info: zipfile.ZipInfo) -> Path:
        """Stream the rest of a member into one staging file, guarding its size."""
        limits = self.limits
        cap = min(info.file_size, limits.max_member_size)
        fd, name = tempfile.mkstemp(dir=self.staging, prefix="import-", suffix=".dcm")
        staged = Path(name)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(head)
                written = len(head)
                while chunk := src.read(_CHUNK):
                    written += len(chunk)
                    if written > cap:
                        raise _MemberRefused(
                            "zip member expands beyond its declared size or the limit "
                            f"of {_fmt_bytes(limits.max_member_size)}",
                            "member-too-large",
                        )
                    if _bomb_ratio(written, info.compress_size, limits):
                        raise _MemberRefused(
                            f"zip member compressed more than {limits.max_ratio:.0f}:1 (zip bomb?)",
                            "compression-ratio",
                        )
                    out.write(chunk)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                staged.unlink()
            raise
        return staged

    def _ingest(self, path: Path, item: ImportItem, *, owned: bool) -> ImportItem:
        try:
            result = self.archive.ingest_file(path, self.source, owned=owned)
        except ArchiveError as exc:
            self._count_unavailable(exc)
            return _fail(item, str(exc) or exc.reason, exc.reason)
        except Exception as exc:
            log.exception("import: unexpected error ingesting %s", item.name)
            return _fail(item, f"unexpected error: {_brief(exc)}", "unexpected-error")
        finally:
            if owned:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        self.unavailable = 0
        item.outcome = ImportOutcome(result.outcome.value)
        item.sop_uid = result.sop_uid
        item.study_uid = result.study_uid
        return item

    def _count_unavailable(self, exc: ArchiveError) -> None:
        if not exc.retryable:
            self.unavailable = 0
            return
        self.unavailable += 1
        if self.unavailable >= self.limits.max_consecutive_unavailable:
            self.stopped = (
                f"{exc.reason} {self.unavailable} times in a row; run the import again "
                "later: files already imported will be reported as duplicates"
            )


def _bomb_ratio(size: int, compressed: int, limits: ImportLimits) -> bool:
    return size >= limits.ratio_floor and size / max(compressed, 1) > limits.max_ratio


def _skip(item: ImportItem, reason: str, code: str) -> ImportItem:
    item.outcome, item.reason, item.code = ImportOutcome.SKIPPED, reason, code
    return item


def _fail(item: ImportItem, reason: str, code: str) -> ImportItem:
    item.outcome, item.reason, item.code = ImportOutcome.FAILED, reason, code
    return item


def _brief(exc: BaseException) -> str:
    text = str(exc).strip() or exc.__class__.__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _display(name: str) -> str:
    """A name safe to print: control characters and undecodable bytes escaped."""
    if name.isprintable():
        return name
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in name)


# -- summary -----------------------------------------------------------------------

_LISTED_FAILURES = 50
_LISTED_SKIPS = 10


def render_summary(report: ImportReport) -> str:
    """A plain-text summary of an import for the console."""
    counts = report.counts
    kind = {"dicomdir": "DICOMDIR", "zip": "zip file", "folder": "folder", "file": "file"}
    lines = [
        f"Import of {_display(report.source)} ({kind.get(report.kind, report.kind)}): "
        f"{_plural(len(report.items), 'file')} in {report.duration:.1f} s"
    ]
    width = max(len(o.value) for o in ImportOutcome)
    for outcome in ImportOutcome:
        n = counts[outcome.value]
        if n or outcome in (ImportOutcome.STORED, ImportOutcome.FAILED):
            lines.append(f"  {outcome.value:<{width}}  {n:>7}")
    lines.append(
        f"  {_plural(len(report.studies), 'study', 'studies')}, "
        f"{_fmt_bytes(report.bytes_imported)} imported "
        f"({_fmt_bytes(report.bytes_stored)} new), {_fmt_bytes(report.bytes_read)} read"
    )
    if report.dicomdirs:
        lines.append(
            f"  DICOMDIR: {', '.join(report.dicomdirs)}; "
            f"{_plural(report.unreferenced, 'file')} present but not referenced by it"
        )
    if report.stopped:
        lines.append(f"Stopped early: {report.stopped}")
    for warning in report.warnings:
        lines.append(f"Warning: {warning}")
    lines.extend(_listing(report, ImportOutcome.FAILED, "Failed", _LISTED_FAILURES))
    lines.extend(_listing(report, ImportOutcome.SKIPPED, "Skipped", _LISTED_SKIPS))
    return "\n".join(lines)


def _listing(report: ImportReport, outcome: ImportOutcome, title: str, limit: int) -> list[str]:
    items = [i for i in report.items if i.outcome is outcome]
    if not items:
        return []
    lines = [f"{title}:"]
    lines.extend(f"  {i.name}: {i.reason}" for i in items[:limit])
    if len(items) > limit:
        lines.append(f"  ... and {len(items) - limit} more (--json lists every file)")
    return lines


def _plural(n: int, one: str, many: str = "") -> str:
    return f"{n} {one if n == 1 else (many or one + 's')}"


def _fmt_bytes(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KB", "MB", "GB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} TB"
