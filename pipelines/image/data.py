"""Reading and checking image training data: a folder, a zip, or uploaded files, with their captions.

The same code feeds the data check the user sees and the training run, so what the check accepts is
exactly what trains. Every image is fully decoded once here, so truncated and damaged files are found
before training, not at step 300. Bad files are reported with their name and the reason, never raised.
Conversions the studio makes on its own (CMYK, 16-bit, palette, transparency, animation, EXIF rotation)
are listed as notes in `report.stats["notes"]`: the image is used, the user should know how.

This module imports no torch, so the UI can check data without loading the ML stack.
"""

from __future__ import annotations

import hashlib
import os
import re
import statistics
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pillow_heif
from PIL import Image, ImageOps, UnidentifiedImageError

from pipelines.archives import unpack_once
from pipelines.data import DataReport, FileIndex, NotText, decode_text, int_setting
from pipelines.image.config import ImageConfig, training_resolution

# HEIC/HEIF is what phones save photos as; Pillow reads AVIF itself, and HEIC through pillow-heif.
pillow_heif.register_heif_opener()
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".heic", ".heif", ".avif"}
CAPTION_SUFFIXES = (".txt", ".caption")
# Caption tables: Hugging Face's imagefolder names them metadata.csv / metadata.jsonl; any name is read.
METADATA_SUFFIXES = (".csv", ".tsv", ".jsonl")
METADATA_TEXT_COLUMNS = ("text", "caption", "prompt")
CONVERT_FIRST = {".svg", ".psd", ".raw", ".cr2", ".cr3", ".nef", ".arw", ".dng", ".jxl"}
IGNORED_NAMES = {".DS_Store", "Thumbs.db", "desktop.ini", "config.yaml", "README.md", "LICENSE"}
KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")  # kohya_ss layout: "10_sks dog" = 10 repeats, class words

# Settings (environment variables, documented in the README's "Limits" section).
MAX_IMAGE_PIXELS = int_setting("STUDIO_MAX_IMAGE_PIXELS", 50_000_000)  # above this, a file is a decompression bomb
MAX_IMAGES = int_setting("STUDIO_MAX_IMAGES", 20_000)
PREVIEW_COUNT = 24


@dataclass
class ImageExample:
    path: Path
    caption: str
    size: tuple[int, int]  # width, height after EXIF rotation
    caption_from: str      # "file", "metadata", "folder" or "instance_prompt"
    source: str            # the name shown in messages: path relative to the data folder


# ---- one image -------------------------------------------------------------------------------

def read_image(path: Path) -> tuple[Image.Image | None, str, list[str]]:
    """(RGB image, "", notes) or (None, reason, []). Decodes every pixel, so damage shows up here."""
    try:
        size = path.stat().st_size
    except OSError as err:
        return None, f"cannot be read ({err.strerror or err})", []
    if size == 0:
        return None, "is empty (0 bytes)", []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we check the size ourselves
            image = Image.open(path)
    except UnidentifiedImageError:
        return None, "is not an image (not PNG, JPEG, WebP, HEIC, AVIF, BMP, GIF or TIFF data inside)", []
    except Image.DecompressionBombError as err:  # Pillow's own, larger limit, hit while reading the header
        return None, f"is a decompression bomb: {err}", []
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        return None, _damaged(err), []
    with image:  # closes the file, which animated images would otherwise keep open
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            return None, _bomb(width, height), []
        notes: list[str] = []
        try:
            frames = getattr(image, "n_frames", 1)
            if frames > 1:
                image.seek(0)
                notes.append(f"is animated ({frames} frames): the first frame is used")
            if any(";16" in str(tile.args) for tile in getattr(image, "tile", []) or []) and image.mode != "I;16":
                notes.append("has 16 bits per channel: reduced to 8 bits")
            image.load()  # decodes every pixel: damage shows up here, not at training time
            orientation = image.getexif().get(0x0112, 1)
            if orientation not in (0, 1):
                image = ImageOps.exif_transpose(image)
                notes.append("was turned upright following its EXIF orientation")
            rgb, note = to_rgb(image)
        except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as err:
            return None, _damaged(err), []
        if note:
            notes.append(note)
        return (rgb.copy() if rgb is image else rgb), "", notes


def _damaged(err: Exception) -> str:
    text = str(err) or type(err).__name__
    if "truncated" in text or isinstance(err, EOFError):
        return "is truncated (the file ends before the image does); upload it again"
    return f"is damaged and cannot be decoded ({text})"


def _bomb(width: int, height: int) -> str:
    return (f"is {width:,} x {height:,} pixels ({width * height / 1e6:,.0f} megapixels), over the limit of "
            f"{MAX_IMAGE_PIXELS / 1e6:,.0f} (STUDIO_MAX_IMAGE_PIXELS): a decompression bomb or a scan far "
            "larger than training needs; downscale it")


def to_rgb(image: Image.Image) -> tuple[Image.Image, str]:
    """8-bit RGB, and a note when the conversion changes what the user sees."""
    mode = image.mode
    if mode == "RGB":
        return image, ""
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # Pillow's own convert() clips these to 255 (an almost white picture): scale the range instead.
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or values.max() > 255 else 255.0
        if mode == "F" and values.max() <= 1.0:
            top = 1.0
        grey = np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB"), "is a 16-bit (or higher) greyscale image: reduced to 8 bits"
    if mode == "CMYK":
        return image.convert("RGB"), "is a CMYK (print) image: converted to RGB, colours may shift a little"
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        if rgba.getextrema()[3][0] < 255:
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB"), "has transparency: filled with white"
        return rgba.convert("RGB"), ""
    if mode == "P":
        return image.convert("RGB"), "is a palette image: converted to RGB"
    if mode in ("L", "1"):
        return image.convert("RGB"), "is greyscale: the model will learn grey images from it"
    return image.convert("RGB"), f"is in {mode} colour: converted to RGB"


# ---- captions --------------------------------------------------------------------------------

def _read_caption(path: Path) -> tuple[str | None, str]:
    """(caption, problem): with a caption, the problem is a warning (how it was read). Lines are joined:
    kohya-style tag lists sometimes wrap."""
    try:
        text, read_as = decode_text(path.read_bytes())
    except NotText as err:
        return None, f"caption file {path.name} {err}"
    except OSError as err:
        return None, f"caption file {path.name} cannot be read ({err.strerror or err})"
    caption = " ".join(text.split())
    return (caption, read_as) if caption else (None, f"caption file {path.name} is empty")


def _read_metadata(path: Path, report: DataReport, images: FileIndex) -> dict[Path, tuple[str, int]]:
    """image -> (caption, row) from a Hugging Face imagefolder metadata file. file_name is relative to the
    metadata file's folder; for files uploaded one by one (each in its own temporary folder) a file name
    that only one image has is enough (FileIndex)."""
    from pipelines.llm.data import read_table  # the shared CSV/JSONL reader: same limits, same messages

    found: dict[Path, tuple[str, int]] = {}
    rows = read_table(path, report)
    if not rows:
        return found
    columns = {k.lower(): k for _, record in rows[:50] for k in record}
    text_column = next((columns[c] for c in METADATA_TEXT_COLUMNS if c in columns), None)
    if "file_name" not in columns or text_column is None:
        report.problem(path, f"needs a file_name column and a text (or caption/prompt) column; it has "
                             f"{sorted(columns.values())}")
        return found
    for row, record in rows:
        name = str(record.get(columns["file_name"]) or "").strip()
        caption = " ".join(str(record.get(text_column) or "").split())
        if not name:
            report.problem(path, "has no file_name", row)
            continue
        target = (path.parent / name).resolve()
        if path.parent.resolve() not in target.parents:
            report.problem(path, f"file_name '{name}' points outside the metadata file's folder", row)
            continue
        image = images.find(name, path.parent)
        if image is None:
            why = images.several(name, path.parent, report) or "is not among the images"
            report.problem(path, f"file_name '{name}' {why}", row)
            continue
        target = image.resolve()
        if not caption:
            report.problem(path, f"the {text_column} for '{name}' is empty", row)
            continue
        if target in found:  # the first row stands, as in the speech tables
            report.problem(path, f"names '{name}' again (already in row {found[target][1]}): this row is skipped", row)
            continue
        found[target] = (caption, row)
    return found


# ---- finding the files -----------------------------------------------------------------------

def _walk(folder: Path) -> list[Path]:
    """Every file under `folder`, sorted, skipping hidden files and macOS clutter."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__MACOSX")
        found += [Path(root) / f for f in sorted(files) if not f.startswith(".") and f not in IGNORED_NAMES]
    return found


def collect_files(config: ImageConfig, report: DataReport) -> tuple[list[Path], Path | None]:
    """All candidate files from data_path and data_files, and the folder names are shown relative to."""
    files: list[Path] = []
    base: Path | None = None
    sources = ([config.data_path] if config.data_path.strip() else []) + list(config.data_files)
    for raw in sources:
        path = Path(raw).expanduser()
        if not path.exists():
            report.problem(path, "not found" + (" (the folder does not exist)" if not path.suffix else ""))
            continue
        if path.is_file() and path.suffix.lower() == ".zip":
            from pipelines.hub import workspace  # (it pulls in torch, which checking a folder does not need)
            folder = unpack_once(path, workspace() / "uploads", report)
            if folder is None:
                continue
            report.stats["unpacked_to"] = str(folder)
            path = folder
        if path.is_dir():
            found = _walk(path)
            if not found:
                report.problem(path, "the folder is empty")
            base = base or path
            files += found
        else:
            files.append(path)
    return files, base


# ---- the whole data set ----------------------------------------------------------------------

def load_examples(config: ImageConfig, report: DataReport | None = None, *, keep_notes: bool = True
                  ) -> tuple[DataReport, list[ImageExample]]:
    """Find every image, decode it, pair it with its caption. Never raises on bad data."""
    report = report or DataReport(unit="images")
    report.format = "images"
    files, base = collect_files(config, report)
    files = list(dict.fromkeys(files))

    if base:
        report.roots.append(base)
    shown = report.shown  # a file by its path in the uploaded folder or zip

    images = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
    captions = {f.with_suffix(""): f for f in files if f.suffix.lower() in CAPTION_SUFFIXES}
    by_stem: dict[str, list[Path]] = {}
    for f in captions.values():
        by_stem.setdefault(f.stem, []).append(f)
    index = FileIndex(images, IMAGE_SUFFIXES)
    metadata: dict[Path, tuple[str, int]] = {}
    use_metadata = config.caption_source in ("auto", "metadata")
    for f in files:
        if f.suffix.lower() in METADATA_SUFFIXES and use_metadata:
            metadata.update(_read_metadata(f, report, index))
        elif f.suffix.lower() in METADATA_SUFFIXES:
            report.problem(shown(f), f"not read: the caption source is {config.caption_source}; choose auto or "
                                     "metadata to take the captions from it")
        elif f.suffix.lower() in CONVERT_FIRST:
            report.problem(shown(f), f"{f.suffix} images are not supported: convert it to PNG or JPEG")
        elif f.suffix.lower() not in IMAGE_SUFFIXES | set(CAPTION_SUFFIXES):
            report.problem(shown(f), "is not an image file: skipped")
    if config.caption_source in ("auto", "files"):  # a misnamed caption would otherwise vanish unnoticed
        stems, names = {f.with_suffix("") for f in images}, {f.stem for f in images}
        for key, f in captions.items():
            if key not in stems and not (f.stem in names and len(by_stem[f.stem]) == 1):
                report.problem(shown(f), "matches no image (a caption goes with the image of the same name): "
                                         "not used")
    if config.caption_source == "metadata" and not any(f.suffix.lower() in METADATA_SUFFIXES for f in files):
        report.problem("metadata", "caption source is metadata, but no caption table (a metadata.csv or .jsonl with "
                                   "file_name and text columns) was found")
    if config.caption_source == "instance_prompt" and not config.instance_prompt.strip():
        report.problem("instance prompt", "caption source is instance_prompt, but the instance prompt is empty")

    if len(images) > MAX_IMAGES:
        report.problem(shown(images[MAX_IMAGES]), f"{len(images):,} images found; only the first {MAX_IMAGES:,} "
                                                  "are used (STUDIO_MAX_IMAGES)")
        images = images[:MAX_IMAGES]
    report.rows_found = len(images)
    if not images:
        where = ", ".join(str(s) for s in [config.data_path] + list(config.data_files) if s)
        kinds = sorted({f.suffix.lower() or f.name for f in files})[:8]
        report.problem(where or "data", "no images found (looked for " + ", ".join(sorted(IMAGE_SUFFIXES)) + " in "
                       "every subfolder)" + (f"; found only {', '.join(kinds)} files" if kinds else ""))
        return report, []

    resolution = training_resolution(config)
    notes: list[str] = []
    seen: dict[str, str] = {}
    examples: list[ImageExample] = []
    folders: dict[str, int] = {}
    too_small = duplicates = 0
    for path in images:
        name = shown(path)
        image, reason, image_notes = read_image(path)
        if image is None:
            report.problem(name, reason)
            continue
        digest = hashlib.sha1(path.read_bytes()).hexdigest()
        if digest in seen:
            report.problem(name, f"has the same content as {seen[digest]}: skipped")
            duplicates += 1
            continue
        seen[digest] = name
        notes += [f"{name}: {n}" for n in image_notes]
        caption, caption_from = _caption_for(path, config, captions, by_stem, metadata, report, name)
        if caption is None:
            continue
        width, height = image.size
        if min(width, height) < resolution:
            too_small += 1
            report.problem(name, f"is {width}x{height}, smaller than the {resolution} px training size: "
                                 "it will be upscaled and look soft", kept=True)
        folder = str(Path(name).parent)
        folders[folder] = folders.get(folder, 0) + 1
        examples.append(ImageExample(path=path, caption=caption, size=(width, height), caption_from=caption_from,
                                     source=name))
    _kohya_notes(folders, notes)
    report.rows_usable = len(examples)
    report.stats["resolution"] = resolution
    report.stats["too_small"] = too_small
    report.stats["duplicates"] = duplicates
    report.stats["folders"] = folders
    if keep_notes:
        report.stats["notes"] = notes
    return report, examples


def _caption_for(path: Path, config: ImageConfig, captions: dict[Path, Path], by_stem: dict[str, list[Path]],
                 metadata: dict[Path, tuple[str, int]], report: DataReport, name: str) -> tuple[str | None, str]:
    """(caption, where it came from); (None, "") when the image cannot be used for want of one."""
    source = config.caption_source
    instance = " ".join(config.instance_prompt.split())
    if source == "instance_prompt":
        return (instance, "instance_prompt") if instance else (None, "")  # (reported once, not per image)
    problem = ""
    if source in ("auto", "files"):
        # Same folder first; for files uploaded one by one (each in its own temporary folder) the same stem.
        file = captions.get(path.with_suffix("")) or (by_stem.get(path.stem, [None])[0]
                                                       if len(by_stem.get(path.stem, [])) == 1 else None)
        if file is not None:
            caption, problem = _read_caption(file)
            if caption:
                if problem:
                    report.problem(file, problem, kept=True)
                return caption, "file"
    if source in ("auto", "metadata"):
        entry = metadata.get(path.resolve())
        if entry:
            return entry[0], "metadata"
    if source == "auto":
        kohya = KOHYA_FOLDER.match(path.parent.name)
        if kohya and not instance:
            return kohya.group(2).replace("_", " ").strip(), "folder"
        if instance:
            return instance, "instance_prompt"
    want = {"files": "a same-name .txt or .caption file", "metadata": "an entry in metadata.csv/.jsonl",
            "auto": "a same-name .txt file, a metadata entry or an instance prompt"}[source]
    report.problem(name, (problem + "; " if problem else "") + f"has no caption: add {want}; skipped")
    return None, ""


def _kohya_notes(folders: dict[str, int], notes: list[str]) -> None:
    """Explain where images were found when they sat in subfolders: the kohya_ss 'no data found' complaint."""
    nested = {f: n for f, n in folders.items() if f != "."}
    if not nested:
        return
    where = ", ".join(f"{f} ({n})" for f, n in sorted(nested.items()))
    notes.append(f"images were found in subfolders: {where}")
    for folder in nested:
        match = KOHYA_FOLDER.match(Path(folder).name)
        if match:
            notes.append(f"{folder}: kohya-style folder; its repeat count {match.group(1)} is not used (set epochs "
                         f"instead), '{match.group(2)}' captions its images that have no caption file")


def inspect_data(config: ImageConfig) -> DataReport:
    """The data check the UI and CLI show before training: images, captions, problems, sizes."""
    report, examples = load_examples(config)
    report.columns = ["image", "caption"]
    report.mapping = {"caption": config.caption_source}
    report.preview = [{"image": str(e.path), "caption": e.caption, "size": f"{e.size[0]}x{e.size[1]}",
                       "caption_from": e.caption_from} for e in examples[:PREVIEW_COUNT]]
    if not examples:
        return report
    from pipelines.image.model import unusable_base
    report.base_model_unusable(unusable_base(config.base_model))
    widths, heights = [e.size[0] for e in examples], [e.size[1] for e in examples]
    words = [len(e.caption.split()) for e in examples]
    sources: dict[str, int] = {}
    for e in examples:
        sources[e.caption_from] = sources.get(e.caption_from, 0) + 1
    long = sum(n > 60 for n in words)
    report.stats.update({
        "images": len(examples), "width_min": min(widths), "width_max": max(widths),
        "height_min": min(heights), "height_max": max(heights),
        "width_median": statistics.median(widths), "height_median": statistics.median(heights),
        "sizes": [list(e.size) for e in examples], "caption_sources": sources,
        "caption_words_mean": round(statistics.mean(words), 1), "caption_words_max": max(words),
        "captions_distinct": len({e.caption for e in examples}),
    })
    if long:
        report.stats.setdefault("notes", []).append(
            f"{long} captions are over 60 words; the text encoder reads about 75 tokens and cuts the rest")
    return report
