"""Settings of a language-model LoRA run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pipelines.config import RunConfig, option

DATA_FORMATS = ["auto", "alpaca", "prompt_completion", "chat", "text"]
TARGETS = {
    "attention": "Attention projections only (q, k, v, o): smallest adapter.",
    "all-linear": "Every linear layer but the output head: learns the most.",
    "custom": "The module names listed in 'custom target modules'.",
}


@dataclass
class LLMConfig(RunConfig):
    modality: ClassVar[str] = "llm"
    path_fields: ClassVar[tuple[str, ...]] = ("train_files", "validation_files", "strategy_config")
    training_only: ClassVar[tuple[str, ...]] = (*RunConfig.training_only, "load_in_4bit")  # (the pre-flight reads it)

    base_model: str = option("tiny-llama", "Built-in preset, Hugging Face hub id (e.g. Qwen/Qwen2.5-0.5B-Instruct) "
                                           "or a local folder in transformers format.")
    trust_remote_code: bool = option(False, "Run Python code that ships with a hub model. Only for models you trust.",
                                     advanced=True)
    load_in_4bit: bool = option(False, "QLoRA: load the base model in 4 bits (needs an NVIDIA GPU and bitsandbytes).")

    train_files: list[str] = option([], "Training data: CSV, JSONL, JSON, Parquet or Excel (.xlsx, .xlsm) files.")
    validation_files: list[str] = option([], "Optional validation files; otherwise a fraction of the training rows.")
    validation_fraction: float = option(0.1, "Share of training rows held out for validation when no validation "
                                             "file is given.", min=0.0, max=0.5, step=0.05)
    data_format: str = option("auto", "Shape of each row: auto-detect, alpaca (instruction/input/output), "
                                      "prompt_completion, chat (messages list) or text.", choices=DATA_FORMATS)
    prompt_column: str = option("", "Column holding the instruction or prompt (empty = detect).", advanced=True)
    input_column: str = option("", "Optional column with extra input for the instruction (alpaca).", advanced=True)
    response_column: str = option("", "Column holding the answer (empty = detect).", advanced=True)
    text_column: str = option("", "Column holding plain text, for the text format (empty = detect).", advanced=True)
    messages_column: str = option("", "Column holding chat messages, for the chat format (empty = detect).",
                                  advanced=True)
    system_prompt: str = option("", "Optional system message put before every example.")
    train_on: str = option("responses", "Which tokens the loss counts: the responses only, or all tokens.",
                           choices=["responses", "all"])
    max_length: int = option(512, "Longest example in tokens; longer ones are truncated.", min=16, max=32768, step=16)
    mixed_precision: str = option("auto", "bf16 autocast for the frozen model's matrix products, the adapter kept "
                                          "in float32, on a CPU the frozen linear layers held in bf16 (half their "
                                          "memory; not with DoRA, fsdp or zero): "
                                          "about 2x faster where the hardware has native bf16 (NVIDIA "
                                          "Ampere or newer; CPUs with AMX or AVX512-BF16: Intel Xeon since Cooper Lake, "
                                          "AMD since Zen 4). auto = bf16 there, "
                                          "float32 elsewhere; no = no autocast (a GPU still holds the frozen weights in "
                                          "half precision).",
                                  choices=["auto", "bf16", "no"], advanced=True)
    packing: bool = option(True, "Pack several short examples into one row with no padding (faster; "
                                 "examples never attend to each other).", advanced=True)
    torch_compile: bool = option(False, "Compile the model's layers with torch.compile: on a CPU each step was "
                                        "about 5% faster and peak memory a quarter lower, after a first step that "
                                        "takes 10-60 s longer. Pays on runs of a few hundred steps. Single-process "
                                        "runs of the models that pack example by example (Llama, Qwen, Mistral, "
                                        "Phi-3, Gemma, OLMo, SmolLM3).",
                                 advanced=True)

    target_modules: str = option("all-linear", "Which layers get LoRA adapters.", choices=list(TARGETS))
    custom_target_modules: list[str] = option([], "Module names for the custom choice, e.g. q_proj, v_proj.",
                                              advanced=True)
    use_dora: bool = option(False, "DoRA: weight-decomposed LoRA. Often better, a little slower.")
    use_rslora: bool = option(False, "rsLoRA: scale by alpha/sqrt(r), steadier at high ranks.")

    sample_prompts: list[str] = option([], "Prompts generated from while training (empty = the first training "
                                           "prompts).", one_per_line=True)
    sample_max_new_tokens: int = option(48, "Tokens to generate per sample.", min=1, max=2048, advanced=True)

    def bf16_products(self, native_bf16: bool) -> bool:
        """Whether the run's matrix products are bf16, given whether this hardware has bf16 natively
        (pipelines.training.native_bf16; the UI, which imports no torch, reads the CPU's flags)."""
        return self.mixed_precision == "bf16" or (self.mixed_precision == "auto" and native_bf16)

    def holds_frozen_bf16(self) -> bool:
        """Whether, under bf16 on a CPU, the frozen linear layers can be held in bf16: not with DoRA, which
        reads the frozen weight itself, nor where fsdp or zero flatten each block's weights into one dtype."""
        return not self.use_dora and (self.world_size == 1 or self.strategy == "ddp")

    def extra_problems(self) -> list[tuple[str, str]]:
        problems = super().extra_problems()
        if not self.train_files:
            problems.append(("train_files", "no training file given"))
        if self.target_modules == "custom" and not self.custom_target_modules:
            problems.append(("custom_target_modules", "is empty but target modules is 'custom'"))
        if self.load_in_4bit and self.strategy != "ddp":
            problems.append(("strategy", "cannot split a 4-bit base model: use ddp with 4-bit loading"))
        return problems


CONFIG = LLMConfig

# Models offered in the UI's dropdown: (hub id or preset, parameters in billions). Any other hub id or a
# local folder can be typed in as well.
KNOWN_MODELS = [
    ("tiny-llama", 0.001),
    ("meta-llama/Llama-3.2-1B-Instruct", 1.24),
    ("meta-llama/Llama-3.2-3B-Instruct", 3.21),
    ("Qwen/Qwen2.5-0.5B-Instruct", 0.49),
    ("Qwen/Qwen2.5-1.5B-Instruct", 1.54),
    ("HuggingFaceTB/SmolLM2-360M-Instruct", 0.36),
    ("HuggingFaceTB/SmolLM2-1.7B-Instruct", 1.71),
    ("stabilityai/stablelm-2-1_6b", 1.64),
    ("TinyLlama/TinyLlama-1.1B-Chat-v1.0", 1.10),
]
