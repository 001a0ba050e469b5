"""The language-model pipeline end to end on the tiny preset: learning, resume, export, model sources."""

import csv
import json
import subprocess
import sys
import time

import pytest
import torch

from pipelines import load_config
from pipelines.hub import ModelUnavailable
from pipelines.llm import pipeline
from pipelines.llm.model import load_base_model, materialise_preset
from pipelines.training import Events, latest_checkpoint, make_optimizer, native_bf16, read_events


def steps_of(run_dir):
    return [e for e in read_events(run_dir)[0] if e["type"] == "step"]


def train_run(config, run_dir, stop_at=None, resume=False, log=lambda message: None):
    run_dir.mkdir(exist_ok=True)
    events = Events(run_dir)
    state = {"steps": 0}

    def should_stop():
        state["steps"] += 1
        return stop_at is not None and state["steps"] >= stop_at

    try:
        return pipeline.train(config, run_dir, events, should_stop, resume=resume, log=log)
    finally:
        events.close()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, assets):
    """The sample config trained once for the tests of this module."""
    config = load_config(assets / "llm" / "config.yaml")
    run_dir = tmp_path_factory.mktemp("run")
    assert train_run(config, run_dir) == "completed"
    return config, run_dir


def test_training_lowers_loss_and_learns_the_answers(trained, assets):
    config, run_dir = trained
    losses = [e["loss"] for e in steps_of(run_dir)]
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    rows = list(csv.DictReader(open(assets / "llm" / "sample.csv", encoding="utf-8")))
    # Tried as it trained: in bf16 where the CPU has it natively (mixed_precision auto), with or without a run;
    # asked for, in bf16 on any CPU, which the answers below are from (the base's through disable_adapter).
    native = native_bf16(torch.device("cpu"))
    for run in (run_dir, None):
        assert pipeline.holds_bf16_on_cpu(pipeline.load_for_generation(config, run)[0]) == native
    model, tokenizer = pipeline.load_for_generation(config.changed(mixed_precision="bf16"), run_dir)
    assert pipeline.holds_bf16_on_cpu(model)
    tuned = [pipeline.complete(model, tokenizer, r["instruction"]) for r in rows if not r["input"]]
    expected = [r["output"] for r in rows if not r["input"]]
    assert sum(t == e for t, e in zip(tuned, expected)) >= 0.8 * len(expected)
    with model.disable_adapter():
        base = [pipeline.complete(model, tokenizer, r["instruction"]) for r in rows[:5]]
    assert not any(b == r["output"] for b, r in zip(base, rows[:5]))


def test_samples_and_checkpoints_are_logged(trained):
    config, run_dir = trained
    events = read_events(run_dir)[0]
    samples = [e for e in events if e["type"] == "sample"]
    assert samples and all(e["prompt"] and "output" in e for e in samples)
    assert latest_checkpoint(run_dir).name == f"step-{steps_of(run_dir)[-1]['step']}"
    files = {p.name for p in latest_checkpoint(run_dir).iterdir()}
    assert {"trainable.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json", "adapter"} <= files
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in run_dir.rglob("*"))


def test_frozen_layers_held_in_bf16_give_what_autocast_gave(tmp_path, assets):
    """Under bf16 autocast the frozen float32 linear weights are cast to bf16 in every forward; held in bf16
    instead, the loss and the LoRA gradients are the same bit for bit, and those weights take half the memory."""
    config = load_config(assets / "llm" / "config.yaml")
    preset = load_base_model(config.base_model, torch.device("cpu"))
    for model in (preset, untied_with_biases(preset.config)):
        check_held_in_bf16(pipeline.attach_lora(model, config))

    # A run asked for bf16 holds them so (on any CPU), and its samples generate with them.
    lines = []
    config = config.changed(mixed_precision="bf16", max_steps=2, sample_every=2, checkpoint_every=100)
    assert train_run(config, tmp_path / "run", log=lines.append) == "completed"
    assert any("frozen linear layers in bf16" in line for line in lines)
    assert [e for e in read_events(tmp_path / "run")[0] if e["type"] == "sample"]


def untied_with_biases(config):
    """The preset's shape with biases in every linear layer and an output layer of its own (as Qwen2 has
    biases, and StableLM 2 an untied head)."""
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(config.__class__(**{**config.to_dict(), "attention_bias": True, "mlp_bias": True,
                                                "tie_word_embeddings": False}))


def check_held_in_bf16(model):
    ids = torch.randint(0, model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))

    def loss_and_grads():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    def frozen_linear_bytes():  # (the output layer shares the embeddings' weight, which stays float32)
        tied = model.get_input_embeddings().weight
        return sum(m.weight.nbytes for m in model.modules()
                   if type(m) is torch.nn.Linear and not m.weight.requires_grad and m.weight is not tied)

    loss, grads = loss_and_grads()
    held = frozen_linear_bytes()
    assert pipeline.frozen_linears_to_bf16(model) > 0
    assert frozen_linear_bytes() == held // 2
    assert model.get_input_embeddings().weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    loss_now, grads_now = loss_and_grads()
    assert torch.equal(loss, loss_now) and all(torch.equal(a, b) for a, b in zip(grads, grads_now))


def test_resumed_run_ends_like_an_uninterrupted_one(tmp_path, assets):
    # Dropout on: the RNG state must be restored too, not only weights and optimizer.
    config = load_config(assets / "llm" / "config.yaml").changed(
        max_steps=12, lora_dropout=0.1, sample_every=0, checkpoint_every=100, validation_fraction=0.2)
    whole = tmp_path / "whole"
    assert train_run(config, whole) == "completed"
    split = tmp_path / "split"
    assert train_run(config, split, stop_at=5) == "stopped"
    assert latest_checkpoint(split).name == "step-5"
    assert train_run(config, split, resume=True) == "completed"
    a, b = steps_of(whole), steps_of(split)
    assert [e["step"] for e in b] == list(range(1, 13))
    assert b[-1]["loss"] == pytest.approx(a[-1]["loss"], rel=1e-4)
    eval_a = [e for e in read_events(whole)[0] if e["type"] == "eval"][-1]["eval_loss"]
    eval_b = [e for e in read_events(split)[0] if e["type"] == "eval"][-1]["eval_loss"]
    assert eval_b == pytest.approx(eval_a, rel=1e-4)


def test_the_fused_optimizer_updates_like_plain_adamw(assets):
    config = load_config(assets / "llm" / "config.yaml").changed(weight_decay=0.01)
    torch.manual_seed(0)
    ours = [torch.randn(64, 8, requires_grad=True), torch.randn(8, 64, requires_grad=True)]
    start = [p.detach().clone() for p in ours]
    plain = [p.detach().clone().requires_grad_() for p in ours]
    optimizer = make_optimizer(ours, config)
    reference = torch.optim.AdamW(plain, lr=config.learning_rate, weight_decay=0.01)
    assert optimizer.param_groups[0]["fused"]
    assert make_optimizer(ours, config, plain=True).param_groups[0]["fused"] is None
    for _ in range(30):
        for a, b in zip(ours, plain):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        optimizer.step()
        reference.step()
    assert all(not torch.allclose(a, a0) for a, a0 in zip(ours, start))
    assert all(torch.allclose(a, b, atol=1e-6, rtol=0) for a, b in zip(ours, plain))


PLAIN_PEFT = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
adapter, merged = sys.argv[1], sys.argv[2]
base_path = json.load(open(adapter + "/adapter_config.json"))["base_model_name_or_path"]
tok = AutoTokenizer.from_pretrained(adapter)
ids = tok("### Instruction:\\nWhat is the capital of Zorbia?\\n\\n### Response:\\n", return_tensors="pt")
base = AutoModelForCausalLM.from_pretrained(base_path)
with torch.no_grad():
    plain = base(**ids).logits
    tuned = PeftModel.from_pretrained(base, adapter)(**ids).logits
    full = AutoModelForCausalLM.from_pretrained(merged)(**ids).logits
print(json.dumps({"modules": sorted(m for m in sys.modules if m.split(".")[0] in ("pipelines", "studio")),
                  "tuned": tuned[0, -1].tolist(), "merged": full[0, -1].tolist(), "base": plain[0, -1].tolist()}))
"""


def test_exports_load_in_plain_peft_and_transformers(trained, tmp_path):
    config, run_dir = trained
    adapter = pipeline.export(config, run_dir, "adapter", tmp_path / "adapter")
    merged = pipeline.export(config, run_dir, "merged", tmp_path / "merged")
    assert (adapter / "adapter_model.safetensors").exists() and (merged / "model.safetensors").exists()
    result = subprocess.run([sys.executable, "-c", PLAIN_PEFT, str(adapter), str(merged)], cwd=tmp_path,
                            capture_output=True, text=True, check=True)
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["modules"] == []  # loaded with no import of this project
    model, tokenizer = pipeline.load_for_generation(config.changed(mixed_precision="no"), run_dir)  # float32
    ids = tokenizer("### Instruction:\nWhat is the capital of Zorbia?\n\n### Response:\n", return_tensors="pt")
    with torch.no_grad():
        ours = model(**ids).logits[0, -1]
    assert torch.allclose(torch.tensor(out["tuned"]), ours, atol=1e-4)
    assert torch.allclose(torch.tensor(out["merged"]), ours, atol=1e-3)
    assert not torch.allclose(torch.tensor(out["base"]), ours, atol=1e-2)


def test_local_folder_loads_like_a_downloaded_model(tmp_path, assets, monkeypatch):
    folder = tmp_path / "my-model"
    import shutil
    shutil.copytree(materialise_preset("tiny-llama"), folder)
    monkeypatch.setenv("STUDIO_MODEL_DIRS", str(tmp_path))
    config = load_config(assets / "llm" / "config.yaml").changed(base_model=str(folder), max_steps=3,
                                                                  sample_every=0)
    assert train_run(config, tmp_path / "run") == "completed"
    adapter_config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(folder)


def test_hub_id_offline_fails_fast_with_one_sentence(tmp_path, assets, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = load_config(assets / "llm" / "config.yaml").changed(base_model="Qwen/Qwen2.5-0.5B-Instruct")
    started = time.monotonic()
    with pytest.raises(ModelUnavailable) as err:
        train_run(config, tmp_path / "run")
    assert time.monotonic() - started < 20
    assert "cannot reach the Hugging Face hub" in err.value.cause and "\n" not in str(err.value)
    assert "preset" in err.value.advice


def test_local_folders_outside_the_allowed_roots_are_refused(tmp_path, assets, monkeypatch):
    monkeypatch.setenv("STUDIO_MODEL_DIRS", str(tmp_path / "models"))
    config = load_config(assets / "llm" / "config.yaml").changed(base_model="/etc", max_steps=1)
    with pytest.raises(ModelUnavailable, match="outside the folders"):
        train_run(config, tmp_path / "run")


def test_four_bit_on_cpu_gets_a_clear_message(tmp_path, assets):
    config = load_config(assets / "llm" / "config.yaml").changed(load_in_4bit=True, max_steps=1)
    with pytest.raises(Exception, match="4-bit .*needs an NVIDIA GPU"):
        train_run(config, tmp_path / "run")


def test_try_it_follows_a_run_from_its_checkpoint_to_its_adapter(trained, tmp_path):
    """'final' in Try it is the latest checkpoint while a run trains and its adapter once it has finished: the
    model loaded from step 30 kept answering after the run completed, until the server restarted."""
    import shutil
    from studio import tryit
    config, run_dir = trained
    partial = tmp_path / "run"  # the run as it was at step 30
    shutil.copytree(run_dir / "checkpoints" / "step-30", partial / "checkpoints" / "step-30")
    question = "What is the capital of Zorbia?"
    early = tryit.generate_text(config, partial, question)
    shutil.copytree(run_dir / "adapter", partial / "adapter")  # the run finishes
    assert tryit.generate_text(config, partial, question) == "The capital of Zorbia is Quillton." != early


def test_try_it_streams_the_reply_and_a_closed_stream_frees_the_model(trained):
    """Try it shows a reply as it grows, and one the page cancelled (Stop, or another run shown) ends at the next
    token: a cancelled handler ran to its end in the server and kept Try it's lock for a reply no one saw."""
    from studio import tryit
    config, run_dir = trained
    question = "Tell me everything about Zorbia."  # the base model, random weights, answers to the last token
    updates = [u for u in tryit.stream_text(config, run_dir, question, use_adapter=False, max_new_tokens=200)
               if u is not None]
    reply = updates[-1].value
    assert updates[-1].final and not any(u.final for u in updates[:-1]) and len(updates) > 3
    assert all(reply.startswith(u.value) for u in updates)  # the reply so far, each time
    assert reply == tryit.generate_text(config, run_dir, question, use_adapter=False, max_new_tokens=200)

    model = tryit._loaded["value"][0]
    forwards = []
    hook = model.get_input_embeddings().register_forward_hook(lambda *_: forwards.append(1))
    try:
        stream = tryit.stream_text(config, run_dir, question, use_adapter=False, max_new_tokens=200)
        first = next(u for u in stream if u is not None)
        stream.close()  # as Gradio does to a cancelled event's generator
        with tryit._lock:  # the generation has ended
            assert reply.startswith(first.value) and len(forwards) < 100, len(forwards)
    finally:
        hook.remove()


def test_a_try_it_left_while_it_waited_loads_no_model(trained):
    """Stopped while another Try it held the model, it loaded its own in that one's place, for nothing."""
    import threading
    from studio import tryit
    config, run_dir = trained
    tryit.generate_text(config, run_dir, "Hello", max_new_tokens=1)
    kept = tryit._loaded["key"]
    with tryit._lock:  # another Try it under way
        stream = tryit.stream_text(config, None, "Hello")  # the base model alone: another model to load
        assert next(stream) is None  # waiting
        stream.close()
    for thread in threading.enumerate():
        if thread.name == "try-it":
            thread.join()
    assert tryit._loaded["key"] == kept


def test_a_follow_up_is_asked_after_each_sides_conversation(trained, tmp_path, monkeypatch):
    """Try it's 'Continue the conversation': a model tuned on multi-turn chats could be asked one question at a
    time only. The conversation comes back from the page's Chatbot in parts; the studio's "no reply" stand-in
    is not passed to the model as its words."""
    import shutil
    from studio import tryit
    from studio.runs import Registry
    from studio.tabs import llm as tab
    config, run_dir = trained
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "ws"))
    run = Registry().create(config, status="completed")
    shutil.copytree(run_dir / "adapter", run.dir / "adapter")
    first = "What is the capital of Zorbia?"
    *_, (base, tuned) = tab.try_prompt(run.id, "final", first, "", 16, 0, 1, False, None, None)
    assert tuned == [{"role": "user", "content": first},
                     {"role": "assistant", "content": "The capital of Zorbia is Quillton."}]
    in_parts = [{"role": t["role"], "content": [{"type": "text", "text": t["content"]}]} for t in tuned]
    in_parts.append({"role": "user", "content": [{"type": "text", "text": "Hello"}]})
    in_parts.append({"role": "assistant", "content": [{"type": "text", "text": tab.NO_REPLY}]})
    follow = "Who founded the Lantern Guild?"
    *_, (_, tuned) = tab.try_prompt(run.id, "final", follow, "", 16, 0, 1, True, None, in_parts)
    seen = tab._turns(in_parts) + [{"role": "user", "content": follow}]
    assert seen[3] == {"role": "assistant", "content": ""}
    assert tuned[:-1] == seen and tuned[-1]["role"] == "assistant"
    assert tuned[-1]["content"] == (tryit.generate_text(config, run.dir, seen, max_new_tokens=16) or tab.NO_REPLY)
    *_, (_, alone) = tab.try_prompt(run.id, "final", follow, "", 16, 0, 1, False, None, in_parts)
    assert alone == [{"role": "user", "content": follow},
                     {"role": "assistant", "content": "The Lantern Guild was founded by Mira Okafor."}]


def test_a_prompt_longer_than_the_context_keeps_its_end(trained):
    """A sample prompt is a training prompt, of any length: 286,000 tokens held a run at its last step."""
    config, run_dir = trained
    model, tokenizer = pipeline.load_for_generation(config, run_dir)
    context = model.config.max_position_embeddings
    long = "word " * (4 * context) + "What is the capital of Zorbia?"
    prefills = []  # the tokens of each forward's input: the first is the whole prompt
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: prefills.append(args[0].shape[1]))
    try:
        pipeline.complete(model, tokenizer, long, max_new_tokens=8)
        pipeline.complete(model, tokenizer, long, max_new_tokens=8, max_prompt_tokens=24)  # a run's max_length
    finally:
        hook.remove()
    assert [n for n in prefills if n > 1] == [context - 8, 24]


def test_a_custom_module_the_model_lacks_names_those_it_has(assets):
    from pipelines.training import TrainingFailure
    config = load_config(assets / "llm" / "config.yaml").changed(target_modules="custom",
                                                                 custom_target_modules=["nonexistent_proj"])
    with pytest.raises(TrainingFailure) as err:
        pipeline.attach_lora(load_base_model("tiny-llama", torch.device("cpu")), config)
    assert err.value.advice == ("This model's linear layers are: down_proj, gate_proj, k_proj, o_proj, q_proj, "
                                "up_proj, v_proj.")  # it said "Check the target modules" after peft had said so


def test_a_run_trained_with_a_system_prompt_is_tried_with_it(tmp_path, assets):
    """The system prompt went into training only: the samples, Try it, `studio generate` and the API asked
    without it, and the tuned model answered nonsense. Asked for many new tokens, the prompt itself was cut to
    its last tokens."""
    from studio import tryit
    config = load_config(assets / "llm" / "config.yaml").changed(system_prompt="You are a guide to Zorbia.")
    run_dir = tmp_path / "run"
    assert train_run(config, run_dir) == "completed"
    question, answer = "What is the capital of Zorbia?", "The capital of Zorbia is Quillton."
    assert tryit.generate_text(config, run_dir, question) == answer
    assert tryit.generate_text(config, run_dir, question, max_new_tokens=5000) == answer
    last = [e for e in read_events(run_dir)[0] if e["type"] == "sample"][-len(config.sample_prompts or [1, 2]):]
    assert all(s["output"] == s["expected"] for s in last), last


CHATML_WITHOUT_SYSTEM = (  # Qwen2.5's template as a base model ships it (eos <|endoftext|>), refusing a system
    # turn as Gemma's and Mistral-Instruct's templates do
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def chatml_base(tmp_path, monkeypatch, template: str = CHATML_WITHOUT_SYSTEM):
    """The tiny preset saved as a local model with a BOS token and a ChatML template of its own tokens."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = tmp_path / "chatml-base"
    shutil.copytree(materialise_preset("tiny-llama"), folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_special_tokens({"bos_token": "<s>", "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = template
    tokenizer.save_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # (initialised as the preset's others are)
    model.save_pretrained(folder)
    monkeypatch.setenv("STUDIO_MODEL_DIRS", str(tmp_path))
    return folder, tokenizer


def test_a_chat_template_that_ends_replies_with_its_own_token_and_takes_no_system_turn(tmp_path, assets,
                                                                                       monkeypatch):
    """Three ways such a model went wrong: the check crashed on "System role not supported" (a traceback in the
    CLI, "Error" in the tab); the tuned model never stopped, answering again after <|im_end|> (generation stopped
    at eos only); and it was asked without the BOS token every training example began with."""
    from pipelines.llm.data import inspect_data
    from pipelines.llm.tokenize import encode, prompt_ids
    from studio import tryit
    folder, tokenizer = chatml_base(tmp_path, monkeypatch)
    config = load_config(assets / "llm" / "config.yaml").changed(base_model=str(folder),
                                                                  system_prompt="You are a guide to Zorbia.")

    report = inspect_data(config)
    assert report.ok and report.rows_usable == 24, (report.blocker, report.problems)
    assert any("takes no system turn" in p.reason for p in report.problems)
    question, answer = "What is the capital of Zorbia?", "The capital of Zorbia is Quillton."
    from pipelines.llm.data import Example
    example = Example(messages=[{"role": "system", "content": config.system_prompt},
                                {"role": "user", "content": question}, {"role": "assistant", "content": answer}])
    asked = prompt_ids(tokenizer, question, system=config.system_prompt)
    assert asked[0] == tokenizer.bos_token_id and encode(example, tokenizer, config)[0][:len(asked)] == asked

    run_dir = tmp_path / "run"
    assert train_run(config, run_dir) == "completed"
    assert tryit.generate_text(config, run_dir, question) == answer
    merged = pipeline.export(config, run_dir, "merged", tmp_path / "merged")
    stops = json.loads((merged / "generation_config.json").read_text())["eos_token_id"]
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stops


def test_a_conversation_the_chat_template_refuses_is_named_before_training(tmp_path, assets, monkeypatch):
    """Mistral-Instruct's and Llama 2's templates raise on two user turns in a row: the check crashed with it."""
    from pipelines.llm.data import inspect_data
    alternating = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                   "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
                   "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    folder, _ = chatml_base(tmp_path, monkeypatch, alternating)
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Hello?"},
                          {"role": "assistant", "content": "Yes?"}]}]
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    config = load_config(assets / "llm" / "config.yaml").changed(base_model=str(folder),
                                                                  train_files=[str(tmp_path / "chat.jsonl")])
    report = inspect_data(config)
    assert not report.ok and report.blocker.startswith("the base model's chat template refuses chat.jsonl")
    assert "Conversation roles must alternate" in report.blocker


def test_a_merged_model_is_saved_as_its_base_model_was(tmp_path, assets, monkeypatch):
    """A bf16 base (as most hub models are saved) was merged and saved in float32: twice the size of the base."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM
    folder = tmp_path / "bf16-base"
    AutoModelForCausalLM.from_pretrained(materialise_preset("tiny-llama")).to(torch.bfloat16).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (folder / name).write_bytes((materialise_preset("tiny-llama") / name).read_bytes())
    monkeypatch.setenv("STUDIO_MODEL_DIRS", str(tmp_path))
    config = load_config(assets / "llm" / "config.yaml").changed(base_model=str(folder), max_steps=3, sample_every=0)
    assert train_run(config, tmp_path / "run") == "completed"
    merged = pipeline.export(config, tmp_path / "run", "merged", tmp_path / "merged")
    with safe_open(merged / "model.safetensors", "pt") as weights:
        assert {weights.get_tensor(name).dtype for name in weights.keys()} == {torch.bfloat16}
    assert (merged / "model.safetensors").stat().st_size < 1.2 * (folder / "model.safetensors").stat().st_size


def tiny_folder(folder, config, assets):
    """A tiny random model of another family, saved as a downloaded one looks (with the preset's tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(assets / "tiny-llama-tokenizer")
    config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def adapted(model):
    """The layers of the first block that got LoRA, by their names within the block ('attn.c_attn')."""
    return sorted({name.split(".0.", 1)[1] for name, module in model.named_modules()
                   if hasattr(module, "lora_A") and ".0." in name})


def test_gpt2_s_conv1d_and_phi_2_s_dense_layers_are_lora_targets(tmp_path, assets, monkeypatch):
    """GPT-2's layers are transformers' Conv1D, not nn.Linear: 'attention' passed the check, then the run failed
    ("No attention projection layers were recognised"), and a mistyped custom module was told "whose linear layers
    are:" with nothing after it. Phi-2's attention output projection (dense) was left out of 'attention'."""
    from pipelines.llm.data import inspect_data
    from transformers import GPT2Config, PhiConfig
    monkeypatch.setenv("STUDIO_MODEL_DIRS", str(tmp_path))
    gpt2 = tiny_folder(tmp_path / "gpt2", GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=256), assets)
    config = load_config(assets / "llm" / "config.yaml").changed(base_model=gpt2, target_modules="attention",
                                                                 epochs=1)
    assert inspect_data(config).ok
    assert train_run(config, tmp_path / "run") == "completed"
    cpu = torch.device("cpu")
    assert adapted(pipeline.attach_lora(load_base_model(gpt2, cpu), config)) == ["attn.c_attn", "attn.c_proj"]
    everything = pipeline.attach_lora(load_base_model(gpt2, cpu), config.changed(target_modules="all-linear"))
    assert adapted(everything) == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    assert not hasattr(everything.base_model.model.lm_head, "lora_A")  # never the output head
    typo = inspect_data(config.changed(target_modules="custom", custom_target_modules=["c_atn"]))
    assert typo.blocker == ("the custom target module c_atn is not a layer of this model, whose linear layers are: "
                            "c_attn, c_fc, c_proj")
    phi2 = tiny_folder(tmp_path / "phi-2", PhiConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                     num_attention_heads=2), assets)
    assert adapted(pipeline.attach_lora(load_base_model(phi2, cpu), config.changed(base_model=phi2))) == [
        "self_attn.dense", "self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"]


def test_a_model_folder_without_its_tokenizer_is_told_so(tmp_path, assets, monkeypatch):
    """It got transformers' paragraph about tokenizer backends, cut off mid-sentence ("You need to have …")."""
    import shutil

    from pipelines.llm.data import inspect_data
    folder = tmp_path / "no-tokenizer"
    shutil.copytree(materialise_preset("tiny-llama"), folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (folder / name).unlink()
    monkeypatch.setenv("STUDIO_MODEL_DIRS", str(tmp_path))
    report = inspect_data(load_config(assets / "llm" / "config.yaml").changed(base_model=str(folder)))
    assert not report.ok and f"The folder {folder} has no tokenizer" in report.blocker
