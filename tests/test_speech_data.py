"""The speech data check on real files: every kind of bad audio gets its own message, usable audio in
other formats and rates is converted, and nothing a user uploads makes it raise."""

from __future__ import annotations

import csv
import shutil
import struct
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile

from pipelines import load_config
from pipelines.speech.audio import SAMPLE_RATE, read_audio
from pipelines.speech.config import SpeechConfig
from pipelines.speech.data import inspect_data, load_clips

ROOT = Path(__file__).resolve().parent.parent
CLIPS = ROOT / "assets" / "speech" / "clips"


def write_metadata(folder: Path, rows: list[tuple[str, str]]) -> None:
    with open(folder / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "transcription"])
        writer.writerows(rows)


def wav_header(format_tag: int, data: bytes, rate: int = SAMPLE_RATE) -> bytes:
    fmt = struct.pack("<HHIIHH", format_tag, 1, rate, rate * 2, 2, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def speech(name: str = "cat.wav") -> np.ndarray:
    return soundfile.read(CLIPS / name, dtype="float32")[0]


def config(**values) -> SpeechConfig:
    return SpeechConfig(**{"validation_fraction": 0.0, **values})


def reasons(report) -> dict[str, str]:
    return {p.file: p.reason for p in report.problems}


@pytest.fixture(scope="module")
def messy(tmp_path_factory) -> Path:
    """A folder with two good clips and one of every problem the data check must name."""
    folder = tmp_path_factory.mktemp("messy")
    shutil.copy(CLIPS / "cat.wav", folder / "good.wav")
    shutil.copy(CLIPS / "window.wav", folder / "untranscribed.wav")
    (folder / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    (folder / "empty.wav").write_bytes(b"")
    (folder / "nosamples.wav").write_bytes(wav_header(1, b""))
    soundfile.write(folder / "silence.wav", np.zeros(3 * SAMPLE_RATE, dtype=np.float32), SAMPLE_RATE)
    # 32 s of speech: the same sentence again and again with short pauses, well over Whisper's 30 s.
    pause = np.zeros(SAMPLE_RATE // 2, dtype=np.float32)
    soundfile.write(folder / "long.wav", np.concatenate([speech(), pause] * 15)[:32 * SAMPLE_RATE], SAMPLE_RATE)
    (folder / "garbage.mp3").write_bytes(np.random.default_rng(0).bytes(20_000))
    (folder / "strange_codec.wav").write_bytes(wav_header(0x9999, bytes(3200)))
    # 8-bit, 48 kHz, stereo: converted, not rejected. And an Ogg Vorbis file, decoded by ffmpeg.
    subprocess.run(["sox", str(CLIPS / "bridge.wav"), "-r", "48000", "-c", "2", "-b", "8", "-e", "unsigned-integer",
                    str(folder / "eightbit.wav")], check=True)
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(CLIPS / "apples.wav"), "-c:a", "libvorbis",
                    str(folder / "apples.ogg")], check=True)
    shutil.copy(CLIPS / "violin.wav", folder / "blank.wav")
    shutil.copy(CLIPS / "umbrella.wav", folder / "special.wav")
    write_metadata(folder, [
        ("good.wav", "The cat sat on the mat."), ("photo.png", "a photo"), ("empty.wav", "nothing"),
        ("nosamples.wav", "nothing"), ("silence.wav", "nothing at all"), ("long.wav", "The cat sat on the mat. " * 15),
        ("garbage.mp3", "noise"), ("strange_codec.wav", "what codec"), ("eightbit.wav", "Turn left at the bridge."),
        ("apples.ogg", "Seven green apples."), ("blank.wav", "   "), ("ghost.wav", "I am not there"),
        ("special.wav", "Type <|endoftext|> to stop."),  # special-token text is plain text, not a crash
    ])
    return folder


def test_every_bad_file_gets_its_own_message(messy):
    report = inspect_data(config(data_path=str(messy)))
    found = reasons(report)
    assert "not an audio file (.png)" in found["photo.png"]
    assert "empty (0 bytes)" in found["empty.wav"]
    assert "no audio (0 seconds" in found["nosamples.wav"]
    assert "silent" in found["silence.wav"]
    assert "32.0 s long" in found["long.wav"] and "at most 30 s" in found["long.wav"]
    assert "not an audio file ffmpeg can read" in found["garbage.mp3"]
    assert "codec is unknown" in found["strange_codec.wav"]
    assert "has no transcript" in found["untranscribed.wav"]
    by_row = {p.row: p.reason for p in report.problems if p.file == "metadata.csv"}
    assert by_row[3] == "names 'photo.png', which is not an audio file"  # (rows as a spreadsheet numbers them)
    assert "transcript of blank.wav is empty" in by_row[12]
    assert "'ghost.wav', which is not among the audio files" in by_row[13]
    # Usable: the good clip, the converted 8-bit/48 kHz/stereo file, the Ogg file, the odd transcript.
    assert report.rows_usable == 4
    assert sorted(Path(p["audio"]).name for p in report.preview) == ["apples.ogg", "eightbit.wav", "good.wav",
                                                                     "special.wav"]
    assert report.summary() == "4 of 14 clips usable (metadata.csv); 10 clips dropped"
    assert not any(name in found for name in ("eightbit.wav", "apples.ogg", "good.wav"))


def test_converted_audio_is_reported_and_resampled(messy):
    report = inspect_data(config(data_path=str(messy)))
    assert report.stats["sample_rates"]["48000"] == 1
    assert report.stats["channels"]["2"] == 1
    assert any(line.startswith("eightbit.wav: 48000 Hz stereo pcm_u8") for line in report.stats["converted"])
    original, converted = read_audio(CLIPS / "bridge.wav"), read_audio(messy / "eightbit.wav")
    assert converted.source_rate == 48000 and converted.channels == 2
    assert abs(len(converted.samples) - len(original.samples)) < SAMPLE_RATE // 100  # same length at 16 kHz
    # Still the same speech after 8-bit quantisation: strongly correlated with the original.
    n = min(len(original.samples), len(converted.samples))
    assert np.corrcoef(original.samples[:n], converted.samples[:n])[0, 1] > 0.9


def test_long_clips_can_be_split_with_a_clear_message(messy):
    report, train, _ = load_clips(config(data_path=str(messy), long_clips="split"), keep_audio=True)
    assert "split into 2 pieces" in reasons(report)["long.wav"]
    pieces = [c for c in train if Path(c.audio).name == "long.wav"]
    assert len(pieces) == 2 and all(c.seconds <= 30.0 for c in pieces)
    assert abs(sum(c.seconds for c in pieces) - 32.0) < 0.01
    assert " ".join(c.text for c in pieces).split() == ("The cat sat on the mat. " * 15).split()
    assert pieces[1].source == "long.wav, part 2 of 2" and pieces[1].start == pytest.approx(pieces[0].seconds)


def test_a_recording_too_long_to_split_is_not_told_to_split(tmp_path):
    """An 11-minute recording was told to 'set long clips to split', and split then refused it (only recordings
    up to 10 minutes are split)."""
    tone = 0.1 * np.sin(2 * np.pi * 220 * np.arange(11 * 60 * SAMPLE_RATE) / SAMPLE_RATE)
    soundfile.write(tmp_path / "lecture.wav", tone.astype(np.float32), SAMPLE_RATE)
    (tmp_path / "lecture.txt").write_text("A long lecture.")
    told = {mode: reasons(inspect_data(config(data_path=str(tmp_path), long_clips=mode)))["lecture.wav"]
            for mode in ("reject", "split")}
    assert told["reject"] == "is 660.0 s long, and Whisper hears at most 30 s at a time: cut it into shorter clips"
    assert told["split"].endswith("only recordings up to 10 minutes are split: cut it into clips of up to 30 s")


def test_zip_with_escaping_entries_is_unpacked_safely(tmp_path):
    archive = tmp_path / "upload.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(CLIPS / "cat.wav", "clips/cat.wav")
        zf.writestr("clips/metadata.csv", "file_name,transcription\ncat.wav,The cat sat on the mat.\n")
        zf.writestr("../escape.wav", (CLIPS / "cat.wav").read_bytes())
        zf.writestr("/etc/absolute.wav", b"x")
    report = inspect_data(config(data_path=str(archive)))
    problems = [str(p) for p in report.problems]
    assert any("'../escape.wav' skipped" in p and "climbs out" in p for p in problems)
    assert any("absolute path" in p for p in problems)
    assert report.rows_usable == 1 and report.preview[0]["text"] == "The cat sat on the mat."
    assert not (tmp_path / "escape.wav").exists() and not (tmp_path.parent / "escape.wav").exists()
    # Checking the same zip again reuses the unpacked files and repeats the same problems.
    again = inspect_data(config(data_path=str(archive)))
    assert [str(p) for p in again.problems] == problems and again.rows_usable == 1


class NoUtf8Flag(zipfile.ZipInfo):
    """An entry named in UTF-8 bytes without the zip's UTF-8 flag, as Linux's and macOS's `zip` write it."""

    def _encodeFilenameFlags(self):
        return self.filename.encode("utf-8"), self.flag_bits


def test_a_zip_from_linux_zip_keeps_its_non_ascii_names(tmp_path):
    """`zip -r` on Linux writes UTF-8 names without the UTF-8 flag: read as DOS's cp437, the clip became
    'caf├⌐ t├½st Γÿò 9.wav', with no transcript, and its metadata.csv row found no clip."""
    archive = tmp_path / "all.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(NoUtf8Flag("fmt/café tëst ☕ 9.wav"), (CLIPS / "cat.wav").read_bytes())
        zf.writestr(NoUtf8Flag("fmt/metadata.csv"), "file_name,transcription\ncafé tëst ☕ 9.wav,The cat sat.\n")
    with zipfile.ZipFile(archive) as zf:  # (as a Linux zip is: no flag, read by zipfile as cp437)
        assert not zf.infolist()[0].flag_bits & 0x800 and zf.namelist()[0] != "fmt/café tëst ☕ 9.wav"
    report = inspect_data(config(data_path=str(archive)))
    assert report.problems == [] and report.rows_usable == 1
    assert report.preview[0]["text"] == "The cat sat." and report.preview[0]["name"] == "café tëst ☕ 9.wav"


def test_uploaded_files_and_txt_transcripts(tmp_path):
    # The browser puts each upload in its own folder: clips are matched to metadata rows by file name.
    uploads = []
    for i, name in enumerate(["cat.wav", "window.wav"]):
        folder = tmp_path / f"upload{i}"
        folder.mkdir()
        uploads.append(str(shutil.copy(CLIPS / name, folder / name)))
    (tmp_path / "meta").mkdir()
    write_metadata(tmp_path / "meta", [("cat.wav", "The cat sat on the mat.")])
    (tmp_path / "upload1" / "window.txt").write_text("Open the window, please.\n")
    report = inspect_data(config(data_files=uploads + [str(tmp_path / "meta" / "metadata.csv"),
                                                       str(tmp_path / "upload1" / "window.txt")]))
    assert report.problems == [] and report.rows_usable == 2
    assert {p["text"] for p in report.preview} == {"The cat sat on the mat.", "Open the window, please."}


def test_missing_paths_and_bad_tables_never_raise(tmp_path):
    report = inspect_data(config(data_path=str(tmp_path / "nowhere")))
    assert not report.ok and "was not found" in report.summary()
    (tmp_path / "clip.wav").write_bytes((CLIPS / "cat.wav").read_bytes())
    (tmp_path / "metadata.csv").write_text("name,words\nclip.wav,hello\n")
    report = inspect_data(config(data_path=str(tmp_path)))
    assert "needs a column naming the audio file" in reasons(report)["metadata.csv"]
    assert "has no transcript" in reasons(report)["clip.wav"]


def test_validation_split_and_asset_config():
    cfg = load_config(ROOT / "assets" / "speech" / "config.yaml")
    report = inspect_data(cfg)
    assert report.problems == [] and report.rows_usable == 8 and report.stats["total_seconds"] > 10
    report = inspect_data(cfg.changed(validation_fraction=0.25))
    assert report.validation_rows == 2 and report.stats["train_clips"] == 6


def test_decoding_matches_openai_whisper_sample_for_sample(tmp_path):
    """The studio hears a clip exactly as plain openai-whisper does, whatever the format."""
    import whisper
    made = {"u8.wav": ["sox", str(CLIPS / "cat.wav"), "-b", "8", "-e", "unsigned-integer"],
            "stereo44k.flac": ["sox", str(CLIPS / "cat.wav"), "-r", "44100", "-c", "2"],
            "clip.mp3": ["ffmpeg", "-nostdin", "-v", "error", "-i", str(CLIPS / "cat.wav")]}
    for name, command in made.items():
        subprocess.run(command + [str(tmp_path / name)], check=True)
    for name in [CLIPS / "cat.wav"] + [tmp_path / n for n in made]:
        assert np.array_equal(read_audio(name).samples, whisper.load_audio(str(name))), name


def test_the_tab_names_files_inside_the_zip_and_says_what_it_converted(tmp_path):
    """Two speakers' 001.wav are told apart by their folder in the zip, a table's problem keeps its row, and the
    summary lists the sample rates and what was converted (computed before, and shown nowhere)."""
    import dataclasses
    from studio.tabs import speech as tab
    archive = tmp_path / "speakers.zip"
    loud = tmp_path / "loud.wav"
    subprocess.run(["sox", str(CLIPS / "cat.wav"), "-r", "48000", "-c", "2", str(loud)], check=True)
    silent = tmp_path / "silent.wav"
    soundfile.write(silent, np.zeros(2 * SAMPLE_RATE, dtype=np.float32), SAMPLE_RATE)
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(loud, "speakers/anna/001.wav")
        zf.write(silent, "speakers/ben/001.wav")
        zf.writestr("speakers/metadata.csv", "file_name,transcription\nanna/001.wav,The cat sat on the mat.\n"
                                             "ben/001.wav,Nothing.\nben/002.wav,Not there.\n")
    settings = dataclasses.asdict(config())
    summary, problems, preview, *_ = tab.check_data([str(archive)], None, None, "tiny-whisper", "",
                                                    *[settings[key] for key in tab.FORM])
    rows = problems["value"].to_dict("records")
    assert rows[0] == {"file": "metadata.csv", "row": 4, "problem": "names 'ben/002.wav', which is not among the "
                                                                   "audio files"}
    assert rows[1]["file"] == "ben/001.wav" and rows[1]["problem"].startswith("is silent") and rows[1]["row"] == ""
    assert "Sample rates: 48000 Hz (1)." in summary  # of the clips that train (the silent one was counted too)
    assert "Converted for Whisper:\n- anna/001.wav: 48000 Hz stereo" in summary
    assert preview["value"].to_dict("records")[0]["clip"] == "anna/001.wav"


def test_a_row_naming_a_clip_two_folders_have_names_both(tmp_path):
    """It said the clip 'is not among the audio files', while both were there."""
    for speaker in ("anna", "ben"):
        (tmp_path / speaker).mkdir()
        shutil.copy(CLIPS / "cat.wav", tmp_path / speaker / "001.wav")
    write_metadata(tmp_path, [("001.wav", "The cat sat on the mat.")])
    found = {(p.file, p.row): p.reason for p in inspect_data(config(data_path=str(tmp_path))).problems}
    assert found[("metadata.csv", 2)] == ("names '001.wav', which matches 2 files (anna/001.wav, ben/001.wav): "
                                          "name it by its path in the folder")


def test_an_unreadable_transcript_is_named_once_and_the_user_s_table_by_its_name(tmp_path):
    shutil.copy(CLIPS / "cat.wav", tmp_path / "good.wav")
    shutil.copy(CLIPS / "window.wav", tmp_path / "bad.wav")
    (tmp_path / "bad.txt").write_bytes("こんにちは。".encode("shift_jis"))  # (Windows-1252 would be read)
    shutil.copy(CLIPS / "apples.wav", tmp_path / "lone.wav")
    (tmp_path / "cv.csv").write_text("file_name,transcription\ngood.wav,The cat sat on the mat.\n")
    found = reasons(inspect_data(config(data_path=str(tmp_path))))
    assert found["bad.txt"] == "is not UTF-8 text (byte 0x82 at position 0); save it as UTF-8 and upload again"
    assert "bad.wav" not in found  # it was also said to have no transcript, beside the .txt it has
    assert found["lone.wav"] == "has no transcript: add a row for it to cv.csv (file_name, transcription) or a " \
                                "lone.txt beside it"


def test_a_transcript_saved_as_windows_1252_is_read_and_said_so(tmp_path):
    """Notepad's 'ANSI' on Western-European Windows: the clip was dropped, 'is not UTF-8 text'."""
    shutil.copy(CLIPS / "cat.wav", tmp_path / "cat.wav")
    (tmp_path / "cat.txt").write_bytes("Le chat s’est assis, café à la main.".encode("cp1252"))
    report = inspect_data(config(data_path=str(tmp_path)))
    assert report.rows_usable == 1 and report.preview[0]["text"] == "Le chat s’est assis, café à la main."
    assert reasons(report)["cat.txt"].startswith("is not UTF-8: read as Windows-1252")


def test_checks_of_one_new_zip_at_once_each_see_every_clip(tmp_path, monkeypatch):
    """Load config fills a tab's two boxes, and two data checks unpack the same new zip at once: in one
    temporary folder, one deleted the other's files ('[Errno 2] No such file', a clip lost)."""
    from concurrent.futures import ThreadPoolExecutor
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "ws"))
    archive = shutil.make_archive(str(tmp_path / "clips"), "zip", CLIPS)
    with ThreadPoolExecutor(4) as pool:
        reports = list(pool.map(lambda _: inspect_data(config(data_files=[archive])), range(4)))
    assert [(r.rows_usable, r.problems) for r in reports] == [(8, [])] * 4


def test_the_summary_tells_the_validation_upload_s_audio_from_the_training_audio(tmp_path):
    """'Total audio' counted a validation upload's clips while 'Sample rates' counted the training files' only."""
    import dataclasses
    from studio.tabs import speech as tab
    held = tmp_path / "held"
    held.mkdir()
    subprocess.run(["sox", str(CLIPS / "cat.wav"), "-r", "48000", str(held / "cat.wav")], check=True)
    (held / "cat.txt").write_text("The cat sat on the mat.")
    settings = dataclasses.asdict(config())
    files = [str(CLIPS / n) for n in ("window.wav", "apples.wav", "metadata.csv")]
    summary, *_ = tab.check_data(files, None, [str(held)], "tiny-whisper", "", *[settings[key] for key in tab.FORM])
    seconds = {c.audio.split("/")[-1]: c.seconds for c in load_clips(config(data_path=str(CLIPS)))[1]}
    training, validation = seconds["window.wav"] + seconds["apples.wav"], seconds["cat.wav"]
    assert f"Total audio: {training:.1f} s, plus {validation:.1f} s to validate on. Sample rates: 16000 Hz (2)." \
        in summary


def test_a_base_model_that_cannot_be_loaded_stops_train_before_a_run(tmp_path, monkeypatch):
    """The Language tab refused such a model; the Speech tab made a run that failed on loading it."""
    from pipelines.speech.model import materialise_preset
    monkeypatch.setenv("STUDIO_MODEL_DIRS", str(tmp_path))
    data = materialise_preset("tiny-whisper").read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[:len(data) // 2])
    assert inspect_data(config(data_path=str(CLIPS))).ok
    report = inspect_data(config(data_path=str(CLIPS), base_model=str(cut)))
    assert not report.ok and report.rows_usable == 8
    assert report.blocker == (f"the base model cannot be used: {cut} could not be read as an openai-whisper "
                              "checkpoint (it is not a complete torch file). Choose a .pt file saved by "
                              "openai-whisper or exported by the studio.")
    # Another torch file (what a Hugging Face pytorch_model.bin renamed to .pt is) passed, and its run failed on
    # loading it: "could not be read as an openai-whisper checkpoint ('dims')".
    import torch
    torch.save({"foo": 1}, tmp_path / "wrong.pt")
    torch.save({"model.encoder.conv1.weight": torch.zeros(2)}, tmp_path / "hf.pt")
    for name in ("wrong.pt", "hf.pt"):
        report = inspect_data(config(data_path=str(CLIPS), base_model=str(tmp_path / name)))
        assert not report.ok and report.rows_usable == 8
        assert report.blocker == (f"the base model cannot be used: {tmp_path / name} is a torch file but not an "
                                  "openai-whisper checkpoint: it has no 'dims' and no 'model_state_dict', which "
                                  "openai-whisper's checkpoints hold (Hugging Face transformers Whisper weights are "
                                  "not supported here). Choose a .pt file saved by openai-whisper or exported by the "
                                  "studio.")
    shutil.copy(materialise_preset("tiny-whisper"), tmp_path / "mine.pt")  # a real one still passes
    assert inspect_data(config(data_path=str(CLIPS), base_model=str(tmp_path / "mine.pt"))).ok


def test_a_table_finds_its_clips_whatever_the_case_and_unicode_form_of_their_names(tmp_path):
    """A metadata.csv typed by hand names recording1.wav for the file Recording1.WAV, or café.wav in the form a
    keyboard types for the name macOS saved in another (e, then the accent): each was 'not among the audio
    files', and its clip 'has no transcript'."""
    import unicodedata
    shutil.copy(CLIPS / "cat.wav", tmp_path / "Recording1.WAV")
    shutil.copy(CLIPS / "window.wav", tmp_path / unicodedata.normalize("NFD", "café.wav"))
    (tmp_path / "metadata.csv").write_text("file_name,transcription\nrecording1.wav,The cat sat on the mat.\n"
                                           + unicodedata.normalize("NFC", "café.wav") + ",Open the window please.\n")
    report = inspect_data(SpeechConfig(data_path=str(tmp_path), validation_fraction=0))
    assert (report.rows_found, report.rows_usable, report.problems) == (2, 2, [])


def test_ljspeech_layout_is_read(tmp_path):
    """LJSpeech's metadata.csv has no header row and `id|transcription|normalized` lines whose text holds
    commas: it was refused ('the header row has empty or repeated column names'), and every clip then said to
    add the row it has."""
    (tmp_path / "LJSpeech-1.1" / "wavs").mkdir(parents=True)
    lines = []
    for n, (clip, text) in enumerate([("cat.wav", "The cat sat on the mat."),
                                      ("window.wav", "Open the window, please.")], start=1):
        shutil.copy(CLIPS / clip, tmp_path / "LJSpeech-1.1" / "wavs" / f"LJ001-000{n}.wav")
        lines.append(f"LJ001-000{n}|{text}|{text}")
    lines.insert(0, "LJ001-0000|A clip cut from this copy of the data set.|A clip cut from this copy of the data set.")
    (tmp_path / "LJSpeech-1.1" / "metadata.csv").write_text("\n".join(lines) + "\n")
    report = inspect_data(SpeechConfig(data_path=str(tmp_path / "LJSpeech-1.1"), validation_fraction=0))
    assert (report.rows_found, report.rows_usable) == (3, 2)  # (the row whose clip is missing counts as found)
    assert [p.reason for p in report.problems] == [
        "read as LJSpeech's layout: no header, clip id|transcription|normalized on each line",
        "names 'LJ001-0000', which is not among the audio files"]
    assert [(p["name"], p["text"]) for p in report.preview] == [("wavs/LJ001-0001.wav", "The cat sat on the mat."),
                                                                ("wavs/LJ001-0002.wav", "Open the window, please.")]



def test_a_transcript_file_pairs_with_its_clip_whatever_the_case_of_its_name(tmp_path):
    """Clip1.txt beside clip1.wav was neither used nor reported (a metadata table's rows had just learnt to
    match names whatever their case; a transcript file's pairing had not)."""
    shutil.copy(CLIPS / "cat.wav", tmp_path / "clip1.wav")
    (tmp_path / "Clip1.txt").write_text("The cat sat on the mat.")
    report = inspect_data(SpeechConfig(data_path=str(tmp_path), validation_fraction=0))
    assert (report.rows_usable, report.problems) == (1, [])


def test_what_phones_and_meeting_tools_save_is_read_and_a_silent_video_is_named(tmp_path):
    """A video's sound track (a meeting's .mp4), an Android .3gp and an Apple .aiff were "not an audio file"."""
    ffmpeg = ["ffmpeg", "-nostdin", "-v", "error"]
    picture = ["-f", "lavfi", "-i", "color=c=blue:s=64x48:r=5:d=2"]
    subprocess.run(ffmpeg + picture + ["-i", str(CLIPS / "cat.wav"), "-shortest", "-c:v", "mpeg4", "-c:a", "aac",
                                       str(tmp_path / "meeting.mp4")], check=True)
    subprocess.run(ffmpeg + ["-i", str(CLIPS / "window.wav"), str(tmp_path / "memo.aiff")], check=True)
    subprocess.run(ffmpeg + ["-i", str(CLIPS / "bridge.wav"), "-ar", "8000", "-c:a", "aac",
                             str(tmp_path / "call.3gp")], check=True)
    subprocess.run(ffmpeg + picture + ["-c:v", "mpeg4", str(tmp_path / "no_sound.mov")], check=True)
    write_metadata(tmp_path, [("meeting.mp4", "The cat sat on the mat."), ("memo.aiff", "Open the window, please."),
                              ("call.3gp", "Turn left at the bridge."), ("no_sound.mov", "nothing to hear")])
    report = inspect_data(config(data_path=str(tmp_path)))
    assert reasons(report) == {"no_sound.mov": "it has no audio track"}
    assert report.rows_usable == 3
    heard = read_audio(tmp_path / "meeting.mp4").samples
    assert abs(len(heard) - len(speech())) < SAMPLE_RATE // 10  # the sound track, not the picture's 2 s


def test_a_run_keeps_the_names_its_transcript_table_gives_its_clips(tmp_path, monkeypatch):
    """The run's copy of the data renamed 'clip (1).wav' to 'clip _1_.wav': the check said 4 of 4 clips usable and
    the run trained on 2, saying so only in its log."""
    from studio.runs import Registry
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "ws"))
    names = ["clip (1).wav", "John's take #2.wav", "café tëst ☕.wav", "plain.wav"]
    uploads = []
    for i, (name, source) in enumerate(zip(names, ["cat.wav", "window.wav", "bridge.wav", "apples.wav"])):
        (tmp_path / f"upload{i}").mkdir()  # as the browser's uploads arrive: each in a folder of its own
        uploads.append(str(shutil.copy(CLIPS / source, tmp_path / f"upload{i}" / name)))
    (tmp_path / "meta").mkdir()
    write_metadata(tmp_path / "meta", [(name, f"Transcript {i}.") for i, name in enumerate(names)])
    settings = config(data_files=uploads + [str(tmp_path / "meta" / "metadata.csv")])
    assert inspect_data(settings).rows_usable == 4

    run = Registry().create(settings, status="stopped")
    report, train, _ = load_clips(load_config(run.dir / "config.yaml"), keep_audio=False)
    assert report.rows_usable == 4 and sorted(Path(clip.audio).name for clip in train) == sorted(names)


def test_a_common_voice_release_trains_on_its_train_split_and_validates_on_dev(tmp_path):
    """Every table of a Common Voice folder was read as transcripts alike: the test split and the clips its
    reviewers had rejected were trained on, the dev split was not the validation data, and validated.tsv named
    each training clip a second time (a problem line per clip)."""
    (tmp_path / "clips").mkdir()
    splits = {"train": ["cat", "window", "bridge"], "dev": ["apples"], "test": ["umbrella"], "invalidated": ["violin"]}
    for clips in splits.values():
        for name in clips:
            shutil.copy(CLIPS / f"{name}.wav", tmp_path / "clips" / f"common_voice_{name}.wav")

    def tsv(name: str, clips: list[str]) -> None:
        rows = ["client_id\tpath\tsentence_id\tsentence\tup_votes"] + [
            f"c{i}\tcommon_voice_{clip}.wav\ts{i}\tWhat {clip} says.\t2" for i, clip in enumerate(clips)]
        (tmp_path / f"{name}.tsv").write_text("\n".join(rows) + "\n")
    for split, clips in splits.items():
        tsv(split, clips)
    tsv("validated", splits["train"] + splits["dev"] + splits["test"])
    tsv("other", [])
    (tmp_path / "clip_durations.tsv").write_text("clip\tduration[ms]\ncommon_voice_cat.wav\t1500\n")

    report, train, validation = load_clips(config(data_path=str(tmp_path), validation_fraction=0.1),
                                           keep_audio=False)
    assert sorted(Path(c.audio).stem for c in train) == ["common_voice_bridge", "common_voice_cat",
                                                          "common_voice_window"]
    assert [Path(c.audio).stem for c in validation] == ["common_voice_apples"]
    assert {p.file: p.reason for p in report.problems if not p.kept} == {}
    notes = {p.file: p.reason for p in report.problems if p.kept}
    assert notes["test.tsv"] == "the test split: not trained on, kept for testing the tuned model (1 clip)"
    assert notes["invalidated.tsv"].startswith("clips marked invalid") and notes["dev.tsv"].endswith("(1 clip)")
    assert "validated.tsv" in notes and "clip_durations.tsv" in notes


def test_a_clip_changed_since_the_last_check_is_heard_again(tmp_path):
    """What the check heard is kept between checks (each setting the tab watches starts one, and decoding every
    clip again took minutes): a clip replaced since is decoded again, not taken for the one before."""
    for name in ("cat", "window"):
        shutil.copy(CLIPS / f"{name}.wav", tmp_path / f"{name}.wav")
    write_metadata(tmp_path, [("cat.wav", "The cat sat on the mat."), ("window.wav", "Open the window, please.")])
    assert inspect_data(config(data_path=str(tmp_path))).rows_usable == 2
    assert inspect_data(config(data_path=str(tmp_path), validation_fraction=0.5)).rows_usable == 2
    soundfile.write(tmp_path / "cat.wav", np.zeros(2 * SAMPLE_RATE, dtype=np.float32), SAMPLE_RATE)
    report = inspect_data(config(data_path=str(tmp_path)))
    assert report.rows_usable == 1 and "silent" in reasons(report)["cat.wav"]


def test_speech_recorded_quietly_is_kept_and_silence_is_not(tmp_path):
    """A clip recorded 40 dB too quietly (its loudest 25 ms at -55 dBFS) was refused as silent; Whisper hears it."""
    cat = speech("cat.wav")
    soundfile.write(tmp_path / "quiet.wav", cat * 0.01, SAMPLE_RATE)
    soundfile.write(tmp_path / "hiss.wav", cat * 0.0001, SAMPLE_RATE)  # -95 dBFS: nothing to hear
    write_metadata(tmp_path, [("quiet.wav", "The cat sat on the mat."), ("hiss.wav", "The cat sat on the mat.")])
    report = inspect_data(config(data_path=str(tmp_path)))
    assert report.rows_usable == 1 and list(reasons(report)) == ["hiss.wav"]
    assert "is silent" in reasons(report)["hiss.wav"]


@pytest.mark.parametrize("layout", ["txt beside each clip", "one table at the top", "a table per folder"])
def test_train_validation_and_test_folders_train_on_the_train_split_only(tmp_path, layout):
    """train/ validation/ test/ folders were read as splits only with a metadata.csv in each: with .txt
    transcripts, or one metadata.csv at the top naming 'test/...' (Hugging Face's audiofolder), the test
    clips were trained on and the validation clips were not the validation data."""
    splits = {"train": ["cat", "window", "bridge"], "validation": ["apples"], "test": ["umbrella", "violin"]}
    rows = {split: [] for split in splits}
    for split, names in splits.items():
        (tmp_path / split).mkdir()
        for name in names:
            shutil.copy(CLIPS / f"{name}.wav", tmp_path / split / f"{name}.wav")
            if layout == "txt beside each clip":
                (tmp_path / split / f"{name}.txt").write_text(f"What {name} says.")
            rows[split].append((f"{split}/{name}.wav" if layout == "one table at the top" else f"{name}.wav",
                                f"What {name} says."))
        if layout == "a table per folder":
            write_metadata(tmp_path / split, rows[split])
    if layout == "one table at the top":
        write_metadata(tmp_path, [row for split_rows in rows.values() for row in split_rows])

    report, train, validation = load_clips(config(data_path=str(tmp_path), validation_fraction=0.1),
                                           keep_audio=False)
    assert sorted(Path(c.audio).stem for c in train) == ["bridge", "cat", "window"]
    assert [Path(c.audio).stem for c in validation] == ["apples"]
    assert [p for p in report.problems if not p.kept] == []
    assert {p.file: p.reason for p in report.problems if p.kept} == {
        "test": "the test split: not trained on, kept for testing the tuned model (2 clips)",
        "validation": "the dev split: the validation data (1 clip)"}
    assert report.summary().startswith("4 of 4 clips usable") and "1 held out for validation" in report.summary()

    # Validation data of their own: the validation folder is left out, as Common Voice's dev.tsv is.
    held = tmp_path.parent / f"{tmp_path.name}-held"
    held.mkdir()
    shutil.copy(CLIPS / "battery.wav", held / "battery.wav")
    (held / "battery.txt").write_text("The battery is low.")
    report, train, validation = load_clips(config(data_path=str(tmp_path), validation_path=[str(held)]),
                                           keep_audio=False)
    assert sorted(Path(c.audio).stem for c in train) == ["bridge", "cat", "window"]
    assert [Path(c.audio).stem for c in validation] == ["battery"]
    assert {p.file: p.reason for p in report.problems} == {
        "test": "the test split: not trained on, kept for testing the tuned model (2 clips)",
        "validation": "the dev split: not trained on (the validation data uploaded is used instead) (1 clip)"}


def test_validation_clips_given_as_files_with_their_table_are_the_validation_data(tmp_path, monkeypatch):
    """The speech tab's validation box took one zip: clips and their metadata.csv uploaded as files could not be
    given (the first file alone was read, with no transcript), nor a list of them in a config for studio train."""
    import dataclasses
    import yaml
    from pipelines.data import Problem
    from studio.runs import Registry
    from studio.tabs import speech as tab
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "ws"))
    held = tmp_path / "held, take 2"
    held.mkdir()
    for name in ("battery", "meeting"):
        shutil.copy(CLIPS / f"{name}.wav", held / f"{name}.wav")
    write_metadata(held, [("battery.wav", "The battery is low."), ("meeting.wav", "The meeting starts at nine."),
                          ("lost.wav", "Not uploaded.")])
    # As the browser uploads them: each file in a folder of its own, the training data's metadata.csv a second.
    uploads = []
    for i, path in enumerate(sorted(held.iterdir())):
        (tmp_path / f"upload{i}").mkdir()
        uploads.append(str(shutil.copy(path, tmp_path / f"upload{i}" / path.name)))
    settings = dataclasses.asdict(config())
    form = ["tiny-whisper", "", *[settings[key] for key in tab.FORM]]
    training = [str(p) for p in sorted(CLIPS.iterdir())]
    summary, *_ = tab.check_data(training, None, uploads, *form)
    assert summary.startswith("**Data:** 8 of 8 clips usable (metadata.csv), plus 2 for validation from the "
                              "validation data\n")
    seconds = sum(soundfile.info(held / f"{name}.wav").duration for name in ("battery", "meeting"))
    assert f" s, plus {seconds:.1f} s to validate on." in summary
    report = inspect_data(SpeechConfig.from_dict(tab.FORM_SPEC.values(training, None, uploads, *form)))
    assert report.problems == [Problem("validation data: metadata.csv", "names 'lost.wav', which is not among the "
                                                                        "audio files", 4)]

    # studio train --config: a list of files, or a folder, as the training data may be given (a config saved
    # before, with one folder or zip, names that one, commas and all).
    for validation in ([f"{held.name}/battery.wav", f"{held.name}/meeting.wav", f"{held.name}/metadata.csv"],
                       held.name):
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(
            {"modality": "speech", "data_path": str(CLIPS), "validation_path": validation}))
        settings = load_config(tmp_path / "config.yaml")
        report, train, validation_clips = load_clips(settings, keep_audio=False)
        assert (len(train), sorted(Path(c.audio).name for c in validation_clips)) == (8, ["battery.wav", "meeting.wav"])
        run = Registry().create(settings, status="stopped")  # the run's own copy of them validates the same
        _, _, copied = load_clips(load_config(run.dir / "config.yaml"), keep_audio=False)
        assert sorted(Path(c.audio).name for c in copied) == ["battery.wav", "meeting.wav"]
