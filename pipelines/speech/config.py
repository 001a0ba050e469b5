"""Settings of a speech-to-text (Whisper) LoRA run. Light: imports neither torch nor whisper, so the UI
can build its form without loading the ML stack."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pipelines.config import RunConfig, option

# Whisper's languages, code and name, in the order of its language tokens (whisper.tokenizer.LANGUAGES; a
# test keeps the two equal). Copied so this module needs no torch import. "yue" exists in large-v3 only.
LANGUAGES = {code: name.replace("_", " ") for code, name in (pair.split(":") for pair in (
    "en:english zh:chinese de:german es:spanish ru:russian ko:korean fr:french ja:japanese pt:portuguese "
    "tr:turkish pl:polish ca:catalan nl:dutch ar:arabic sv:swedish it:italian id:indonesian hi:hindi fi:finnish "
    "vi:vietnamese he:hebrew uk:ukrainian el:greek ms:malay cs:czech ro:romanian da:danish hu:hungarian ta:tamil "
    "no:norwegian th:thai ur:urdu hr:croatian bg:bulgarian lt:lithuanian la:latin mi:maori ml:malayalam cy:welsh "
    "sk:slovak te:telugu fa:persian lv:latvian bn:bengali sr:serbian az:azerbaijani sl:slovenian kn:kannada "
    "et:estonian mk:macedonian br:breton eu:basque is:icelandic hy:armenian ne:nepali mn:mongolian bs:bosnian "
    "kk:kazakh sq:albanian sw:swahili gl:galician mr:marathi pa:punjabi si:sinhala km:khmer sn:shona yo:yoruba "
    "so:somali af:afrikaans oc:occitan ka:georgian be:belarusian tg:tajik sd:sindhi gu:gujarati am:amharic "
    "yi:yiddish lo:lao uz:uzbek fo:faroese ht:haitian_creole ps:pashto tk:turkmen nn:nynorsk mt:maltese "
    "sa:sanskrit lb:luxembourgish my:myanmar bo:tibetan tl:tagalog mg:malagasy as:assamese tt:tatar haw:hawaiian "
    "ln:lingala ha:hausa ba:bashkir jw:javanese su:sundanese yue:cantonese"
).split())}

# Base models for the dropdown: the offline preset first, then OpenAI's checkpoints, which download
# from OpenAI on first use into ~/.cache/whisper (parameters, download size).
BASE_MODELS = {
    "tiny-whisper": "Built-in, 3.6 M parameters, random weights: tries the studio offline in a minute.",
    "tiny": "OpenAI Whisper tiny: 39 M parameters, 72 MB download, multilingual.",
    "tiny.en": "OpenAI Whisper tiny.en: 39 M parameters, 72 MB download, English only.",
    "base": "OpenAI Whisper base: 74 M parameters, 139 MB download, multilingual.",
    "base.en": "OpenAI Whisper base.en: 74 M parameters, 139 MB download, English only.",
    "small": "OpenAI Whisper small: 244 M parameters, 461 MB download, multilingual.",
    "small.en": "OpenAI Whisper small.en: 244 M parameters, 461 MB download, English only.",
    "medium": "OpenAI Whisper medium: 769 M parameters, 1.4 GB download, multilingual.",
    "medium.en": "OpenAI Whisper medium.en: 769 M parameters, 1.4 GB download, English only.",
    "large-v3": "OpenAI Whisper large-v3: 1550 M parameters, 2.9 GB download, multilingual (needs a GPU).",
    "turbo": "OpenAI Whisper large-v3-turbo: 809 M parameters, 1.5 GB download, multilingual, fast decoder.",
}

TARGETS = {
    "attention": "Attention projections (query, key, value, out): the usual choice, smallest adapter.",
    "attention+mlp": "Attention and the feed-forward layers (mlp.0, mlp.2): learns more, twice the size.",
}


@dataclass
class SpeechConfig(RunConfig):
    modality: ClassVar[str] = "speech"
    path_fields: ClassVar[tuple[str, ...]] = ("data_path", "data_files", "validation_path", "strategy_config")

    base_model: str = option("tiny-whisper", "Built-in preset, an OpenAI Whisper size (tiny, base, small, medium, "
                                             "large-v3, turbo; .en = English only) or a local .pt checkpoint.")
    data_path: str = option("", "A folder or .zip of audio clips with transcripts: a metadata.csv "
                                "(file_name, transcription) or a same-name .txt file per clip.")
    data_files: list[str] = option([], "Uploaded files: audio clips (wav, flac, mp3, ogg, m4a, webm, a video's "
                                       "sound track…) plus a metadata.csv or .txt transcripts, or zips of them.")
    validation_path: list[str] = option([], "Optional held-out clips to measure the word error rate on, given as "
                                            "the training data is: folders, zips, or audio files with a metadata.csv "
                                            "or .txt transcripts.")
    validation_fraction: float = option(0.1, "Share of clips held out for validation when no validation data is "
                                             "given (only with 5 clips or more).", min=0.0, max=0.5, step=0.05)

    language: str = option("en", "Language spoken in the clips. Pinned in training and transcription, so the "
                                 "tuned model never guesses it.", choices=LANGUAGES)
    task: str = option("transcribe", "transcribe: text in the spoken language; translate: English text.",
                       choices=["transcribe", "translate"])
    long_clips: str = option("reject", "Clips over 30 s (Whisper's window): reject them, or split them at quiet "
                                       "points and divide the transcript by length.", choices=["reject", "split"])
    max_label_tokens: int = option(200, "Longest transcript in tokens; longer clips are skipped (a 30 s clip "
                                        "rarely holds more than 150).", min=8, max=440, step=8, advanced=True)

    target: str = option("attention", "Which layers get LoRA adapters.", choices=list(TARGETS))
    decoder_only: bool = option(True, "Train the decoder only, with the encoder frozen: each clip is encoded once "
                                      "and reused, several times faster. Turn off to adapt to new acoustics "
                                      "(accents, noise).")
    mixed_precision: str = option("auto", "bf16 for the frozen model's matrix products, the adapter kept in "
                                          "float32: steps 1.3x (tiny) to 2.4x (small) faster on a CPU with native "
                                          "bf16 (AMX or AVX512-BF16). auto = bf16 there for Whisper's sizes and on "
                                          "a GPU that has it; float32 for the tiny preset (no faster) and elsewhere.",
                                  choices=["auto", "bf16", "no"], advanced=True)

    learning_rate: float = option(1e-3, "Peak learning rate of AdamW.", min=1e-7, max=1.0)
    epochs: float = option(5.0, "Passes over the training clips (ignored when max steps is set).",
                           min=0.01, max=1000.0, step=0.5)
    batch_size: int = option(8, "Clips per forward pass. Lower it if memory runs out.", min=1, max=256, step=1)

    sample_count: int = option(3, "Clips transcribed as samples at each sample step (validation clips first).",
                               min=0, max=32, step=1)

    def extra_problems(self) -> list[tuple[str, str]]:
        problems = super().extra_problems()
        if not self.data_path.strip() and not self.data_files:
            problems.append(("data_path", "no training data given: choose a folder or zip of clips, or upload "
                                          "audio files with their transcripts"))
        if self.base_model.strip().endswith(".en"):
            if self.language != "en":
                problems.append(("language", f"{self.base_model} understands English only: pick 'en' or a "
                                             "multilingual model"))
            if self.task != "transcribe":
                problems.append(("task", f"{self.base_model} cannot translate: pick a multilingual model"))
        if self.language == "yue" and self.base_model.strip() in BASE_MODELS and \
                self.base_model.strip() not in ("large-v3", "turbo"):
            problems.append(("language", "Cantonese (yue) is known only to large-v3 and turbo"))
        return problems


CONFIG = SpeechConfig
