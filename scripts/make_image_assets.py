"""Build the image tab's committed assets from nothing but this script (no network, no randomness):

  assets/image/                 8 small PNGs of coloured shapes, each with a same-name .txt caption
  assets/tiny-sd-tokenizer/     a small CLIP-compatible tokenizer (vocab.json + merges.txt) for tiny-sd

Run `python scripts/make_image_assets.py` after changing the shapes or the word list; commit the result.

The tokenizer follows CLIP's own layout: the 256 byte symbols, the same with the end-of-word mark
"</w>", then the learned merges, then <|startoftext|> and <|endoftext|>. So every input still
tokenizes (down to bytes), and transformers' CLIPTokenizer reads it like the real one.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "assets" / "image"
TOKENIZER = ROOT / "assets" / "tiny-sd-tokenizer"
TRIGGER = "zqx"  # a made-up word the adapter learns to tie to this drawing style
SIZE = 64
MERGES = 400

# (shape, colour name, RGB, background name, RGB)
SHAPES = [
    ("circle", "red", (220, 40, 40), "white", (250, 250, 250)),
    ("square", "blue", (40, 70, 220), "white", (250, 250, 250)),
    ("triangle", "green", (40, 170, 60), "white", (250, 250, 250)),
    ("circle", "yellow", (240, 210, 30), "black", (15, 15, 15)),
    ("square", "red", (220, 40, 40), "black", (15, 15, 15)),
    ("triangle", "blue", (40, 70, 220), "yellow", (240, 220, 120)),
    ("circle", "green", (40, 170, 60), "blue", (120, 150, 240)),
    ("square", "yellow", (240, 210, 30), "green", (120, 200, 130)),
]

# Words people type into Stable Diffusion prompts, so common prompts tokenize into few pieces.
PROMPT_WORDS = """
a an the of in on at with and by for from photo photograph picture drawing painting sketch illustration
portrait landscape style in the style of close up closeup high quality detailed realistic cartoon anime
dog cat person man woman child face house tree flower car sky sea mountain city street forest river
red green blue yellow black white orange purple pink brown grey gray gold silver colourful colorful
circle square triangle star shape shapes background simple flat bright dark light small large big tiny
sks ohwx zqx token trigger sunset night day morning beautiful cinematic lighting sharp focus 4k 8k
"""


def draw(shape: str, colour: tuple, background: tuple) -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), background)
    pen = ImageDraw.Draw(image)
    m = SIZE // 6
    box = (m, m, SIZE - m, SIZE - m)
    if shape == "circle":
        pen.ellipse(box, fill=colour)
    elif shape == "square":
        pen.rectangle(box, fill=colour)
    else:
        pen.polygon([(SIZE // 2, m), (SIZE - m, SIZE - m), (m, SIZE - m)], fill=colour)
    return image


def captions() -> list[str]:
    return [f"a {TRIGGER} drawing of a {colour} {shape} on a {bg} background"
            for shape, colour, _, bg, _ in SHAPES]


def make_images() -> None:
    IMAGES.mkdir(parents=True, exist_ok=True)
    for i, ((shape, colour, rgb, _, bg_rgb), caption) in enumerate(zip(SHAPES, captions()), start=1):
        stem = f"{i:02d}-{colour}-{shape}"
        # PNG metadata off: the bytes depend on the pixels alone, so rebuilding changes nothing.
        draw(shape, rgb, bg_rgb).save(IMAGES / f"{stem}.png", optimize=True)
        (IMAGES / f"{stem}.txt").write_text(caption + "\n", encoding="utf-8")


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible map from bytes to printable characters."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars)))


def words(text: str) -> list[str]:
    """Split text the way CLIPTokenizer's pre-tokenizer does, so the merges fit what it sees."""
    from transformers import CLIPTokenizer
    pre = CLIPTokenizer().backend_tokenizer
    normal = pre.normalizer.normalize_str(text)
    return [w for w, _ in pre.pre_tokenizer.pre_tokenize_str(normal)]


def learn_merges(counts: Counter, n_merges: int) -> list[tuple[str, str]]:
    """Plain byte-pair encoding: repeatedly join the most frequent neighbouring pair (ties by name)."""
    split = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in counts}
    merges = []
    for _ in range(n_merges):
        pairs: Counter = Counter()
        for w, parts in split.items():
            for a, b in zip(parts, parts[1:]):
                pairs[a, b] += counts[w]
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for w, parts in split.items():
            out, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    out.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            split[w] = tuple(out)
    return merges


def make_tokenizer() -> None:
    text = " ".join(captions() * 3 + [PROMPT_WORDS])
    counts = Counter(words(text))
    merges = learn_merges(counts, MERGES)
    symbols = list(bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {}
    for token in vocab_list:
        vocab.setdefault(token, len(vocab))
    TOKENIZER.mkdir(parents=True, exist_ok=True)
    (TOKENIZER / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    (TOKENIZER / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                          encoding="utf-8")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
              "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
              "do_lower_case": True}
    (TOKENIZER / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {TOKENIZER} ({len(vocab)} tokens, {len(merges)} merges)")


def main() -> None:
    sys.path.insert(0, str(ROOT))
    make_images()
    print(f"wrote {len(SHAPES)} images and captions to {IMAGES}")
    make_tokenizer()


if __name__ == "__main__":
    main()
