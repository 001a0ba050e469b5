"""Language-model LoRA: train, generate, export. Reads like a recipe: load, attach LoRA, hand the loop a task."""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from pathlib import Path
from typing import Callable

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

from pipelines.llm import attention
from pipelines.llm.compiled import compile_layers, compiled
from pipelines.llm.config import LLMConfig
from pipelines.llm.data import load_examples
from pipelines.llm.loss import output_layer, reply_loss, with_reply_positions
from pipelines.llm.model import (base_location, builtin_base, linear_layer_names, load_base_model, load_model_config,
                                 load_tokenizer, lora_targets)
from pipelines.llm.tokenize import collate, counted_tokens, encode, keeps_a_reply, prompt_ids, reply_stop_ids
from pipelines.training import (Events, TrainingFailure, TrainingTask, adapter_dir, iterate_in_batches, require_data,
                                native_bf16, pick_device, run_training, seed_everything, shuffled)


def attach_lora(model: torch.nn.Module, config: LLMConfig) -> torch.nn.Module:
    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=lora_targets(model, config.target_modules, config.custom_target_modules),
                      use_dora=config.use_dora, use_rslora=config.use_rslora, task_type="CAUSAL_LM")
    if config.load_in_4bit:
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(model)
    try:
        return get_peft_model(model, lora)
    except ValueError as err:  # a custom module name the model lacks: name the ones it has
        raise TrainingFailure(f"LoRA could not be attached: {err}",
                              f"This model's linear layers are: {', '.join(linear_layer_names(model))}.") from None


def holds_bf16_on_cpu(model: torch.nn.Module) -> bool:
    """Whether this CPU model holds layers in bf16 (frozen_linears_to_bf16), so runs under bf16 autocast."""
    return model.device.type == "cpu" and any(p.dtype == torch.bfloat16 for p in model.parameters())


def frozen_linears_to_bf16(model: torch.nn.Module) -> int:
    """Under bf16 autocast every forward casts each frozen float32 linear weight to bf16, and keeps that copy
    for the backward: held in bf16 from the start, the products are the same, bit for bit, in half the memory
    and without the casts. The embeddings, the norms, a tied output layer and whatever trains (the LoRA)
    stay float32, as autocast keeps them; the frozen ones are then copied out of the loaded file's memory
    map, so that the map (all of it read by now, and counted as the process's memory) is let go. Only for
    transformers' own model classes (remote code may read a weight's dtype). Returns how many layers it
    changed."""
    base = builtin_base(model)
    if base is None:
        return 0
    tied = base.get_input_embeddings().weight
    changed = 0
    for module in base.modules():
        if type(module) is torch.nn.Linear and not module.weight.requires_grad and module.weight is not tied:
            module.weight.data = module.weight.data.to(torch.bfloat16)
            if module.bias is not None:
                module.bias.data = module.bias.data.to(torch.bfloat16)
            changed += 1
    if changed:
        for p in base.parameters():
            if p.dtype == torch.float32 and not p.requires_grad:
                p.data = p.data.clone()
    return changed


def train(config: LLMConfig, run_dir: str | Path, events: Events, should_stop: Callable[[], bool],
          resume: bool = False, log: Callable[[str], None] = print) -> str:
    run_dir = Path(run_dir)
    device = pick_device(config.device)
    report, train_examples, validation_examples = load_examples(config)
    require_data(report, train_examples, "row", log)

    log(f"Loading {config.base_model} on {device.type}.")
    tokenizer = load_tokenizer(config.base_model, config.trust_remote_code)
    seed_everything(config.seed)  # LoRA's initial weights depend on it
    model = attach_lora(load_base_model(config.base_model, device, trust_remote_code=config.trust_remote_code,
                                        load_in_4bit=config.load_in_4bit), config)
    model.config.use_cache = False
    trainable, total = model.get_nb_trainable_parameters()
    log(f"LoRA adds {trainable:,} trainable parameters to {total - trainable:,} frozen ones.")
    bf16 = config.bf16_products(native_bf16(device))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else None
    log(f"Training with {'bf16 autocast' if bf16 else 'float32'} matrix products on {device.type}.")
    if bf16 and device.type == "cpu" and config.holds_frozen_bf16():  # (a GPU loads the model in bf16 already)
        stored = frozen_linears_to_bf16(model)
        if stored:
            log(f"Holding the {stored} frozen linear layers in bf16 (what autocast computes with): half their memory.")

    whole = [encode(e, tokenizer, config) for e in train_examples]  # (tokenised once, then cut at max_length)
    truncated = sum(len(ids) > config.max_length for ids, _ in whole)
    if truncated:
        log(f"{truncated} examples are longer than {config.max_length} tokens and were truncated.")
    encoded = [(ids[:config.max_length], labels[:config.max_length]) for ids, labels in whole
               if keeps_a_reply(labels, config.max_length)]
    if len(encoded) < len(whole):
        log(f"{len(whole) - len(encoded)} examples keep no reply token within {config.max_length} tokens: skipped.")
    if not encoded:
        raise TrainingFailure("After truncation no example has any response token left to learn from.",
                              "Raise the max length.")
    validation = [encode(e, tokenizer, config, truncate=True) for e in validation_examples]
    pad_id = tokenizer.pad_token_id
    # Packed examples attend example by example where that is exact (pipelines/llm/attention.py); then the
    # whole batch is one row. Otherwise rows are bounded, as the model's masked attention costs the square.
    by_example = config.packing and attention.supports(model)
    row_length = sys.maxsize if by_example else config.max_length
    if by_example:
        log("Packing each batch into one row; attention runs example by example.")
    layers = []
    if config.torch_compile:
        if by_example and config.world_size == 1 and not config.load_in_4bit:
            layers = compile_layers(model, device, log)
        else:
            log("Not compiling: torch.compile is set up here for single-process runs of the models that pack "
                "example by example, without 4-bit loading.")

    def batches_for_epoch(epoch: int) -> list[dict]:
        order = shuffled(encoded, config.seed, epoch)
        return [collate(group, pad_id, config.packing, row_length)
                for group in iterate_in_batches(order, config.batch_size)]

    pinned = device.type == "cuda"  # a copy from page-locked memory does not wait for the GPU's queue
    # The loss from the replies' hidden states without the [tokens, vocabulary] logits (pipelines/llm/loss.py),
    # for the architectures where that is exact; not under ZeRO-3, whose processes hold slices of lm_head.
    fused = None if config.world_size > 1 and config.strategy == "zero3" else output_layer(model)
    if fused:
        log("Computing the loss over the reply tokens only, in chunks, without the full logits.")

    def forward(batch: dict) -> torch.Tensor:
        batch = with_reply_positions(batch) if fused else batch
        batch = attention.with_example_lengths(batch) if by_example else batch
        batch = {k: (v.pin_memory() if pinned else v).to(device, non_blocking=pinned)
                 if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with autocast or contextlib.nullcontext(), \
                attention.each_example(model) if by_example else contextlib.nullcontext(), compiled(layers):
            return reply_loss(*fused, batch) if fused else model(**batch, use_cache=False).loss

    def loss_on(batch: dict) -> tuple[torch.Tensor, int]:
        return forward(batch), counted_tokens(batch)

    def evaluate() -> dict[str, float]:
        if not validation:
            return {}
        total_loss, total_tokens = 0.0, 0
        for group in iterate_in_batches(validation, config.batch_size):
            batch = collate(group, pad_id, config.packing, row_length)
            n = counted_tokens(batch)
            if n:
                total_loss += forward(batch).item() * n
                total_tokens += n
        mean = total_loss / max(1, total_tokens)
        return {"eval_loss": mean, "eval_perplexity": float(torch.exp(torch.tensor(min(mean, 50.0))))}

    # A sample prompt of the settings gets the system prompt, as training did; one from the data is its
    # example's whole conversation (its own system turn and earlier turns): asked without them, a model
    # trained with them answered garbage, in the samples as in Try it.
    answers = {e.prompt: e.answer for e in train_examples}
    prompts = ([(p, p, answers.get(p, "")) for p in config.sample_prompts]
               or [(e.prompt, e.context, e.answer) for e in train_examples[:2] if e.messages])

    def make_samples() -> list[dict]:
        # (the prompt as trained: its end, within max_length; shown shortened in the events and the UI)
        return [{"prompt": shown if len(shown) <= 500 else shown[:500] + " …",
                 "output": complete(model, tokenizer, asked, max_new_tokens=config.sample_max_new_tokens,
                                    system=config.system_prompt, synced=config.splits_weights,
                                    max_prompt_tokens=config.max_length),
                 "expected": expected} for shown, asked, expected in prompts]

    def save_adapter(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        _point_adapter_at_base(folder, config.base_model)
        tokenizer.save_pretrained(folder)

    task = TrainingTask(model=model, batches_for_epoch=batches_for_epoch, loss_on=loss_on, save_adapter=save_adapter,
                        unit="tokens", evaluate=evaluate if validation else None,
                        make_samples=make_samples if prompts else None,
                        # a GPU without bf16 holds the frozen weights in fp16 (load_base_model)
                        fp16=any(p.dtype == torch.float16 for p in model.parameters() if not p.requires_grad))
    events.emit("data", rows=len(encoded), validation_rows=len(validation), format=report.format)
    return run_training(task, config, run_dir, events, should_stop, resume=resume, log=log)


def _point_adapter_at_base(folder: Path, base_model: str) -> None:
    """Make adapter_config.json name a base that plain peft can load: the preset's materialised folder,
    the local folder, or the hub id."""
    path = folder / "adapter_config.json"
    data = json.loads(path.read_text())
    data["base_model_name_or_path"] = base_location(base_model)
    path.write_text(json.dumps(data, indent=2))


# ---- using a trained run ---------------------------------------------------------------------


def load_for_generation(config: LLMConfig, run_dir: str | Path | None, checkpoint: str | None = None):
    """(model, tokenizer). With a run, the model carries its adapter; `model.disable_adapter()` gives the base.
    Where the run trained in bf16 on the CPU, its layers are held in bf16 (about half the memory, 1.5x to 1.9x
    float32's tokens/s for a 0.6 B model), so a forward must run under bf16 autocast, as complete() does."""
    device = pick_device(config.device)
    tokenizer = load_tokenizer(config.base_model, config.trust_remote_code)
    model = load_base_model(config.base_model, device, trust_remote_code=config.trust_remote_code)
    if run_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir(run_dir, checkpoint))
    model.requires_grad_(False)  # nothing trains here, the adapter included
    if device.type == "cpu" and config.bf16_products(native_bf16(device)) and not config.use_dora:
        frozen_linears_to_bf16(model)  # (the adapter's layers too: under autocast that computes the same)
    model.eval()
    return model, tokenizer


@torch.no_grad()
class _ReplySoFar(TextStreamer):
    """Tells `on_text` the whole reply so far each time a word or a line of it is complete (TextStreamer holds
    back the rest: a token can end halfway through a character)."""

    def __init__(self, tokenizer, on_text: Callable[[str], None]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.on_text, self.reply = on_text, ""

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.reply += text
        self.on_text(self.reply.strip())


class _WhenAsked(StoppingCriteria):
    def __init__(self, should_stop: Callable[[], bool]):
        self.should_stop = should_stop

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.should_stop(), dtype=torch.bool, device=input_ids.device)


def complete(model, tokenizer, prompt: str | list[dict], *, max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, chat: bool = True, seed: int = 0, synced: bool = False, system: str = "",
             max_prompt_tokens: int | None = None, on_text: Callable[[str], None] | None = None,
             should_stop: Callable[[], bool] | None = None) -> str:
    """Generate a reply. A string prompt is one user turn, after the `system` turn when there is one (as the
    run trained); a list is a whole conversation. `synced`: every process of a run generates together
    (transformers' synced_gpus). The context is shared: a prompt keeps its end, at most what max_new_tokens
    leaves of the context but never less than half of it (a large max_new_tokens cut a short prompt down to
    its last tokens, and the reply was nonsense), nor more than `max_prompt_tokens` (a 286,000-token training
    row as a sample prompt held a finished run at its last step, generating); the reply gets the rest.
    `on_text` is told the reply so far as it grows, and `should_stop` is asked after each token: Try it shows
    the reply as it comes, and ends it when the user leaves (a 512-token reply on a CPU takes minutes)."""
    ids = torch.tensor([prompt_ids(tokenizer, prompt, chat, system)])
    inputs = {"input_ids": ids.to(model.device), "attention_mask": torch.ones_like(ids).to(model.device)}
    context = getattr(model.config, "max_position_embeddings", None) or 2048
    keep = min(inputs["input_ids"].shape[1], max(context - max_new_tokens, context // 2), max_prompt_tokens or context)
    inputs = {name: value[:, -keep:] for name, value in inputs.items()}
    max_new_tokens = max(1, min(max_new_tokens, context - keep))
    sampling = temperature > 0
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16) if holds_bf16_on_cpu(model) else contextlib.nullcontext():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=sampling,
                                    temperature=temperature if sampling else None, top_p=top_p if sampling else None,
                                    top_k=None, pad_token_id=tokenizer.pad_token_id,
                                    eos_token_id=reply_stop_ids(tokenizer) or None, synced_gpus=synced,
                                    streamer=_ReplySoFar(tokenizer, on_text) if on_text else None,
                                    stopping_criteria=StoppingCriteriaList([_WhenAsked(should_stop)] if should_stop
                                                                           else []))
    finally:
        torch.random.set_rng_state(generator_state)  # sampling must not shift the training run's randomness
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def _saved_dtype(config: LLMConfig) -> torch.dtype | None:
    """The dtype the base model's weights are stored in, as its config.json says (None where it says none)."""
    try:
        stored = load_model_config(config.base_model, config.trust_remote_code).dtype
    except Exception:  # (a config transformers cannot read: the float32 of the merge stays)
        return None
    return getattr(torch, stored) if isinstance(stored, str) else stored


def export(config: LLMConfig, run_dir: str | Path, kind: str, destination: str | Path,
           checkpoint: str | None = None) -> Path:
    """kind "adapter": the peft adapter folder; "merged": a full transformers model with its tokenizer."""
    destination = Path(destination)
    source = adapter_dir(run_dir, checkpoint)
    if kind == "adapter":
        shutil.copytree(source, destination, dirs_exist_ok=True)
        return destination
    if kind != "merged":
        raise ValueError(f"unknown export kind {kind!r}")
    model, tokenizer = load_for_generation(config.changed(device="cpu", mixed_precision="no"), run_dir, checkpoint)
    merged = model.merge_and_unload()  # in float32, then saved as the base model's weights are (a bf16 base's
    # merged copy was twice its size)
    saved_as = _saved_dtype(config)
    if saved_as in (torch.bfloat16, torch.float16):
        merged = merged.to(saved_as)
    # generate() there stops where the studio's does: at the end of a reply as the chat template ends it
    merged.generation_config.eos_token_id = reply_stop_ids(tokenizer) or merged.generation_config.eos_token_id
    merged.save_pretrained(destination, safe_serialization=True)
    tokenizer.save_pretrained(destination)
    return destination
