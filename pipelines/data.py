"""What every modality's data check returns, and the upload limits they share.

`inspect_data` in each modality never raises on bad user data: it returns a DataReport whose problems
name the file and row (or entry) and say why, so the UI can show them before any training starts.
"""

from __future__ import annotations

import os
import re
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Problem:
    file: str
    reason: str
    row: int | None = None  # as a spreadsheet numbers a CSV's or Excel's rows (the header is row 1), the line of a
    # JSONL, the item of a JSON list (from 1); None for the whole file
    kept: bool = False      # a warning: the file or row still trains (an image smaller than the training size)
    rows: int = 1           # the data rows it lost, where a row is named: a quote never closed takes the lines after

    def __str__(self) -> str:
        where = f"{self.file}, row {self.row}" if self.row is not None else self.file
        return f"{where}: {self.reason}"


@dataclass
class DataReport:
    format: str = ""                     # detected or chosen shape of the data
    rows_found: int = 0
    rows_usable: int = 0
    problems: list[Problem] = field(default_factory=list)
    preview: list[dict[str, Any]] = field(default_factory=list)  # first rows, as the model will see them
    stats: dict[str, Any] = field(default_factory=dict)
    columns: list[str] = field(default_factory=list)
    mapping: dict[str, str] = field(default_factory=dict)       # role -> column actually used
    validation_rows: int = 0
    validation_from_files: bool = False  # the validation rows come from their own upload, not the training rows
    roots: list[Path] = field(default_factory=list)  # uploaded folders and unpacked zips: files are named inside them
    blocker: str = ""  # why no run could start with usable rows all the same (the base model cannot be loaded)
    unit: str = "rows"  # what the counts count, in the summary: rows of a table, images, clips

    @property
    def ok(self) -> bool:
        return self.rows_usable > 0 and not self.validation_unusable and not self.blocker

    @property
    def validation_unusable(self) -> bool:
        """Validation data was uploaded and none of it is usable: measured on the training rows instead, the
        run would show their loss as validation loss."""
        return self.validation_from_files and not self.validation_rows

    def problem(self, file: str | Path, reason: str, row: int | None = None, kept: bool = False,
                rows: int = 1) -> None:
        self.problems.append(Problem(self.shown(file), reason, row, kept, rows))

    def base_model_unusable(self, reason: str) -> None:
        """Why the base model cannot be loaded (nothing when `reason` is empty): no run could start."""
        if reason:
            self.blocker = f"the base model cannot be used: {reason}"

    def shown(self, file: str | Path) -> str:
        """A file as the user knows it: its path inside the folder or zip they uploaded (two speakers' 001.wav
        are told apart), else its name (an upload's temporary folder means nothing to them)."""
        if not file:
            return ""
        path = Path(file)
        if not path.is_absolute():
            return str(path)  # already named as the user knows it
        root = next((r for r in self.roots if path.is_relative_to(r)), None)
        return str(path.relative_to(root)) if root else path.name

    def verdict(self, what: str = "data") -> str:
        """What the check's first line leads with: "Data" when it can train, "Cannot train yet" when usable rows
        are held back (the validation data, the base model), else "No usable <what>"; nothing where the summary
        says so itself ("No usable data: <the first problem>", when no file had a row)."""
        if self.ok:
            return "Data"  # ("Images: 8 of 8 images usable" said it twice)
        if self.rows_usable:
            return "Cannot train yet"
        return "" if not self.rows_found and self.problems else f"No usable {what}"

    def summary(self) -> str:
        """One line for the UI and the CLI."""
        if not self.rows_found and self.problems:
            return f"No usable data: {self.problems[0]}"
        text = f"{self.rows_usable} of {self.rows_found} {self.unit} usable"
        if self.format and self.format != self.unit:
            text += f" ({self.format})"
        if self.validation_unusable:
            text += "; the validation data has nothing usable (see the problems)"
        elif self.validation_rows and self.validation_from_files:
            text += f", plus {self.validation_rows} for validation from the validation data"
        elif self.validation_rows:
            text += f", {self.validation_rows} held out for validation"
        # Counted from the totals, not from the problems: a bad clip or image is reported by file, not by row,
        # and a warning (kept=True) drops nothing.
        dropped = max(0, self.rows_found - self.rows_usable)
        if dropped:
            text += f"; {dropped} {self.unit[:-1] if dropped == 1 else self.unit} dropped"
        if self.blocker:
            text += f"; but {self.blocker}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "roots"}


class NotText(ValueError):
    """Why an uploaded file cannot be read as text, in words for the user."""


READ_AS_WINDOWS_1252 = ("is not UTF-8: read as Windows-1252, what Excel's 'CSV' and Notepad's 'ANSI' save on "
                        "Western-European Windows; if letters look wrong in the preview, save it as UTF-8 and upload "
                        "again")
_CONTROL_BYTES = re.compile(rb"[\x00-\x08\x0b\x0e-\x1f]")


def decode_text(raw: bytes) -> tuple[str, str]:
    """An uploaded text file's bytes as text, and a warning when it was not UTF-8. Excel saves UTF-16 with a
    byte order mark as 'Unicode text', and Windows-1252 as plain 'CSV' on Western-European Windows: that one
    is taken only for text that reads as a Latin script, where letters outside ASCII are the few accented
    ones; Cyrillic or Chinese saved in their own code pages read as runs of them, and are refused."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return raw.decode("utf-16"), ""
        except UnicodeDecodeError:
            pass  # not UTF-16 after all: the checks below say what it is
    if b"\x00" in raw[:65536]:
        raise NotText("looks like a binary file, not text")
    try:
        return raw.decode("utf-8-sig"), ""
    except UnicodeDecodeError as err:
        not_utf8 = NotText(f"is not UTF-8 text (byte 0x{raw[err.start]:02x} at position {err.start}); save it as "
                           "UTF-8 and upload again")
    if _CONTROL_BYTES.search(raw):
        raise not_utf8
    try:
        text = raw.decode("cp1252")
    except UnicodeDecodeError:  # one of the five bytes Windows-1252 leaves undefined
        raise not_utf8 from None
    letters = [c for c in text if c.isalpha()]
    if sum(not c.isascii() for c in letters) > 0.3 * len(letters):
        raise not_utf8
    return text, READ_AS_WINDOWS_1252


def int_setting(name: str, default: int) -> int:
    """A whole-number setting from the environment (limits, queue size, priority; see README): its
    default when unset or not a number."""
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


# Defaults sized for a workstation; documented in the README's "Limits" section.
MAX_TABLE_BYTES = int_setting("STUDIO_MAX_TABLE_MB", 512) * 2**20
MAX_CELL_CHARS = int_setting("STUDIO_MAX_CELL_CHARS", 1_000_000)


# ---- finding the file a table row names ------------------------------------------------------

def name_key(name: str) -> str:
    """A file name as people mean it: the same letters whatever their Unicode form (macOS writes é as e and an
    accent, what a table typed elsewhere does not) and whatever their case (Windows does not tell
    Recording1.WAV from recording1.wav)."""
    return unicodedata.normalize("NFC", name).casefold()


class FileIndex:
    """Finds the file a table row names (a metadata.csv's file_name): by its path from the table's folder, else
    by a file name only one file has (files uploaded one by one each sit in a temporary folder of their own),
    else by a name without extension only one has (LJSpeech-style ids); each first as written, then by
    name_key. Built once: data sets may hold many thousands of files."""

    def __init__(self, files: list[Path], suffixes: set[str]):
        self.suffixes = suffixes
        self.tables = {}  # (as written or by name_key) -> {path / name / stem -> the files}
        for fold in (str, name_key):
            table: dict[tuple[str, str], list[Path]] = {}
            for p in dict.fromkeys(files):
                for part, text in (("path", str(p.resolve())), ("name", p.name), ("stem", p.stem)):
                    table.setdefault((part, fold(text)), []).append(p)
            self.tables[fold] = table

    def find(self, name: str, base: Path) -> Path | None:
        found = self.matches(name, base)
        return found[0] if len(found) == 1 else None

    def matches(self, name: str, base: Path) -> list[Path]:
        """[the file] a row names; else the files it may mean (the first several a name fits); else []."""
        leaf = Path(name.replace("\\", "/"))
        wanted = [("path", str((base / name).resolve())), ("name", leaf.name)]
        if leaf.suffix.lower() not in self.suffixes:  # an id without its extension
            wanted.append(("stem", leaf.stem))
        several: list[Path] = []
        for fold, table in self.tables.items():
            for part, text in wanted:
                found = table.get((part, fold(text)), [])
                if len(found) == 1:
                    return found
                several = several or found
        return several

    def several(self, name: str, base: Path, report: DataReport) -> str:
        """Why a row found no file when its name fits several, naming them ('' otherwise): anna/001.wav and
        ben/001.wav for '001.wav' was reported as a file that is not there, and both as lacking their row."""
        found = self.matches(name, base)
        if len(found) < 2:
            return ""
        shown = sorted(report.shown(p) for p in found)
        listed = ", ".join(shown[:3]) + (", …" if len(shown) > 3 else "")
        return f"matches {len(found)} files ({listed}): name it by its path in the folder"

    def has_stem(self, stem: str) -> bool:
        return any(("stem", fold(stem)) in table for fold, table in self.tables.items())
