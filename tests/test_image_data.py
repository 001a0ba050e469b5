"""The image data check: every kind of bad file gets its own message, and what is usable is used.

Every file is built here, in tmp_path, with PIL or by hand: real bytes, no mocks.
"""

import io
import shutil
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines import load_config
from pipelines.config import ConfigError
from pipelines.image.config import ImageConfig
from pipelines.image.data import inspect_data, load_examples, read_image
from pipelines.training import require_data


def square(path: Path, colour=(200, 30, 30), size=(64, 64), caption: str | None = "a red square", **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, **save)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)
    return path


def problems_of(report) -> dict[str, str]:
    return {p.file: p.reason for p in report.problems}


def check(tmp_path: Path, **settings):
    return inspect_data(ImageConfig(data_path=str(tmp_path), **settings))


def bomb_png(path: Path, side: int) -> None:
    """A valid 1-bit PNG of side x side pixels: a few KB on disk, gigabytes once decoded."""
    row = b"\x00" + b"\x00" * ((side + 7) // 8)
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def test_the_sample_set_and_its_config_are_ready(assets):
    config = load_config(assets / "image" / "config.yaml")
    assert isinstance(config, ImageConfig) and Path(config.data_path).is_absolute()
    report = inspect_data(config)
    assert report.rows_found == report.rows_usable == 8 and report.problems == []
    assert report.preview[0]["caption"].startswith("a zqx drawing of")
    assert Path(report.preview[0]["image"]).is_file()
    assert report.stats["width_min"] == 64 and report.stats["caption_sources"] == {"file": 8}


def test_every_broken_file_is_named_with_its_reason(tmp_path):
    square(tmp_path / "good.png")
    (tmp_path / "notes.png").write_text("this is not a picture")
    (tmp_path / "empty.jpg").write_bytes(b"")
    whole = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(whole, "PNG")
    (tmp_path / "cut.png").write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    whole = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(whole, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    bomb_png(tmp_path / "bomb.png", 10_000)
    (tmp_path / "scan.pdf").write_bytes(b"%PDF-1.4")
    (tmp_path / "layers.psd").write_bytes(b"8BPS\x00\x01")
    for name in ("notes", "empty", "cut", "bomb"):
        (tmp_path / f"{name}.txt").write_text("a caption")

    report = check(tmp_path)
    found = problems_of(report)
    assert report.rows_usable == 1 and report.preview[0]["image"].endswith("good.png")
    assert "not an image" in found["notes.png"]
    assert "empty (0 bytes)" in found["empty.jpg"]
    assert "truncated" in found["cut.png"] and "truncated" in found["cut.jpg"]
    assert "100 megapixels" in found["bomb.png"] and "STUDIO_MAX_IMAGE_PIXELS" in found["bomb.png"]
    assert "not an image file" in found["scan.pdf"]
    assert "convert it to PNG or JPEG" in found["layers.psd"]
    assert report.summary() == "1 of 6 images usable; 5 images dropped"


def test_odd_formats_are_converted_with_a_note(tmp_path):
    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(tmp_path / "print.jpg")
    ramp = np.tile(np.linspace(0, 65535, 64), (64, 1)).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    frames = [Image.new("RGB", (64, 64), c) for c in [(0, 200, 0), (200, 0, 0), (0, 0, 200)]]
    frames[0].save(tmp_path / "moving.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    Image.new("RGBA", (64, 64), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    for name in ("print", "deep", "moving", "clear"):
        (tmp_path / f"{name}.txt").write_text(f"a {name} image")

    report = check(tmp_path)
    assert report.rows_usable == 4 and report.problems == []
    notes = " | ".join(report.stats["notes"])
    assert "print.jpg: is a CMYK" in notes
    assert "deep.png: is a 16-bit" in notes
    assert "moving.gif: is animated (3 frames): the first frame is used" in notes
    assert "clear.png: has transparency: filled with white" in notes

    cmyk, _, _ = read_image(tmp_path / "print.jpg")
    assert cmyk.mode == "RGB" and cmyk.getpixel((32, 32))[0] > 200 > cmyk.getpixel((32, 32))[1] + 150
    deep = np.asarray(read_image(tmp_path / "deep.png")[0])
    assert deep[0, 0, 0] == 0 and deep[0, -1, 0] == 255 and 100 < deep[0, 32, 0] < 160  # scaled, not clipped
    first, _, _ = read_image(tmp_path / "moving.gif")
    assert first.getpixel((5, 5))[1] > 150  # the green first frame
    assert read_image(tmp_path / "clear.png")[0].getpixel((5, 5)) == (255, 255, 255)


def test_exif_rotation_is_applied(tmp_path):
    # Stored 40 wide x 20 high, left half red, right half blue; orientation 6 = display turned 90 deg clockwise.
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :20] = (220, 0, 0)
    stored[:, 20:] = (0, 0, 220)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    (tmp_path / "phone.txt").write_text("a phone photo")

    report = check(tmp_path, resolution=16)
    assert report.stats["sizes"] == [[20, 40]] and report.preview[0]["size"] == "20x40"
    assert "phone.jpg: was turned upright following its EXIF orientation" in report.stats["notes"]
    upright = np.asarray(read_image(tmp_path / "phone.jpg")[0]).astype(int)
    assert upright[5, 10, 0] > 150 and upright[5, 10, 2] < 80   # top: the stored left half, red
    assert upright[35, 10, 2] > 150 and upright[35, 10, 0] < 80  # bottom: blue


@pytest.mark.parametrize("suffix", [".heic", ".avif"])
def test_phone_photos_in_heic_and_avif_are_read_upright(tmp_path, suffix):
    """Phones save photos as HEIC (and some apps as AVIF): they were refused with "convert it to PNG or JPEG"."""
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :20] = (220, 0, 0)
    stored[:, 20:] = (0, 0, 220)
    exif = Image.Exif()
    exif[0x0112] = 6  # turned 90 deg clockwise on display, as a phone held upright stores it
    Image.fromarray(stored).save(tmp_path / f"IMG_0001{suffix}", exif=exif.tobytes(), quality=95)
    (tmp_path / "IMG_0001.txt").write_text("a phone photo")

    report = check(tmp_path, resolution=16)
    assert report.rows_usable == 1 and report.preview[0]["size"] == "20x40", report.problems
    upright = np.asarray(read_image(tmp_path / f"IMG_0001{suffix}")[0]).astype(int)
    assert upright[5, 10, 0] > 150 and upright[5, 10, 2] < 80   # top: the stored left half, red
    assert upright[35, 10, 2] > 150 and upright[35, 10, 0] < 80  # bottom: blue


def test_captions_duplicates_and_small_images(tmp_path):
    square(tmp_path / "a.png")
    shutil.copy(tmp_path / "a.png", tmp_path / "copy.png")
    (tmp_path / "copy.txt").write_text("same pixels")
    square(tmp_path / "silent.png", colour=(0, 0, 200), caption=None)
    square(tmp_path / "blank.png", colour=(0, 200, 0), caption="   \n")
    square(tmp_path / "small.png", colour=(9, 9, 9), size=(16, 16), caption="a small one")

    report = check(tmp_path, caption_source="files", resolution=32)
    found = problems_of(report)
    assert "same content as a.png" in found["copy.png"]
    assert "has no caption" in found["silent.png"]
    assert "caption file blank.txt is empty" in found["blank.png"]
    assert "16x16, smaller than the 32 px" in found["small.png"]
    assert sorted(p["caption"] for p in report.preview) == ["a red square", "a small one"]  # small ones still train
    logged = []
    require_data(report, ["the two usable images"], "image", logged.append)  # what a run logs of them
    assert [line for line in logged if "small.png" in line] == [f"Note: small.png: {found['small.png']}"]
    assert sum(line.startswith("Skipped: ") for line in logged) == 3

    with_prompt = check(tmp_path, instance_prompt="a photo of sks thing", resolution=32)
    assert with_prompt.rows_usable == 4  # auto: the instance prompt stands in for missing captions
    assert with_prompt.stats["caption_sources"] == {"file": 2, "instance_prompt": 2}


def test_a_caption_saved_by_notepad_as_ansi_is_read_and_said_so(tmp_path):
    """Windows-1252 ('ANSI' in Notepad): the image was skipped, 'caption file is not UTF-8 text'."""
    square(tmp_path / "cafe.png", caption=None)
    (tmp_path / "cafe.txt").write_bytes("un café crème, très “doux”".encode("cp1252"))
    report = check(tmp_path, resolution=32)
    assert report.rows_usable == 1 and report.preview[0]["caption"] == "un café crème, très “doux”"
    assert [(p.file, p.kept, p.reason.split(",")[0]) for p in report.problems] == [
        ("cafe.txt", True, "is not UTF-8: read as Windows-1252")]


def test_metadata_file_captions(tmp_path):
    square(tmp_path / "one.png", caption=None)
    square(tmp_path / "two.png", colour=(0, 0, 200), caption=None)
    (tmp_path / "metadata.jsonl").write_text(
        '{"file_name": "one.png", "text": "first caption"}\n{"file_name": "two.png", "text": ""}\n'
        '{"file_name": "gone.png", "text": "lost"}\n')
    report = check(tmp_path, caption_source="metadata")
    assert [p["caption"] for p in report.preview] == ["first caption"]
    rows = {p.row: p.reason for p in report.problems if p.file == "metadata.jsonl"}
    assert "is empty" in rows[2] and "'gone.png' is not among the images" in rows[3]
    # With captions taken from .txt files, the metadata file is not silently passed over
    ignored = check(tmp_path, caption_source="files")
    assert ignored.rows_usable == 0 and problems_of(ignored)["metadata.jsonl"] == (
        "not read: the caption source is files; choose auto or metadata to take the captions from it")


def test_an_empty_instance_prompt_is_reported_before_training(tmp_path):
    """As the only caption source it would caption every image with nothing; the run's settings refuse it, so
    the data check does too (else Train is offered and then refused)."""
    square(tmp_path / "one.png")
    report = check(tmp_path, caption_source="instance_prompt", instance_prompt="  ")
    assert report.rows_usable == 0 and problems_of(report) == {
        "instance prompt": "caption source is instance_prompt, but the instance prompt is empty"}
    assert check(tmp_path, caption_source="instance_prompt", instance_prompt="a sks thing").rows_usable == 1


def test_parent_folder_and_kohya_layout_are_found(tmp_path):
    """kohya_ss users point at the parent of the image folder and get 'no data found'; here it just works."""
    square(tmp_path / "train" / "10_sks dog" / "1.png", caption=None)
    square(tmp_path / "train" / "10_sks dog" / "2.png", colour=(0, 90, 0), caption="sks dog on grass")
    report = check(tmp_path)
    assert report.rows_usable == 2
    assert {p["caption"] for p in report.preview} == {"sks dog", "sks dog on grass"}
    notes = " ".join(report.stats["notes"])
    assert "images were found in subfolders: train/10_sks dog (2)" in notes and "repeat count 10" in notes


def test_zip_upload_skips_escaping_entries(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 120, 200)).save(buffer, "PNG")
    archive = tmp_path / "upload.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("shapes/blue.png", buffer.getvalue())
        zf.writestr("shapes/blue.txt", "a blue square")
        zf.writestr("../escape.png", buffer.getvalue())
        zf.writestr("__MACOSX/shapes/._blue.png", b"junk")
    report = inspect_data(ImageConfig(data_path=str(archive)))
    assert report.rows_usable == 1 and report.preview[0]["caption"] == "a blue square"
    assert any("'../escape.png' skipped" in p.reason and "climbs out" in p.reason for p in report.problems)
    assert not (tmp_path.parent / "escape.png").exists()
    # Unpacked once into the workspace and reused, problems included, by the next check and the training run.
    again = inspect_data(ImageConfig(data_path=str(archive)))
    assert again.preview[0]["image"] == report.preview[0]["image"]
    assert [p.reason for p in again.problems] == [p.reason for p in report.problems]

    broken = tmp_path / "broken.zip"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    bad = inspect_data(ImageConfig(data_path=str(broken)))
    assert bad.rows_usable == 0 and "not a readable zip" in bad.problems[0].reason


class NoUtf8Flag(zipfile.ZipInfo):
    """An entry named in UTF-8 bytes without the zip's UTF-8 flag, as Linux's and macOS's `zip` write it."""
    encoding = "utf-8"

    def _encodeFilenameFlags(self):
        return self.filename.encode(self.encoding), self.flag_bits


class DosName(NoUtf8Flag):
    """An entry named in DOS's cp437, as old Windows tools write it (é is byte 0x82, not UTF-8)."""
    encoding = "cp437"


def test_a_zip_from_linux_zip_keeps_its_non_ascii_names(tmp_path):
    """Read as DOS's cp437, as zipfile reads a name without the UTF-8 flag, 'café ☕.png' became 'caf├⌐ Γÿò.png'
    and its metadata row found no image. A name truly in cp437 still reads as cp437."""
    cup, red = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (64, 64), (10, 120, 200)).save(cup, "PNG")
    Image.new("RGB", (64, 64), (200, 30, 30)).save(red, "PNG")
    archive = tmp_path / "upload.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(NoUtf8Flag("shapes/café ☕.png"), cup.getvalue())
        zf.writestr(DosName("shapes/né.png"), red.getvalue())
        zf.writestr("shapes/metadata.csv", "file_name,text\ncafé ☕.png,a blue cup\nné.png,a red square\n")
    report = inspect_data(ImageConfig(data_path=str(archive)))
    assert report.problems == []
    assert {Path(p["image"]).name: p["caption"] for p in report.preview} == {"café ☕.png": "a blue cup",
                                                                             "né.png": "a red square"}


def test_uploaded_files_pair_with_captions_by_name(tmp_path):
    # A browser upload puts each file in its own temporary folder.
    image = square(tmp_path / "u1" / "cat.png", caption=None)
    caption = tmp_path / "u2" / "cat.txt"
    caption.parent.mkdir()
    caption.write_text("a cat")
    report = inspect_data(ImageConfig(data_files=[str(image), str(caption)]))
    assert report.preview[0]["caption"] == "a cat"
    dog = square(tmp_path / "u3" / "dog.png", colour=(0, 0, 90), caption=None)
    metadata = tmp_path / "u4" / "metadata.csv"
    metadata.parent.mkdir()
    metadata.write_text("file_name,text\ndog.png,a dog\n")
    report = inspect_data(ImageConfig(data_files=[str(dog), str(metadata)], caption_source="metadata"))
    assert [p["caption"] for p in report.preview] == ["a dog"] and report.problems == []


def test_nothing_usable_is_explained_not_raised(tmp_path):
    missing = inspect_data(ImageConfig(data_path=str(tmp_path / "nowhere")))
    assert missing.rows_usable == 0 and "not found" in missing.problems[0].reason
    (tmp_path / "readme.md").write_text("no pictures here")
    empty = check(tmp_path)
    assert empty.rows_usable == 0 and any("no images found" in p.reason for p in empty.problems)
    _, examples = load_examples(ImageConfig(data_path=str(tmp_path)))
    assert examples == []


def test_config_rules():
    with pytest.raises(ConfigError) as err:
        ImageConfig.from_dict({"caption_source": "instance_prompt", "resolution": 30})
    names = {name for name, _ in err.value.problems}
    assert names == {"data_path", "instance_prompt", "resolution"}
    config = ImageConfig.from_dict({"data_path": "x", "sample_prompts": "a, b"})
    assert config.sample_prompts == ["a", "b"] and config.base_model == "tiny-sd"
    # far above the model's native size (a run at 2048 px on the 32 px preset made no step in minutes)
    with pytest.raises(ConfigError, match="2048 px is over 4 times this model's native 32 px.*at most 128"):
        ImageConfig.from_dict({"data_path": "x", "resolution": 2048})
    assert ImageConfig.from_dict({"data_path": "x", "resolution": 128}).resolution == 128
    with pytest.raises(ConfigError, match="learning_rate: is empty: enter a number"):  # a number box cleared
        ImageConfig.from_dict({"data_path": "x", "learning_rate": None})


def test_the_tab_names_files_inside_the_zip_and_says_what_it_did(tmp_path):
    """In the Image tab: two folders' 001.png told apart, a metadata row named again reported with its row
    (it silently replaced the caption), a caption file with no image reported, and the conversions listed."""
    import dataclasses
    from studio.tabs import image as tab
    square(tmp_path / "src" / "cats" / "001.png", caption=None)
    (tmp_path / "src" / "dogs").mkdir()
    (tmp_path / "src" / "dogs" / "001.png").write_bytes((tmp_path / "src" / "cats" / "001.png").read_bytes()[:60])
    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(tmp_path / "src" / "print.jpg")
    (tmp_path / "src" / "metadata.csv").write_text("file_name,text\ncats/001.png,a cat\nprint.jpg,a print\n"
                                                   "cats/001.png,another cat\n")
    (tmp_path / "src" / "prnt.txt").write_text("a misnamed caption")
    shutil.make_archive(str(tmp_path / "pets"), "zip", tmp_path / "src")
    settings = dataclasses.asdict(ImageConfig())
    summary, problems, *_ = tab.check_data([str(tmp_path / "pets.zip")], None, "tiny-sd", "",
                                           *[settings[key] for key in tab.FORM])
    rows = {(row["file"], row["row"]): row["problem"] for row in problems["value"].to_dict("records")}
    assert rows[("metadata.csv", 4)] == "names 'cats/001.png' again (already in row 2): this row is skipped"
    assert rows[("dogs/001.png", "")].startswith("is truncated")  # not "001.png", as the good cat is
    assert rows[("prnt.txt", "")] == "matches no image (a caption goes with the image of the same name): not used"
    assert "2 of 3 images usable" in summary and "Used as follows:\n- print.jpg: is a CMYK" in summary


def test_a_metadata_row_naming_an_image_two_folders_have_names_both(tmp_path):
    """It said the image 'is not among the images', while both were there."""
    square(tmp_path / "cats" / "001.png", caption=None)
    square(tmp_path / "dogs" / "001.png", colour=(0, 0, 90), caption=None)
    (tmp_path / "metadata.csv").write_text("file_name,text\n001.png,a pet\n")
    found = {(p.file, p.row): p.reason for p in check(tmp_path, caption_source="metadata").problems}
    assert found[("metadata.csv", 2)] == ("file_name '001.png' matches 2 files (cats/001.png, dogs/001.png): "
                                          "name it by its path in the folder")


def test_a_base_model_that_cannot_be_loaded_stops_train_before_a_run(tmp_path, monkeypatch):
    """The Language tab refused such a model; the Image tab made a run that failed on loading it."""
    import shutil
    from pipelines import load_config
    from pipelines.image.model import materialise_preset
    monkeypatch.setenv("STUDIO_MODEL_DIRS", str(tmp_path))
    config = load_config(Path(__file__).resolve().parent.parent / "assets" / "image" / "config.yaml")
    half = tmp_path / "half-sd"
    shutil.copytree(materialise_preset("tiny-sd"), half, ignore=shutil.ignore_patterns("unet"))
    report = inspect_data(config.changed(base_model=str(half)))
    assert not report.ok and report.rows_usable == 8
    assert report.blocker == (f"the base model cannot be used: The pipeline folder {half} has no unet/: check that "
                              "it was copied whole (unet, vae, text_encoder, tokenizer, scheduler).")
    offline = inspect_data(config.changed(base_model="someone/sd-finetune"))  # no network here, nothing cached
    assert "cannot be downloaded: this machine cannot reach the Hugging Face hub" in offline.blocker


def test_try_it_refuses_a_size_the_model_cannot_draw(tmp_path, monkeypatch):
    """A picture tried at 1000 px on the 32 px preset held the server for over 20 minutes, every other Try it
    queued behind it."""
    import gradio as gr
    from pipelines import load_config
    from studio.runs import Registry
    from studio.tabs import image as tab
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "ws"))
    config = load_config(Path(__file__).resolve().parent.parent / "assets" / "image" / "config.yaml")
    run = Registry().create(config, status="completed")
    with pytest.raises(gr.Error, match=r"Size: 1000 px is over 4 times this model's native 32 px: each image would "
                                       r"take very long for images it cannot draw; choose at most 128 \(0 = 32\)"):
        next(tab.try_prompt(run.id, "final", "a red circle", "", 1, 25, 7.5, 1000, 1.0))  # (said before anything is drawn)


def test_a_metadata_table_finds_images_whatever_the_case_and_unicode_form_of_their_names(tmp_path):
    """A zip made on a Mac stores café.png as e and an accent; the metadata.csv beside it, typed elsewhere, has
    the single é, or another case: the image was 'not among the images' and had 'no caption'."""
    import unicodedata
    folder = tmp_path / "data"
    folder.mkdir()
    for name, colour in [(unicodedata.normalize("NFD", "café.png"), (200, 0, 0)), ("Photo.PNG", (0, 200, 0))]:
        Image.new("RGB", (64, 64), colour).save(folder / name)
    (folder / "metadata.csv").write_text("file_name,text\n" + unicodedata.normalize("NFC", "café.png")
                                         + ",a red square\nphoto.png,a green square\n")
    report = inspect_data(ImageConfig(data_path=str(folder), resolution=32))
    assert (report.rows_found, report.rows_usable, report.problems) == (2, 2, [])


def test_a_caption_table_of_any_name_is_read(tmp_path):
    """Only metadata.csv / metadata.jsonl were read: a captions.csv beside the images was 'not an image file:
    skipped', and every image then had no caption."""
    for i, colour in enumerate([(200, 0, 0), (0, 200, 0)]):
        Image.new("RGB", (64, 64), colour).save(tmp_path / f"{i}.png")
    (tmp_path / "captions.csv").write_text("file_name,text\n0.png,a red square\n1.png,a green square\n")
    report = inspect_data(ImageConfig(data_path=str(tmp_path), resolution=32))
    assert (report.rows_usable, report.problems) == (2, [])
    assert sorted(p["caption"] for p in report.preview) == ["a green square", "a red square"]


def test_a_folder_picked_again_keeps_its_later_files(tmp_path):
    """Gradio adds a folder picked again to the first pick: two files at one place were both linked there, and
    which one stayed depended on Gradio's hashes. The later pick's file is kept; a file where a folder of the same
    name goes (a name with the marker character in it) is left out instead of failing every check."""
    from pipelines.archives import FOLDER_MARK, gather_folder

    def upload(pick: str, place: str, text: str) -> Path:  # as Gradio keeps an upload: a folder of its own
        (tmp_path / pick).mkdir(exist_ok=True)
        (tmp_path / pick / FOLDER_MARK.join(place.split("/"))).write_text(text)
        return tmp_path / pick / FOLDER_MARK.join(place.split("/"))

    files = [upload("a", "pets/cats/0.txt", "a cat, first try"), upload("b", "pets/cats", "not a folder"),
             upload("c", "pets/cats/0.txt", "a cat, fixed"), upload("d", "pets/dogs/0.txt", "a dog")]
    folder = gather_folder(files, tmp_path / "uploads")
    assert folder.name == "pets"
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) == ["cats/0.txt", "dogs/0.txt"]
    assert (folder / "cats" / "0.txt").read_text() == "a cat, fixed"
    assert gather_folder(files, tmp_path / "uploads") == folder  # once: a check again reuses it


def test_unpacked_uploads_left_unused_for_a_day_are_removed_and_made_again_when_needed(tmp_path, monkeypatch):
    """Every zip tried was unpacked into the workspace for good: trying a few large ones filled the disk."""
    import os
    import time

    from pipelines.archives import FOLDER_MARK, clean_unused, gather_folder
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "ws"))
    uploads = tmp_path / "ws" / "uploads"
    zips = []
    for name, colour in (("old.zip", (200, 30, 30)), ("kept.zip", (30, 200, 30))):
        square(tmp_path / name.split(".")[0] / "a.png", colour)
        shutil.make_archive(str(tmp_path / name.split(".")[0]), "zip", tmp_path / name.split(".")[0])
        zips.append(tmp_path / name)
    photo = square(tmp_path / "picked" / FOLDER_MARK.join(["pets", "cat.png"]), caption=None)
    for archive in zips:
        assert check(archive).rows_usable == 1
    gather_folder([photo], uploads)
    made = sorted(uploads.iterdir())
    assert len(made) == 3
    day_ago = time.time() - 25 * 3600
    for folder in made:
        os.utime(folder, (day_ago, day_ago))
    assert check(zips[1]).rows_usable == 1  # used again: kept

    assert clean_unused(uploads) == 2
    assert len(list(uploads.iterdir())) == 1
    report = check(zips[0])  # the upload is still there: its files are unpacked again
    assert report.rows_usable == 1 and report.problems == []


def test_uploads_and_previews_unused_for_a_day_are_removed_and_those_a_form_holds_kept(tmp_path, monkeypatch):
    """Gradio's copy of every upload (folders of images, audio data sets: gigabytes) and the image preview's
    thumbnails stayed in the temporary folder for good. The server's hourly clean removes them as it removes
    unpacked zips, once nothing has used them for STUDIO_KEEP_UNPACKED_HOURS (here, 2.5 seconds); an upload
    the page's form holds is used by each check of it."""
    import os
    import secrets
    import tempfile
    import time

    from studio import app as studio
    from studio.tabs import image as tab
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "ws"))
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))  # (as studio serve sets a folder of its own)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    app = studio.build_app()
    built_with = [p for p in (tmp_path / "gradio").rglob("*") if p.is_file()]  # the tabs' samples, copied there
    assert len(built_with) >= 8

    def upload(name, colour):  # as Gradio keeps an upload: in a folder of its own in its cache
        photo = square(tmp_path / "gradio" / secrets.token_hex(8) / name, colour, caption="a square")
        return [str(photo), str(photo.with_suffix(".txt"))]

    def check(files):
        return tab.check_data(files, None, *tab.FORM_SPEC.opening())

    replaced, held = upload("old.tif", (200, 30, 30)), upload("photo.tif", (20, 120, 220))
    assert check(replaced)[0].startswith("**Data:** 1 of 1 images usable")  # then the user picked other photos
    assert check(held)[0].startswith("**Data:** 1 of 1 images usable")
    previews = {Path(tab.drawable(files[0])) for files in (replaced, held)}  # (a TIFF is shown as a JPEG thumbnail)
    assert set(tab.previews_folder().iterdir()) == previews
    saved = Path(tab.FORM_SPEC.save(held, None, *tab.FORM_SPEC.opening())[0]["value"]).parent  # Save config
    time.sleep(5)
    # Gradio's copy of a run's sample image drawn two days ago, made just now: copy2 gives it the image's times
    copied = square(tmp_path / "gradio" / secrets.token_hex(8) / "sample.png", caption=None)
    os.utime(copied, (time.time() - 2 * 86400,) * 2)
    assert check(held)[0].startswith("**Data:** 1 of 1 images usable")  # the page is still open, checked again

    studio.clean_unused(app, hours=2.5 / 3600)
    assert all(Path(p).exists() for p in held) and copied.exists() and all(p.exists() for p in built_with)
    assert not Path(replaced[0]).parent.exists()  # the upload, its Gradio folder with it
    assert list(tab.previews_folder().iterdir()) == [Path(tab.drawable(held[0]))] and not saved.exists()
    assert check(held)[0].startswith("**Data:** 1 of 1 images usable")


def test_the_preview_shows_a_phone_photo_the_browser_cannot_draw(tmp_path):
    """A HEIC photo trained, but the tab's preview sent the browser the .heic itself, which it cannot draw: the
    gallery showed only the caption."""
    from studio.tabs import image as tab
    square(tmp_path / "IMG_0042.heic", colour=(20, 120, 220), caption="a blue photo")
    square(tmp_path / "drawing.png", caption="a red square")
    shown = tab.drawable(str(tmp_path / "IMG_0042.heic"))
    assert shown.endswith(".jpg") and Image.open(shown).format == "JPEG"
    assert np.asarray(Image.open(shown))[10, 10, 2] > 180  # the photo's blue
    assert tab.drawable(str(tmp_path / "drawing.png")) == str(tmp_path / "drawing.png")  # drawn as it is
