"""The Image and Speech tabs in a real browser: upload, train, watch samples and metrics, try side by side, export."""

import re
import zipfile

from playwright.sync_api import expect

from tests.browser import ROOT, screenshot, step_of, wait_status


def set_number(page, label: str, value) -> None:
    """Type into the visible tab's number field (each tab has its own 'Max steps')."""
    box = page.get_by_role("spinbutton", name=re.compile(rf"^(number input for )?{re.escape(label)}$"))
    box = box.locator("visible=true").first
    box.fill(str(value))
    box.press("Tab")


def open_tab(page, server, name: str) -> None:
    page.goto(server.url)
    page.get_by_role("tab", name=name).click()


def download_names(page, locator: str, tmp_path) -> set[str]:
    link = page.locator(f"{locator} a").first
    expect(link).to_be_visible(timeout=180_000)
    with page.expect_download() as download:
        link.click()
    path = tmp_path / "download.zip"
    download.value.save_as(path)
    return set(zipfile.ZipFile(path).namelist())


def test_image_tab_zip_upload_training_gallery_and_side_by_side(server, page, tmp_path):
    archive = tmp_path / "shapes.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted((ROOT / "assets" / "image").iterdir()):
            if path.suffix in (".png", ".txt"):
                zf.write(path, f"shapes/{path.name}")
        zf.writestr("../escape.txt", "nope")
    open_tab(page, server, "Image (Stable Diffusion)")
    expect(page.locator("#image-train")).to_be_enabled()
    page.locator("#image-files button[aria-label='Clear']").first.click()
    page.locator("#image-files input[type=file]").set_input_files(str(archive))
    summary = page.locator("#image-data-summary")
    expect(summary).to_contain_text("8 of 8")
    expect(page.locator("#image-problems")).to_contain_text("climbs out of the archive")
    expect(page.locator("#image-preview img")).to_have_count(8)
    set_number(page, "Max steps", 40)
    set_number(page, "Sample every", 20)
    screenshot(page, "image-tab.png")
    page.locator("#image-train").click()
    done = wait_status(page, "image", lambda t: "completed" in t or "failed" in t, timeout=400)
    assert "completed" in done and step_of(done) == 40
    expect(page.locator("#image-samples-gallery img").first).to_be_visible()  # validation images, step 20 and 40
    page.locator("#image-generate").click()
    expect(page.locator("#image-tuned img")).to_be_visible(timeout=180_000)
    expect(page.locator("#image-base img")).to_be_visible()
    seed = page.get_by_role("spinbutton", name=re.compile(r"^(number input for )?Seed$")).first
    seed.fill("")  # an empty seed is a new one, named under the images (it was a Python error)
    seed.press("Tab")
    page.locator("#image-generate").click()
    expect(page.locator("#image-tuned")).to_contain_text(re.compile(r"Tuned model \(seed \d+\)"), timeout=180_000)
    expect(page.locator("#image-tuned img")).to_be_visible(timeout=180_000)  # (the label comes first, the image when drawn)
    page.locator("#image-generate").scroll_into_view_if_needed()
    screenshot(page, "image-try-it.png")
    page.get_by_role("button", name="LoRA for diffusers (zip)").click()
    assert "pytorch_lora_weights.safetensors" in download_names(page, "#image-download", tmp_path)


def test_speech_tab_training_shows_wer_and_transcribes_side_by_side(server, page, tmp_path):
    open_tab(page, server, "Speech (Whisper)")
    expect(page.locator("#speech-data-summary")).to_contain_text("8 of 8")
    expect(page.locator("#speech-train")).to_be_enabled()
    screenshot(page, "speech-tab.png")
    page.locator("#speech-train").click()
    done = wait_status(page, "speech", lambda t: "completed" in t or "failed" in t, timeout=400)
    assert "completed" in done
    expect(page.locator("#speech-metrics-plot")).to_contain_text("wer")  # the WER curve's legend
    page.locator("#speech-audio input[type=file]").set_input_files(str(ROOT / "assets" / "speech" / "clips" / "cat.wav"))
    page.locator("#speech-transcribe").click()
    tuned = page.locator("#speech-tuned-text textarea")
    expect(tuned).to_have_value("The cat sat on the mat.", timeout=180_000)
    assert page.locator("#speech-base-text textarea").input_value() != "The cat sat on the mat."
    page.locator("#speech-transcribe").scroll_into_view_if_needed()
    screenshot(page, "speech-try-it.png")
    page.get_by_role("button", name="Merged checkpoint for openai-whisper (zip)").click()
    assert any(name.endswith(".pt") for name in download_names(page, "#speech-download", tmp_path))


def test_a_folder_of_speakers_takes_the_place_of_the_sample_clips(server, page, tmp_path):
    """Recordings are often kept one folder per speaker, with the same names in each: the speech tab takes a
    folder as it is, each clip with its own transcript, in place of the sample clips."""
    import shutil
    clips = ROOT / "assets" / "speech" / "clips"
    for speaker, clip, text in [("anna", "cat.wav", "The cat sat on the mat."),
                                ("ben", "window.wav", "Open the window, please.")]:
        (tmp_path / "voices" / speaker).mkdir(parents=True)
        shutil.copy(clips / clip, tmp_path / "voices" / speaker / "001.wav")
        (tmp_path / "voices" / speaker / "001.txt").write_text(text)
    open_tab(page, server, "Speech (Whisper)")
    expect(page.locator("#speech-data-summary")).to_contain_text("8 of 8")
    page.locator("#speech-folder input[type=file]").set_input_files(str(tmp_path / "voices"))
    expect(page.locator("#speech-data-summary")).to_contain_text("2 of 2 clips usable")
    expect(page.locator("#speech-problems")).to_be_hidden()
    for shown in ("anna/001.wav", "ben/001.wav", "Open the window, please."):
        expect(page.locator("#speech-preview")).to_contain_text(shown)


def test_bad_audio_gets_a_message(server, page, tmp_path):
    fake = tmp_path / "clip.wav"
    fake.write_bytes(b"this is not audio" * 100)
    (tmp_path / "clip.txt").write_text("hello there")
    open_tab(page, server, "Speech (Whisper)")
    expect(page.locator("#speech-train")).to_be_enabled()
    page.locator("#speech-files button[aria-label='Clear']").first.click()
    page.locator("#speech-files input[type=file]").set_input_files([str(fake), str(tmp_path / "clip.txt")])
    expect(page.locator("#speech-data-summary")).to_contain_text("No usable clips")
    expect(page.locator("#speech-problems")).to_contain_text("clip.wav")
    expect(page.locator("#speech-train")).to_be_disabled()


def test_validation_clips_are_given_as_files_with_their_table(server, page, tmp_path):
    """The validation box took one zip: clips and their metadata.csv could not be given as files."""
    import shutil
    clips = ROOT / "assets" / "speech" / "clips"
    held = [shutil.copy(clips / name, tmp_path / f"held-{name}") for name in ("battery.wav", "meeting.wav")]
    (tmp_path / "metadata.csv").write_text("file_name,transcription\nheld-battery.wav,The battery is low.\n"
                                           "held-meeting.wav,The meeting starts at nine.\n")
    open_tab(page, server, "Speech (Whisper)")
    expect(page.locator("#speech-data-summary")).to_contain_text("8 of 8")
    validation = page.locator("#speech-validation input[type=file]")
    validation.set_input_files([*map(str, held), str(tmp_path / "metadata.csv")])
    expect(page.locator("#speech-data-summary")).to_contain_text("plus 2 for validation from the validation data")
    expect(page.locator("#speech-train")).to_be_enabled()


def test_bad_images_get_a_message_and_no_empty_preview(server, page, tmp_path):
    fake = tmp_path / "photo.png"
    fake.write_bytes(b"this is not a picture" * 100)
    (tmp_path / "photo.txt").write_text("a photo")
    open_tab(page, server, "Image (Stable Diffusion)")
    expect(page.locator("#image-preview img").first).to_be_visible()  # the sample drawings
    page.locator("#image-files button[aria-label='Clear']").first.click()
    page.locator("#image-files input[type=file]").set_input_files([str(fake), str(tmp_path / "photo.txt")])
    expect(page.locator("#image-data-summary")).to_contain_text("No usable images")
    expect(page.locator("#image-problems")).to_contain_text("photo.png")
    expect(page.locator("#image-preview")).to_be_hidden()
    expect(page.locator("#image-train")).to_be_disabled()


def test_a_folder_upload_takes_the_place_of_the_sample_drawings_and_keeps_its_subfolders(server, page, tmp_path):
    """The tab opens with the sample drawings in its files box: a folder uploaded beside them trained with
    them ('11 of 11' for 3 images of one's own). A browser sends a folder's files without their subfolders:
    cat/0.png and dog/0.png met as two 0.png whose captions matched neither ('No usable images'), and a
    kohya-style 10_bird/ lost the name that captions its images."""
    from PIL import Image
    folder = tmp_path / "mine"
    for sub, colour in [("cat", (200, 0, 0)), ("dog", (0, 200, 0)), ("10_bird", (0, 0, 200))]:
        (folder / sub).mkdir(parents=True)
        Image.new("RGB", (64, 64), colour).save(folder / sub / "0.png")
        if sub != "10_bird":
            (folder / sub / "0.txt").write_text(f"a plain {sub}")
    open_tab(page, server, "Image (Stable Diffusion)")
    expect(page.locator("#image-data-summary")).to_contain_text("8 of 8")
    page.locator("#image-folder input[type=file]").set_input_files(str(folder))
    expect(page.locator("#image-data-summary")).to_contain_text("3 of 3 images usable")
    expect(page.locator("#image-data-summary")).to_contain_text("'bird' captions its images")
    expect(page.locator("#image-problems")).to_be_hidden()
    expect(page.locator("#image-preview img")).to_have_count(3)
    for caption in ("a plain cat", "a plain dog", "bird"):
        expect(page.locator("#image-preview")).to_contain_text(caption)


def test_typing_the_instance_prompt_enables_train_at_once(server, page):
    """Checked on blur, the instance prompt left Train disabled until the box lost focus, so the first click on
    Train after typing did nothing."""
    open_tab(page, server, "Image (Stable Diffusion)")
    expect(page.locator("#image-data-summary")).to_contain_text("8 of 8")
    page.get_by_label("Caption source", exact=True).click()
    page.get_by_role("option", name="instance_prompt", exact=True).click()
    expect(page.locator("#image-problems")).to_contain_text("instance prompt is empty")
    expect(page.locator("#image-train")).to_be_disabled()
    page.get_by_role("textbox", name=re.compile("^Instance prompt")).press_sequentially("a drawing of zqx shapes")
    expect(page.locator("#image-train")).to_be_enabled()  # the box still has the focus
    expect(page.get_by_role("textbox", name=re.compile("^Instance prompt"))).to_be_focused()
