"""Reading and checking speech training data: audio clips and their transcripts.

Clips come from a folder, a zip, or files uploaded one by one; transcripts from a table (metadata.csv
with file_name and transcription columns, as Hugging Face's audiofolder uses) or a same-name .txt file
per clip. The same `load_clips` feeds the data check the user sees and the training run, so what the
check accepts is exactly what trains. Bad files are reported with their name and reason, never raised.
"""

from __future__ import annotations

import random
import statistics
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from pipelines.archives import JUNK, unpack_once
from pipelines.data import MAX_TABLE_BYTES, DataReport, FileIndex, NotText, decode_text
from pipelines.hub import workspace
from pipelines.llm.data import read_table
from pipelines.speech.audio import (AUDIO_SUFFIXES, SAMPLE_RATE, SILENCE_DBFS, WINDOW_SECONDS, Audio, AudioUnreadable,
                                    divide_words, is_silent, read_audio, split_points)
from pipelines.speech.config import SpeechConfig

TABLE_SUFFIXES = {".csv", ".tsv", ".jsonl", ".json"}
# Column names recognised in a metadata table, in order of preference (compared case-insensitively).
FILE_COLUMNS = ["file_name", "filename", "file", "path", "audio", "audio_file", "audio_path", "audio_filepath",
                "wav", "clip"]
TEXT_COLUMNS = ["transcription", "transcript", "text", "sentence", "normalized_text", "label"]
# A data set released in splits (Common Voice's train/dev/test.tsv, or train/ validation/ test/ folders), told by
# a table or folder named train: each other split's role, by its name.
SPLITS = {"train": "train", "dev": "dev", "validation": "dev", "valid": "dev", "test": "test",
          "validated": "validated", "invalidated": "invalid", "reported": "invalid", "other": "unchecked",
          "clip_durations": "extra", "validated_sentences": "extra", "unvalidated_sentences": "extra"}
HELD_OUT = {"test": "the test split: not trained on, kept for testing the tuned model",
            "validated": "left out: the train split is its share for training",
            "invalid": "clips marked invalid by the data set's reviewers: not trained on",
            "unchecked": "clips not yet reviewed: not trained on",
            "dev": "the dev split: not trained on (the validation data uploaded is used instead)",
            "extra": "the data set's own records, not clips with transcripts: left out"}
# The split names a folder may have. The rest are Common Voice's tables: a speaker's folder named 'other' is not
# its clips not yet reviewed.
FOLDER_SPLITS = {name: role for name, role in SPLITS.items() if role in ("train", "dev", "test")}
MAX_SPLIT_SECONDS = 600.0   # longer recordings are not split: a transcript spread over 20 pieces is a guess
MIN_SECONDS = 0.1


@dataclass
class Clip:
    """One training example: up to 30 s of audio and what is said in it."""

    audio: str                      # the file, for the preview player and messages
    text: str
    seconds: float
    samples: np.ndarray | None = field(default=None, repr=False)  # 16 kHz mono; None once no longer needed
    start: float = 0.0              # where this piece begins in the file (long recordings that were split)
    source: str = ""                # "a.wav" or "a.wav, part 2 of 3"
    tokens: int = 0                 # transcript length in tokens


@dataclass
class _Transcript:
    text: str
    origin: str                     # the table or .txt file it came from
    row: int | None = None
    readable: bool = True           # False: its .txt could not be read (reported once, for the .txt)


# ---- finding files ---------------------------------------------------------------------------

def _expand(paths: list[str], report: DataReport) -> list[Path]:
    """Every file named, or inside a named folder or zip."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            report.problem(path, "was not found")
        elif path.is_dir():
            report.roots.append(path)
            files += sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p, path))
        elif path.suffix.lower() == ".zip":
            root = unpack_once(path, workspace() / "uploads", report)
            if root is not None:
                report.roots.append(root)
                files += sorted(p for p in root.rglob("*") if p.is_file() and not _hidden(p, root))
        else:
            files.append(path)
    return list(dict.fromkeys(files))


def _hidden(path: Path, root: Path) -> bool:
    parts = path.relative_to(root).parts
    return any(p.startswith(".") or p == "__MACOSX" for p in parts) or path.name in JUNK


# ---- transcripts -----------------------------------------------------------------------------

def _pick(columns: list[str], names: list[str]) -> str:
    lower = {c.lower(): c for c in columns}
    return next((lower[n] for n in names if n in lower), "")


def _ljspeech_rows(table: Path, index: FileIndex, report: DataReport) -> list[tuple[int, dict]]:
    """LJSpeech's metadata.csv: no header row, `id|transcription|normalized transcription` on each line (the
    transcription keeps its digits, as Whisper writes them; with two fields, `id|transcription`). Told from a
    table with a header by its first lines: '|' in each, and one of them naming a clip by its first field (a
    data set cut down may lack the first clip). [] for any other table."""
    if table.suffix.lower() != ".csv" or not 0 < table.stat().st_size <= MAX_TABLE_BYTES:
        return []
    try:
        text, read_as = decode_text(table.read_bytes())
    except NotText:
        return []  # (read_table says so)
    lines = [line for line in text.splitlines() if line.strip()]
    first = [line.split("|") for line in lines[:10]]
    if not all(len(fields) >= 2 for fields in first) or not any(
            index.find(fields[0].strip(), table.parent) for fields in first):
        return []
    report.problem(table, "read as LJSpeech's layout: no header, clip id|transcription|normalized on each line",
                   kept=True)
    if read_as:
        report.problem(table, read_as, kept=True)
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split("|")
        if line.strip():  # (a '|' within a transcription: the fields between the first and the last)
            words = "|".join(fields[1:-1]) if len(fields) > 3 else (fields + [""])[1]
            rows.append((number, {"file_name": fields[0].strip(), "transcription": words}))
    return rows


def _read(table: Path, index: FileIndex, report: DataReport) -> list[tuple[int, dict]]:
    return _ljspeech_rows(table, index, report) or read_table(table, report)


def _transcripts(tables: dict[Path, list[tuple[int, dict]]], texts: list[Path], audio: list[Path],
                 left_out: set[Path], others: list[Path], report: DataReport, count: bool
                 ) -> tuple[dict[Path, _Transcript], int]:
    """Transcript per audio file (from the tables' rows, read by _splits), and the number of table rows whose
    audio is missing. A row or .txt of a clip `left_out` (a split not trained on) is passed over: the split's
    note counts it."""
    found: dict[Path, _Transcript] = {}
    orphans = 0
    index = FileIndex(audio + sorted(left_out), AUDIO_SUFFIXES)
    other_names = {p.name for p in others}
    for table, rows in tables.items():
        if not rows:
            continue
        columns = list(dict.fromkeys(k for _, record in rows[:200] for k in record))
        file_column, text_column = _pick(columns, FILE_COLUMNS), _pick(columns, TEXT_COLUMNS)
        if not file_column or not text_column:
            report.problem(table, f"needs a column naming the audio file (file_name) and one with its transcript "
                                  f"(transcription, text or sentence); found {columns}")
            continue
        if count:
            report.columns, report.mapping = columns, {"audio": file_column, "text": text_column}
        for number, record in rows:
            name = str(record.get(file_column) or "").strip()
            if not name:
                report.problem(table, f"the '{file_column}' column is empty", number)
                continue
            clip = index.find(name, table.parent)
            if clip in left_out:
                continue
            if clip is None:
                orphans += 1
                leaf = Path(name.replace("\\", "/")).name
                why = index.several(name, table.parent, report) or (
                    "is not an audio file" if leaf in other_names else "is not among the audio files")
                report.problem(table, f"names '{name}', which {why}", number)
                continue
            if clip in found:
                report.problem(table, f"names '{name}' again (already in {found[clip].origin}"
                                      f"{f' row {found[clip].row}' if found[clip].row else ''}); this row is skipped",
                               number)
                continue
            text = record.get(text_column)
            found[clip] = _Transcript("" if text is None else str(text).strip(), table.name, number)
    text_files = FileIndex(texts, {".txt"})  # the same-name .txt beside the clip, else the only one so named
    for clip in audio:
        text_file = None if clip in found else text_files.find(clip.stem + ".txt", clip.parent)
        if text_file is None:
            continue
        try:
            text, read_as = decode_text(text_file.read_bytes())
        except (NotText, OSError) as err:
            report.problem(text_file, str(err) if isinstance(err, NotText) else f"cannot be read ({err})")
            found[clip] = _Transcript("", text_file.name, readable=False)
            continue
        if read_as:
            report.problem(text_file, read_as, kept=True)
        found[clip] = _Transcript(" ".join(text.split()), text_file.name)
    used = {t.origin for t in found.values()}
    for text_file in texts:
        if text_file.name not in used and not index.has_stem(text_file.stem):
            report.problem(text_file, "matches no audio file (a transcript pairs with the audio file of the "
                                      "same name)")
    return found, orphans


# ---- the whole data set ----------------------------------------------------------------------

def _tokenizer(config: SpeechConfig):
    from whisper.tokenizer import get_tokenizer  # imports torch: only when clips are actually checked
    return get_tokenizer(not config.base_model.strip().endswith(".en"))


def _split_folder(path: Path, roots: list[Path]) -> Path | None:
    """The folder inside a folder or zip given whose name makes it a split (train/, validation/, test/), nearest
    first. None for a file given on its own: the folder it sits in is not copied into a run with it."""
    root = next((r for r in roots if path.is_relative_to(r)), None)
    if root is None:
        return None
    return next((root / folder for folder in path.relative_to(root).parents if folder.name.lower() in FOLDER_SPLITS),
                None)


def _splits(tables: list[Path], audio: list[Path], report: DataReport, dev_validates: bool
            ) -> tuple[dict[Path, list[tuple[int, dict]]], list[Path], set[Path], set[Path]]:
    """In a data set released in splits (see SPLITS): the train split's tables and audio, and the dev split's as
    validation data (`dev_validates`); every other split is left out, with a note per table or folder. Else all
    of them, and no dev split. Returns the rows of the tables to read (each table is read once), the audio to
    use, the clips of the dev split and those left out."""
    index = FileIndex(audio, AUDIO_SUFFIXES)
    in_folder = {p: folder for p in tables + audio if (folder := _split_folder(p, report.roots))}
    folders = list(dict.fromkeys(in_folder.values()))
    # Each split's tables and folders ("sources"), with the clips each names or holds: a table in a split's folder
    # is of that split, as its clips are, whether a table there, one at the top or .txt files give their words.
    role = {t: SPLITS.get(t.stem.lower()) or (FOLDER_SPLITS[in_folder[t].name.lower()] if t in in_folder else None)
            for t in tables} | {f: FOLDER_SPLITS[f.name.lower()] for f in folders}
    if "train" not in role.values():
        return {t: _read(t, index, report) for t in tables}, audio, set(), set()
    # (the training tables first: the one a clip with no transcript is told to get a row in)
    used = [t for t in tables if role[t] in ("train", None)] + [t for t in tables if role[t] == "dev" and dev_validates]
    # Problems in the rows of the tables left out are not said: they do not train.
    rows = {t: _read(t, index, report if t in used else DataReport()) for t in tables if t in used or role[t]}
    named: dict[Path, set[Path]] = {f: {a for a in audio if in_folder.get(a) == f} for f in folders}
    for table in (t for t in tables if role[t]):
        column = _pick(list(dict.fromkeys(k for _, record in rows[table][:200] for k in record)), FILE_COLUMNS)
        named[table] = {clip for _, record in rows[table]
                        if column and (clip := index.find(str(record.get(column) or "").strip(), table.parent))}
    taken = used + [f for f in folders if role[f] == "train" or (role[f] == "dev" and dev_validates)]
    dev = set().union(*(named[s] for s in taken if role[s] == "dev"))
    left_out = set().union(*named.values()) - set().union(*(named.get(s, set()) for s in taken))

    def clips(n: int) -> str:
        return f" ({n:,} clip{'s' if n != 1 else ''})"
    # A note per split's table or folder (not per table in a split's folder: its folder's note says it).
    for source in (s for s in tables + folders if role[s] and s not in in_folder):
        if role[source] == "dev" and dev_validates:
            report.problem(source, "the dev split: the validation data" + clips(len(named[source])), kept=True)
        elif source not in taken:  # (the validated and extra tables name clips of the other splits)
            count = "" if role[source] in ("validated", "extra") else clips(len(named[source] & left_out))
            report.problem(source, HELD_OUT[role[source]] + count, kept=True)
    return {t: rows[t] for t in used}, [a for a in audio if a not in left_out], dev, left_out


# What the data check heard in each clip up to 30 s long, by its path, size and time, without the samples: a
# check again (each setting the tab watches starts one) decoded every clip again, for minutes with thousands.
# (A clip that could not be decoded is tried again each time: the reason may pass, ffmpeg timed out on a busy
# machine, and such clips are few.)
_heard: dict[tuple, tuple[Audio, int, bool]] = {}


def _hear(path: Path, limit: float, keep_audio: bool) -> tuple[Audio, int, bool]:
    """(the audio, its number of samples, whether it is silent). Raises AudioUnreadable."""
    try:
        stat = path.stat()
    except OSError as err:
        raise AudioUnreadable(f"cannot be read ({err.strerror or err})") from None
    key = (str(path), stat.st_size, stat.st_mtime_ns, limit)
    known = None if keep_audio else _heard.get(key)
    if known:
        return known
    sound = read_audio(path, max_seconds=limit)
    heard = (sound, len(sound.samples), is_silent(sound.samples))
    if sound.seconds <= WINDOW_SECONDS:  # (a longer one is split, and that needs its samples)
        if len(_heard) > 200_000:
            _heard.clear()
        _heard[key] = (replace(sound, samples=np.empty(0, np.float32)), *heard[1:])
    return heard


def _clips_from(paths: list[str], config: SpeechConfig, report: DataReport, keep_audio: bool,
                count: bool = True) -> tuple[list[Clip], set[Path]]:
    """The usable clips of the files, folders and zips named, and of those the ones the data set's dev split
    names (validation data, see _splits)."""
    files = _expand(paths, report)
    audio = [p for p in files if p.suffix.lower() in AUDIO_SUFFIXES]
    tables = [p for p in files if p.suffix.lower() in TABLE_SUFFIXES]
    texts = [p for p in files if p.suffix.lower() == ".txt"]
    others = [p for p in files if p.suffix.lower() not in AUDIO_SUFFIXES | TABLE_SUFFIXES | {".txt"}]
    for other in others:
        if other.suffix.lower() == ".zip":  # only a zip chosen or uploaded itself is unpacked
            report.problem(other, "is a zip inside the data: unpack it, or upload it on its own")
        else:
            report.problem(other, f"is not an audio file ({other.suffix or 'no extension'}); use "
                                  "wav, flac, mp3, ogg, m4a, webm or a video's sound track (mp4, mov)")
    if not audio:
        report.problem(paths[0] if len(paths) == 1 else "data", "holds no audio files (wav, flac, mp3, ogg, m4a, "
                                                                "webm, mp4...)")
    tables, audio, dev, left_out = _splits(tables, audio, report, count and not config.validation_path)
    transcripts, orphans = _transcripts(tables, texts, audio, left_out, others, report, count)
    if count:
        report.rows_found += len(audio) + orphans
        kinds = ([", ".join(sorted({t.name for t in tables}))] if tables else []) + ([".txt files"] if texts else [])
        report.format = report.format or " + ".join(kinds)

    tokenizer = _tokenizer(config)
    stats = report.stats
    clips: list[Clip] = []
    limit = WINDOW_SECONDS + 0.5 if config.long_clips == "reject" else MAX_SPLIT_SECONDS + 1
    for path in audio:
        transcript = transcripts.get(path)
        if transcript is None:
            table = next(iter(tables)).name if tables else "metadata.csv"  # the user's own table, where there is one
            report.problem(path, f"has no transcript: add a row for it to {table} (file_name, transcription) "
                                 f"or a {path.stem}.txt beside it")
            continue
        if not transcript.readable:  # (its .txt is named in the problems already)
            continue
        where = (transcript.origin, transcript.row) if transcript.row else (path, None)
        if not transcript.text:
            report.problem(where[0], f"the transcript of {path.name} is empty", where[1])
            continue
        try:
            sound, frames, silent = _hear(path, limit, keep_audio)
        except AudioUnreadable as err:
            report.problem(path, str(err))
            continue
        if frames == 0:
            report.problem(path, "holds no audio (0 seconds long)")
            continue
        if sound.seconds < MIN_SECONDS:
            report.problem(path, f"is only {sound.seconds * 1000:.0f} ms long: too short to hold speech")
            continue
        if silent:
            report.problem(path, f"is silent (nothing louder than {SILENCE_DBFS:.0f} dBFS): there is no speech "
                                 "to learn from, or it was recorded far too quietly to hear")
            continue
        pieces = [(0, frames)]
        if sound.seconds > WINDOW_SECONDS:
            if config.long_clips == "reject":  # (split is offered only where it would take the recording)
                report.problem(path, f"is {sound.seconds:.1f} s long, and Whisper hears at most 30 s at a time: "
                                     "cut it into shorter clips" + (", or set long clips to 'split'"
                                                                   if sound.seconds <= MAX_SPLIT_SECONDS else ""))
                continue
            if sound.seconds > MAX_SPLIT_SECONDS:
                report.problem(path, f"is {sound.seconds / 60:.0f} minutes long; only recordings up to "
                                     f"{MAX_SPLIT_SECONDS / 60:.0f} minutes are split: cut it into clips of up to 30 s")
                continue
            pieces = split_points(sound.samples)
            report.problem(path, f"is {sound.seconds:.1f} s long: split into {len(pieces)} pieces of at most 30 s "
                                 "at quiet points, its transcript divided between them by length (check the "
                                 "preview; clips with their own transcripts train better)")
        texts_per_piece = divide_words(transcript.text, [b - a for a, b in pieces]) if len(pieces) > 1 \
            else [transcript.text]
        made = []
        for i, ((a, b), text) in enumerate(zip(pieces, texts_per_piece), start=1):
            tokens = len(tokenizer.encode(" " + text, disallowed_special=()))
            source = path.name if len(pieces) == 1 else f"{path.name}, part {i} of {len(pieces)}"
            if tokens > config.max_label_tokens:
                report.problem(where[0], f"the transcript of {source} is {tokens} tokens, over the limit of "
                                         f"{config.max_label_tokens} (max label tokens)", where[1])
                made = []
                break
            if not text:
                continue
            made.append(Clip(audio=str(path), text=text, seconds=(b - a) / SAMPLE_RATE,
                             samples=sound.samples[a:b] if keep_audio else None, start=a / SAMPLE_RATE,
                             source=source, tokens=tokens))
        if made and count:  # (of the clips that train: those dropped are counted among the problems)
            stats.setdefault("sample_rates", Counter())[str(sound.source_rate)] += 1
            stats.setdefault("channels", Counter())[str(sound.channels)] += 1
            stats.setdefault("encodings", Counter())[sound.encoding] += 1
            if sound.converted:
                stats.setdefault("converted", []).append(f"{report.shown(path)}: {sound.describe()} -> 16000 Hz mono")
        clips += made
    return clips, dev


def load_clips(config: SpeechConfig, report: DataReport | None = None, keep_audio: bool = True
               ) -> tuple[DataReport, list[Clip], list[Clip]]:
    """Find, decode and check every clip, report every problem, split train/validation.
    Never raises on bad data. With keep_audio, each clip carries its 16 kHz samples."""
    report = report or DataReport(unit="clips")
    sources = ([config.data_path] if config.data_path.strip() else []) + list(config.data_files)
    train, dev = _clips_from(sources, config, report, keep_audio)
    validation: list[Clip] = []
    if config.validation_path:
        first = len(report.problems)
        validation = _clips_from(config.validation_path, config, report, keep_audio, count=False)[0]
        for problem in report.problems[first:]:  # (told from the training data's metadata.csv, its cat.wav)
            problem.file = "validation data" if problem.file == "data" else f"validation data: {problem.file}"
    elif dev:
        validation = [c for c in train if Path(c.audio) in dev]
        train = [c for c in train if Path(c.audio) not in dev]
    elif config.validation_fraction > 0:
        files = sorted({c.audio for c in train})
        if len(files) >= 5:
            # Hold out whole recordings, so no piece of a split file is both learnt and tested.
            random.Random(config.seed).shuffle(files)
            held = set(files[:max(1, round(len(files) * config.validation_fraction))])
            validation = [c for c in train if c.audio in held]
            train = [c for c in train if c.audio not in held]
    report.rows_usable = len({c.audio for c in train}) + (0 if config.validation_path
                                                          else len({c.audio for c in validation}))
    report.validation_rows = len(validation)
    report.validation_from_files = bool(config.validation_path)
    return report, train, validation


def inspect_data(config: SpeechConfig) -> DataReport:
    """The data check the UI and CLI show before training: clips, transcripts, problems, durations."""
    report, train, validation = load_clips(config, keep_audio=False)
    report.preview = [{"audio": c.audio, "name": report.shown(c.audio), "text": c.text,
                       "seconds": round(c.seconds, 2),
                       **({"start": round(c.start, 2), "part": c.source} if c.source != Path(c.audio).name else {})}
                      for c in (train + validation)[:20]]
    stats = report.stats
    for key in ("sample_rates", "channels", "encodings"):
        if key in stats:
            stats[key] = dict(stats[key])
    clips = train + validation
    if clips:
        from pipelines.speech.model import unusable_base
        report.base_model_unusable(unusable_base(config.base_model))
        durations = [round(c.seconds, 2) for c in clips]
        tokens = [c.tokens for c in clips]
        stats.update({"clips": len(clips), "train_clips": len(train), "validation_clips": len(validation),
                      "seconds_min": min(durations),
                      "seconds_mean": round(statistics.mean(durations), 2), "seconds_max": max(durations),
                      "tokens_max": max(tokens), "tokens_mean": round(statistics.mean(tokens), 1),
                      "durations": durations})
        # The training files' audio (sample rates are counted over these), and a validation upload's on its own
        training_files = train if report.validation_from_files else clips
        stats["total_seconds"] = round(sum(c.seconds for c in training_files), 1)
        if report.validation_from_files:
            stats["validation_seconds"] = round(sum(c.seconds for c in validation), 1)
    return report
