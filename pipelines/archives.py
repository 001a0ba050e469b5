"""Unpacking uploaded zip files safely, for the image and speech tabs; a browser's folder upload put back
in its folders.

A zip from a browser is untrusted: entries may try to escape the target folder (`../`, absolute paths),
be symlinks, be encrypted, hold other archives, or be a zip bomb. Each such entry is skipped with a
reason in the report; limits on entry count, total size and compression ratio stop bombs before any
byte is written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import stat
import tempfile
import time
import zipfile
from pathlib import Path, PurePosixPath

from pipelines.data import DataReport, int_setting

MAX_ENTRIES = int_setting("STUDIO_MAX_ARCHIVE_ENTRIES", 20_000)
MAX_UNPACKED_BYTES = int_setting("STUDIO_MAX_ARCHIVE_MB", 4096) * 2**20
MAX_RATIO = int_setting("STUDIO_MAX_COMPRESSION_RATIO", 200)
# Unpacked zips and gathered folders not used for this long are removed (clean_unused): each is made again from
# its upload when needed, and a run trains on its own copy of its data. Uploads and previews too (clean_unused_files).
KEEP_UNUSED_HOURS = int_setting("STUDIO_KEEP_UNPACKED_HOURS", 24)
NESTED = {".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".7z", ".rar"}
JUNK = {".DS_Store", "Thumbs.db", "desktop.ini"}  # operating-system clutter, skipped silently
# A browser sends the files of an uploaded folder without their folders (Gradio keeps only the name), so
# early.js names each by its path in the folder, with this character (U+2215, which Gradio's file names keep)
# for "/": cat/001.png and dog/001.png stay apart, and a kohya-style 10_cat/ keeps its name.
FOLDER_MARK = "\u2215"


def unpack_once(archive: Path, folder: Path, report: DataReport) -> Path | None:
    """Unpack an uploaded zip once into folder/<its content hash>/ and reuse it afterwards: the data check and
    the run see the same files, and the preview plays from there. What unpacking found wrong is replayed on
    every call. Two checks of one new upload at once (a config loaded into both of a tab's boxes) each unpack
    into a folder of their own and the first to finish is kept: a shared temporary folder had one delete
    the other's files mid-way. Returns the data's folder, or None when nothing could be unpacked."""
    digest = hashlib.sha256(b"names-v2")  # (how entries are named changed: a zip unpacked before, again)
    try:
        with open(archive, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as err:
        report.problem(archive, f"cannot be read ({err.strerror or err})")
        return None
    target = folder / digest.hexdigest()[:20]
    record = target / "unpacked.json"
    if not record.exists():
        tmp = folder / f".tmp-{target.name}-{os.getpid()}-{secrets.token_hex(4)}"
        local = DataReport()
        root = extract_zip(archive, tmp / "files", local)
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "unpacked.json").write_text(json.dumps({"root": str(root.relative_to(tmp)) if root else None,
                                                       "problems": [[p.file, p.reason] for p in local.problems]}))
        try:
            os.replace(tmp, target)
        except OSError:  # unpacked meanwhile by another check: the same files
            shutil.rmtree(tmp, ignore_errors=True)
    else:
        _used(target)
    state = json.loads(record.read_text())
    for file, reason in state["problems"]:
        report.problem(file, reason)
    return target / state["root"] if state["root"] else None


# Gradio cuts an uploaded file's name at 200 bytes: a path longer than that is sent (and kept) as its name alone.
MARKED_NAME_BYTES = 200


def _link_or_copy(source: Path, place: Path) -> None:
    """`source` at `place` (FileExistsError where something is there already, a folder too)."""
    try:
        os.link(source, place)
    except FileExistsError:
        raise
    except OSError:  # another file system
        shutil.copyfile(source, place)
        shutil.copystat(source, place)


def gather_folder(files: list[Path], folder: Path) -> Path:
    """The files of a folder upload (named with FOLDER_MARK) back in their folders, once, linked (or copied)
    into folder/<hash of their names and places>/: the data check, the run's copy and the preview all see the
    folder as the user has it. Of two files at one place (a folder picked again, which Gradio adds to the first
    pick) the later one is kept. Returns the folder the user picked (the first part of every name)."""
    places: dict[tuple[str, ...], Path] = {}
    for file in files:
        parts = tuple(p for p in file.name.split(FOLDER_MARK) if p not in ("", ".", "..")) or (file.name,)
        places[parts] = file  # (never outside the folder: Gradio strips / and \ from names, and .. is dropped)
    digest = hashlib.sha256(json.dumps(sorted([list(k), str(f)] for k, f in places.items())).encode()).hexdigest()
    target = folder / f"folder-{digest[:20]}"
    if not target.exists():
        tmp = folder / f".tmp-{target.name}-{os.getpid()}-{secrets.token_hex(4)}"
        for parts, file in sorted(places.items(), key=lambda item: -len(item[0])):  # (the deepest first)
            place = tmp.joinpath(*parts)
            try:
                place.parent.mkdir(parents=True, exist_ok=True)
                _link_or_copy(file, place)
            except OSError:  # a file where a folder of the same name goes: the folder's files win
                continue
        try:
            os.replace(tmp, target)
        except OSError:  # gathered meanwhile by another check: the same files
            shutil.rmtree(tmp, ignore_errors=True)
    else:
        _used(target)
    tops = list(target.iterdir())
    return tops[0] if len(tops) == 1 and tops[0].is_dir() else target


def folder_as_uploads(source: Path, keep) -> list[str]:
    """The other way: a folder's files as a folder upload names them (`keep(path)` picks which), linked (or
    copied) once into a temporary folder of this source's, for an upload box to hold (a run opened in its tab;
    a run's data does not change, so opening it again reuses them)."""
    out = Path(tempfile.gettempdir()) / f"studio-folder-{hashlib.sha256(str(source).encode()).hexdigest()[:20]}"
    if out.exists():
        _used(out)
    named = []
    for path in sorted(p for p in source.rglob("*") if p.is_file() and keep(p)):
        name = FOLDER_MARK.join((source.name, *path.relative_to(source).parts))
        place = out / (name if len(name.encode()) <= MARKED_NAME_BYTES else path.name)
        if not place.exists():
            out.mkdir(exist_ok=True)
            _link_or_copy(path, place)
        named.append(str(place))
    return named


def _used(folder: Path) -> None:
    """Mark a folder made once and reused as used now, so that clean_unused keeps it."""
    with contextlib.suppress(OSError):
        os.utime(folder)


def mark_used(path: str | Path) -> None:
    """Mark a file as used now, so that clean_unused_files keeps it: its access time, set here as a read alone may
    not set it (a file system mounted noatime; relatime sets it once a day). Its modification time stays: the data
    check's cache and the preview's thumbnails know a file by it."""
    with contextlib.suppress(OSError):
        os.utime(path, ns=(time.time_ns(), os.stat(path).st_mtime_ns))


def clean_unused_files(folder: Path, hours: float = KEEP_UNUSED_HOURS, keep: set[str] = frozenset()) -> int:
    """Remove the files under `folder` that came there or were used (mark_used, a read) `hours` ago or longer,
    but those in `keep` (real paths), and the folders older than that left empty: uploads and previews,
    gigabytes of image folders and audio data sets, stayed in the temporary folder for good. A file's coming is
    its ctime, not its mtime, which a copy keeps from its source (Gradio copies with copy2, and judges its own
    cache by ctime too). Returns how many files were removed."""
    limit = time.time() - hours * 3600
    removed = 0
    for place, _, names in os.walk(folder, topdown=False):
        try:
            old = os.stat(place).st_mtime < limit  # (before the files' removal changes it; a folder just made
        except OSError:                            # for an upload on its way in stays)
            continue
        for name in names:
            path = os.path.join(place, name)
            try:
                info = os.lstat(path)
                if max(info.st_atime, info.st_ctime) < limit and os.path.realpath(path) not in keep:
                    os.unlink(path)
                    removed += 1
            except OSError:  # removed meanwhile
                continue
        if old and place != str(folder):
            with contextlib.suppress(OSError):  # (not empty: kept)
                os.rmdir(place)
    return removed


def clean_unused(uploads: Path, hours: float = KEEP_UNUSED_HOURS) -> int:
    """Remove what unpack_once, gather_folder and folder_as_uploads made and nothing has used for `hours`
    (leftovers of an unpacking cut short too), and the studio's other temporary folders of that age (a config
    saved, a run's validation folder zipped for its upload box: Gradio has its own copy of each): a user trying
    one zip after another filled the disk with unpacked copies. Returns how many were removed."""
    limit = time.time() - hours * 3600
    made = [*(uploads.iterdir() if uploads.is_dir() else []),
            *(path for kind in ("studio-folder-*", "studio-config-*", "studio-upload-*")
              for path in Path(tempfile.gettempdir()).glob(kind))]
    removed = 0
    for path in made:
        try:
            if path.is_dir() and not path.is_symlink() and path.stat().st_mtime < limit:
                # out of the way in one step, so that a check asking for it now makes it again
                doomed = path.with_name(f".removed-{path.name}-{secrets.token_hex(4)}")
                os.replace(path, doomed)
                shutil.rmtree(doomed)
                removed += 1
        except OSError:  # in use elsewhere, or removed meanwhile by another process's cleaning
            continue
    return removed


def extract_zip(archive: str | Path, destination: str | Path, report: DataReport) -> Path | None:
    """Unpack `archive` into `destination`; returns the folder holding the data (a single top-level
    folder is stepped into), or None when nothing could be unpacked. Never raises on a bad archive."""
    archive, destination = Path(archive), Path(destination)
    name = archive.name
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as err:
        report.problem(name, f"is not a readable zip file ({err})")
        return None
    with zf:
        entries = zf.infolist()
        if len(entries) > MAX_ENTRIES:
            report.problem(name, f"holds {len(entries):,} entries, over the limit of {MAX_ENTRIES:,} "
                                 "(STUDIO_MAX_ARCHIVE_ENTRIES)")
            return None
        total = sum(e.file_size for e in entries)
        if total > MAX_UNPACKED_BYTES:
            report.problem(name, f"would unpack to {total / 2**20:,.0f} MB, over the limit of "
                                 f"{MAX_UNPACKED_BYTES // 2**20:,} MB (STUDIO_MAX_ARCHIVE_MB)")
            return None
        packed = sum(e.compress_size for e in entries)
        if packed and total / packed > MAX_RATIO and total > 10 * 2**20:
            report.problem(name, f"is compressed {total / packed:,.0f} to 1, which looks like a zip bomb "
                                 f"(limit {MAX_RATIO} to 1, STUDIO_MAX_COMPRESSION_RATIO)")
            return None
        destination.mkdir(parents=True, exist_ok=True)
        root = destination.resolve()
        written = 0
        for entry in entries:
            filename = _entry_name(entry)
            path = PurePosixPath(filename.replace("\\", "/"))
            if entry.is_dir() or path.parts[:1] == ("__MACOSX",) or path.name in JUNK or path.name.startswith("._"):
                continue
            reason = _unsafe(entry, path)
            if reason:
                report.problem(name, f"entry '{filename}' skipped: {reason}")
                continue
            target = (root / Path(*path.parts)).resolve()
            if root not in target.parents:
                report.problem(name, f"entry '{filename}' skipped: it points outside the archive's folder")
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with zf.open(entry) as source, open(target, "wb") as out:
                    # Count real bytes: the sizes in the zip's directory can lie.
                    shutil.copyfileobj(_Capped(source, MAX_UNPACKED_BYTES - written), out)
            except (zipfile.BadZipFile, OSError, RuntimeError, ValueError) as err:
                report.problem(name, f"entry '{filename}' could not be unpacked: {err}")
                target.unlink(missing_ok=True)
                continue
            written += target.stat().st_size
    folders = list(destination.iterdir())
    if not folders:
        report.problem(name, "holds no usable files")
        return None
    if len(folders) == 1 and folders[0].is_dir():
        return folders[0]
    return destination


def _entry_name(entry: zipfile.ZipInfo) -> str:
    """An entry's name as its maker wrote it. Without the UTF-8 flag zipfile reads the name as DOS's cp437, but
    Linux's and macOS's zip write UTF-8 without the flag: `café ☕.wav` came out as `caf├⌐ Γÿò.wav`, and its
    metadata.csv row found no clip. A real cp437 name with letters outside ASCII is rarely valid UTF-8."""
    if entry.flag_bits & 0x800:
        return entry.filename
    try:
        return entry.filename.encode("cp437").decode("utf-8")
    except UnicodeError:
        return entry.filename


def _unsafe(entry: zipfile.ZipInfo, path: PurePosixPath) -> str:
    if entry.flag_bits & 0x1:
        return "it is password-protected; upload an unencrypted zip"
    if path.is_absolute() or entry.filename.startswith(("/", "\\")) or (len(path.parts) and ":" in path.parts[0]):
        return "it has an absolute path"
    if ".." in path.parts:
        return "its path climbs out of the archive ('..')"
    if stat.S_ISLNK(entry.external_attr >> 16):
        return "it is a symbolic link"
    if path.suffix.lower() in NESTED:
        return "archives inside archives are not unpacked; unpack it and upload its files"
    return ""


class _Capped:
    """A reader that refuses to yield more than `limit` bytes: the last line against zip bombs."""

    def __init__(self, source, limit: int):
        self.source, self.left = source, limit

    def read(self, size: int = -1) -> bytes:
        data = self.source.read(size if size >= 0 else 1 << 20)
        self.left -= len(data)
        if self.left < 0:
            raise ValueError(f"the archive unpacks to more than {MAX_UNPACKED_BYTES // 2**20:,} MB")
        return data
