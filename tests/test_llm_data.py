"""The data check: every shape it recognises, and every bad file gets a message naming file, row and reason."""

import dataclasses
import json
import zipfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.llm.config import LLMConfig
from pipelines.llm.data import inspect_data, load_examples
from pipelines.llm.model import load_tokenizer
from pipelines.llm.tokenize import IGNORE, encode


def check(tmp_path, name, content, **settings):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return inspect_data(LLMConfig(train_files=[str(path)], validation_fraction=0.0, **settings))


@pytest.mark.parametrize("name, content, fmt, usable", [
    ("alpaca.csv", "instruction,input,output\nSay hi,,hi\nAdd,1 and 2,3\n", "alpaca", 2),
    ("qa.csv", "question,answer\nWho?,Me.\nWhere?,Here.\n", "prompt_completion", 2),
    ("pc.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n', "prompt_completion", 2),
    ("text.jsonl", '{"text": "once upon a time"}\n', "text", 1),
    ("chat.jsonl", json.dumps({"messages": [{"role": "user", "content": "hi"},
                                            {"role": "assistant", "content": "hello"}]}) + "\n", "chat", 1),
    ("sharegpt.json", json.dumps([{"conversations": [{"from": "human", "value": "hi"},
                                                     {"from": "gpt", "value": "yo"}]}]), "chat", 1),
    ("wrapped.json", json.dumps({"data": [{"instruction": "x", "output": "y"}]}), "alpaca", 1),
    ("semicolon.csv", "instruction;output\nSay hi;hi\nSay bye;bye\n", "alpaca", 2),
    ("tabs.tsv", "prompt\tresponse\nSay hi\thi\n", "prompt_completion", 1),
])
def test_recognised_shapes(tmp_path, name, content, fmt, usable):
    report = check(tmp_path, name, content)
    assert (report.format, report.rows_usable) == (fmt, usable), report.problems
    assert report.stats["tokens_max"] > 0


def test_parquet_and_explicit_column_mapping(tmp_path):
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"q": ["one", "two"], "a": ["1", "2"]}), path)
    auto = inspect_data(LLMConfig(train_files=[str(path)], validation_fraction=0.0))
    assert auto.rows_usable == 0 and "no known columns" in str(auto.problems[0])
    mapped = inspect_data(LLMConfig(train_files=[str(path)], validation_fraction=0.0, data_format="prompt_completion",
                                    prompt_column="q", response_column="a"))
    assert mapped.rows_usable == 2 and mapped.mapping == {"prompt": "q", "response": "a"}
    # a column named in the settings that the file lacks (a config made for other data) is named as such
    stale = inspect_data(LLMConfig(train_files=[str(path)], validation_fraction=0.0, prompt_column="q",
                                   response_column="output"))
    assert stale.rows_usable == 0 and stale.problems[0].reason == (
        "the response column 'output' set in the settings is not in this file, whose columns are ['q', 'a']: "
        "choose others, or leave them empty to detect them")
    # a format chosen by hand that the file does not fit is reported, file by file (it raised a KeyError)
    for fmt, column in (("chat", "messages"), ("text", "text")):
        unfit = inspect_data(LLMConfig(train_files=[str(path)], validation_fraction=0.0, data_format=fmt))
        assert unfit.rows_usable == 0 and str(unfit.problems[0]) == (
            f"data.parquet: the {fmt} format needs a {column} column, and none was found among ['q', 'a']: "
            "map the columns yourself, or choose another format")


BAD = [
    ("empty.csv", b"", "the file is empty", None),
    ("header.csv", "instruction,output\n", "has a header row but no data rows", None),
    ("blankrows.csv", 'instruction,output\n,\n"",""\n', "has a header row but no data rows, only 2 empty ones",
     None),
    ("ragged.csv", "instruction,output\na,b\nc,d,e\nf,g\n", "has 3 fields but the header has 2", 3),
    ("unclosed.csv", "instruction,output\na,b\n\"c,d\ne,f\ng,h\n",
     "a quote opened in this row is never closed, so the 2 lines after it were read as one cell", 3),
    ("lastquote.csv", 'instruction,output\na,b\n"c,d\n', "a quote opened in this row is never closed: close it", 3),
    ("garbage.csv", bytes(range(256)) * 40, "looks like a binary file", None),
    ("cyrillic.csv", "instruction,output\nКак дела у тебя сегодня?,Хорошо, спасибо.\n".encode("cp1251"),
     "is not UTF-8 text", None),
    ("broken.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": "c", \n', "is not valid JSON", 2),
    ("list.jsonl", '[1, 2]\n', "is a JSON list, not an object", 1),
    ("broken.json", '[{"prompt": "a"', "is not valid JSON", None),
    ("wrongcols.csv", "foo,bar\n1,2\n", "no known columns among ['foo', 'bar']", None),
    ("emptyanswer.csv", "instruction,output\nSay hi,\nSay bye,bye\n", "the 'output' column is empty", 2),
    ("noassistant.jsonl", json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n",
     "no assistant message", 1),
    ("badrole.jsonl", json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}) + "\n", "unknown role", 1),
    ("notes.txt", "hello", "unsupported file type '.txt'", None),
    ("blank.jsonl", "\n\n  \n", "only blank space", None),
]


@pytest.mark.parametrize("name, content, message, row", BAD, ids=[b[0] for b in BAD])
def test_bad_files_are_reported_not_raised(tmp_path, name, content, message, row):
    report = check(tmp_path, name, content)
    matching = [p for p in report.problems if message in p.reason]
    assert matching, [str(p) for p in report.problems]
    assert matching[0].file == name and matching[0].row == row


def test_rows_that_cannot_be_read_count_as_dropped(tmp_path):
    """A row with a stray delimiter, or a JSON line that is not an object, is found and dropped: '3 of 5' for a
    file of 7 data rows said otherwise."""
    ragged = check(tmp_path, "ragged.csv", "instruction,output\na,b\nc,d,e\nf,g\n")
    assert ragged.summary() == "2 of 3 rows usable (alpaca); 1 row dropped"
    lines = check(tmp_path, "lines.jsonl", '{"prompt": "a", "completion": "b"}\n[1, 2]\n{"prompt": "c", \n')
    assert lines.summary() == "1 of 3 rows usable (prompt_completion); 2 rows dropped"
    # a quote never closed: the lines it swallowed are rows lost too ('1 of 2 rows usable' for 4 data rows)
    unclosed = check(tmp_path, "unclosed.csv", "instruction,output\na,b\n\"c,d\ne,f\ng,h\n")
    assert unclosed.summary() == "1 of 4 rows usable (alpaca); 3 rows dropped"
    one_line = check(tmp_path, "one.csv", "instruction,output\na,b\n\"c,d\ne,f\n")
    assert one_line.summary() == "1 of 3 rows usable (alpaca); 2 rows dropped"
    assert "so the line after it was read as one cell" in one_line.problems[0].reason


def test_columns_without_a_name_are_left_out_not_refused(tmp_path):
    """pandas writes its index as a first column with no name, Excel empty columns at the end: the file was
    refused for them ('empty or repeated column names')."""
    pandas = check(tmp_path, "pandas.csv", ",instruction,output\n0,Q1,A1\n1,Q2,A2\n")
    assert pandas.rows_usable == 2 and [str(p) for p in pandas.problems] == [
        "pandas.csv: column 1 of the header has no name: ignored"]
    excel = check(tmp_path, "excel.csv", "instruction,output,,\nQ1,A1,,\nQ2,A2,,\n")
    assert excel.rows_usable == 2 and excel.columns == ["instruction", "output"]


def test_an_input_column_the_chosen_format_leaves_out_is_said(assets):
    report = inspect_data(LLMConfig(train_files=[str(assets / "llm" / "sample.csv")], validation_fraction=0,
                                    data_format="prompt_completion"))
    assert report.rows_usable == 24 and [(p.reason, p.kept) for p in report.problems] == [
        ("the 'input' column is not used by the prompt_completion format: choose alpaca (or auto) to add it to "
         "each prompt", True)]


def test_a_json_file_of_splits_is_read_for_its_train_split(tmp_path):
    splits = {"train": [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}],
              "test": [{"prompt": "e", "completion": "f"}]}
    report = check(tmp_path, "splits.json", json.dumps(splits))  # was one row, of no known columns
    assert report.summary() == "2 of 2 rows usable (prompt_completion)"
    assert "the 'train' split is read" in report.problems[0].reason and report.problems[0].kept


def test_json_values_keep_json_s_spelling(tmp_path):
    """A JSONL answer that is a list or a boolean is trained as JSON writes it, not as Python prints it."""
    report = check(tmp_path, "types.jsonl", '{"prompt": "List two", "completion": ["a", "b"]}\n'
                                            '{"prompt": "Is it?", "completion": true}\n')
    assert [row["response"] for row in report.preview] == ['["a", "b"]', "true"]


def test_truncated_parquet(tmp_path):
    path = tmp_path / "cut.parquet"
    pq.write_table(pa.table({"prompt": ["a"] * 100, "completion": ["b"] * 100}), path)
    path.write_bytes(path.read_bytes()[:200])
    report = inspect_data(LLMConfig(train_files=[str(path)]))
    assert report.rows_usable == 0 and "cannot be read as Parquet" in report.problems[0].reason


def test_huge_cell_is_reported_with_its_row(tmp_path, monkeypatch):
    import pipelines.llm.data as data
    monkeypatch.setattr(data, "MAX_CELL_CHARS", 1_000_000)
    big = "instruction,output\nfine,ok\nhuge," + "x" * 50_000_000 + "\n"
    report = check(tmp_path, "big.csv", big)
    assert report.rows_usable == 1
    assert any(p.row == 3 and "longer than the 1,000,000 character limit" in p.reason for p in report.problems)


def test_missing_file_and_validation_split(tmp_path, assets):
    report = inspect_data(LLMConfig(train_files=[str(tmp_path / "nope.csv")]))
    assert not report.ok and report.problems[0].reason == "file not found"
    config = LLMConfig(train_files=[str(assets / "llm" / "sample.csv")], validation_fraction=0.25)
    report, train, validation = load_examples(config)
    assert (len(train), len(validation)) == (18, 6) and report.validation_rows == 6
    assert report.summary() == "24 of 24 rows usable (alpaca), 6 held out for validation"
    few = inspect_data(LLMConfig(train_files=[str(pairs_file(tmp_path))], validation_fraction=0.25))
    assert few.validation_rows == 0 and [str(p) for p in few.problems] == [  # it was silently not done
        "validation: 2 rows are too few to hold some out (5 or more are needed): the run measures no validation loss"]
    # Rows of a validation file of their own are not taken from the training rows, and the summary says so.
    separate = inspect_data(config.changed(validation_files=[str(assets / "llm" / "sample.csv")]))
    assert separate.summary() == "24 of 24 rows usable (alpaca), plus 24 for validation from the validation data"


def test_only_responses_count_for_the_loss_unless_asked(assets):
    tokenizer = load_tokenizer("tiny-llama")
    _, train, _ = load_examples(LLMConfig(train_files=[str(assets / "llm" / "sample.csv")], validation_fraction=0))
    ids, labels = encode(train[0], tokenizer, LLMConfig(train_files=["x"]))
    trained_text = tokenizer.decode([i for i, label in zip(ids, labels) if label != IGNORE])
    assert trained_text.startswith(train[0].answer) and "Instruction" not in trained_text
    ids, labels = encode(train[0], tokenizer, LLMConfig(train_files=["x"], train_on="all"))
    assert IGNORE not in labels


def test_token_lengths_over_the_limit_are_counted(tmp_path):
    report = check(tmp_path, "long.csv", "instruction,output\nshort,ok\n" + "long," + "word " * 200 + "\n",
                   max_length=64)
    assert report.stats["over_max_length"] == 1 and report.stats["max_length"] == 64
    assert report.stats["no_reply_within_max_length"] == 0  # the long one is a reply: cut, still learnt from
    asked = check(tmp_path, "asked.csv", "instruction,output\nshort,ok\n" + "word " * 200 + ",ok\n", max_length=64)
    assert asked.stats["no_reply_within_max_length"] == 1  # its 200-word prompt leaves no room for 'ok'
    # 95% of two examples is both: the figure is the longest, not the shorter (it said "95% under" the short one)
    assert report.stats["tokens_p95"] == report.stats["tokens_max"] > report.stats["tokens_min"]


def tab_check(files: list, **chosen) -> dict:
    """The Language tab's data check with the form's defaults and these settings: its summary and its column boxes."""
    from studio.tabs import llm as tab
    settings = dataclasses.asdict(LLMConfig()) | chosen
    summary, *_, prompt, input_, response, text, messages, train, _preflight = tab.check_data(
        [str(f) for f in files], [], "tiny-llama", chosen.get("name", ""), *[settings[key] for key in tab.FORM])
    return {"summary": summary, "train": train["interactive"],
            **{key: (box["value"], box["info"].split(" In use: ")[-1] if " In use: " in box["info"] else "")
               for key, box in zip(tab.COLUMNS, (prompt, input_, response, text, messages))}}


def pairs_file(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,completion\nWhat is 2+2?,4\nName a colour.,Blue\n")
    return path


def test_the_tab_s_data_check_detects_anew_where_the_column_boxes_name_columns_the_file_lacks(tmp_path):
    """Columns chosen for other data (a loaded config's) are no choice made for a newly uploaded file of
    another shape: its own columns are detected, and the boxes show which are in use."""
    check = tab_check([pairs_file(tmp_path)], prompt_column="instruction", input_column="input",
                      response_column="output")
    assert "2 of 2 rows usable (prompt_completion)" in check["summary"] and check["train"]
    assert check["prompt_column"] == ("", "prompt.") and check["response_column"] == ("", "completion.")
    assert check["input_column"] == ("", "")
    assert ("Not in these files, so left to detection: prompt column 'instruction', input column 'input', "
            "response column 'output'.") in check["summary"]


def test_the_tab_says_no_usable_data_once(tmp_path):
    cyrillic = tmp_path / "cyrillic.csv"
    cyrillic.write_bytes("instruction,output\nКак дела у тебя сегодня?,Хорошо, спасибо.\n".encode("cp1251"))
    assert tab_check([cyrillic])["summary"] == ("**No usable data: cyrillic.csv: is not UTF-8 text (byte 0xca at "
                                                "position 19); save it as UTF-8 and upload again**")  # said once


def test_the_tab_s_column_boxes_keep_what_the_user_picks(tmp_path, assets):
    """The boxes are the user's choice, never overwritten by what the check detected: files of two shapes are
    each read with their own columns, and a column picked by hand for unknown names stays picked."""
    both = tab_check([assets / "llm" / "sample.csv", pairs_file(tmp_path)])
    assert "26 of 26 rows usable (alpaca, prompt_completion)" in both["summary"]
    assert both["prompt_column"] == ("", "instruction / prompt.")
    custom = tmp_path / "custom.csv"
    custom.write_text("q,a,notes\nWhat is 2+2?,4,x\nName a colour.,Blue,y\n")
    picked = tab_check([custom], prompt_column="q")
    assert picked["prompt_column"] == ("q", "") and not picked["train"]  # the answer column is still wanted
    mapped = tab_check([custom], prompt_column="q", response_column="a", name="my run (v2)")  # an invalid name
    assert "2 of 2 rows usable (prompt_completion)" in mapped["summary"] and mapped["train"]
    assert mapped["prompt_column"] == ("q", "q.") and mapped["response_column"] == ("a", "a.")


def test_a_base_model_that_cannot_be_loaded_stops_train_before_a_run(tmp_path, assets):
    """The check loads the tokenizer as a run would: a folder the studio may not load from (or a hub id
    offline) is said with its advice and keeps Train off, where the run was made and failed."""
    from studio.tabs import widgets
    report = inspect_data(LLMConfig(train_files=[str(assets / "llm" / "sample.csv")], validation_fraction=0,
                                    base_model="/opt/not-allowed-model"))
    assert not report.ok and report.rows_usable == 24
    assert widgets.headline(report, "data") == (
        "**Cannot train yet.** 24 of 24 rows usable (alpaca); but the base model cannot be used: The model path "
        "/opt/not-allowed-model is outside the folders models may be loaded from. Move it under your home or "
        "workspace folder, or add its parent to STUDIO_MODEL_DIRS.")


def test_custom_target_modules_the_model_lacks_stop_train_before_a_run(assets):
    """The check read the tokenizer only: a custom module name the model has no layer for passed, and the run
    loaded the model only to fail. Names are matched as peft matches them: a layer's name or its dotted end."""
    from studio import jobs
    base = LLMConfig(train_files=[str(assets / "llm" / "sample.csv")], validation_fraction=0,
                     target_modules="custom")
    for fits in (["q_proj", "v_proj"], ["self_attn.o_proj", "down_proj"]):
        assert inspect_data(base.changed(custom_target_modules=fits)).ok, fits
    report = inspect_data(base.changed(custom_target_modules=["q_proj", "query", "mlp"]))
    assert not report.ok and report.rows_usable == 24
    assert report.blocker == ("the custom target modules query, mlp are not layers of this model, whose linear "
                              "layers are: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj")
    with pytest.raises(jobs.UnusableData, match="query, mlp are not layers"):
        jobs.submit(base.changed(custom_target_modules=["q_proj", "query", "mlp"]))


def test_a_sample_from_chat_data_is_asked_its_whole_conversation(tmp_path):
    """The samples asked the last user turn alone, without the example's system turn and earlier turns."""
    chat = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Capital of Zorbia?"},
            {"role": "assistant", "content": "Quillton."}]
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": chat}) + "\n")
    _, train, _ = load_examples(LLMConfig(train_files=[str(tmp_path / "chat.jsonl")], validation_fraction=0))
    assert train[0].context == chat[:4] and (train[0].prompt, train[0].answer) == ("Capital of Zorbia?", "Quillton.")
    # and the preview shows it all ("as the model will see it" showed the last user turn alone)
    assert inspect_data(LLMConfig(train_files=[str(tmp_path / "chat.jsonl")], validation_fraction=0)).preview == [
        {"prompt": "[system] Answer briefly.\n[user] Hi\n[assistant] Hello.\n[user] Capital of Zorbia?",
         "response": "Quillton."}]


def test_a_conversation_ending_on_a_user_turn_is_shown_with_the_question_its_reply_answers(tmp_path):
    """The preview and the training samples paired the last reply with the user turn after it ('Thanks! Now
    tell me a joke.' -> '0'), and the unanswered turn was left out of training without a word."""
    rows = [[{"role": "user", "content": f"What is {n} times 2?"}, {"role": "assistant", "content": str(2 * n)}]
            + ([{"role": "user", "content": "Thanks! Now tell me a joke."}] if n % 2 == 0 else []) for n in range(8)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"messages": r}) + "\n" for r in rows))
    report = inspect_data(LLMConfig(train_files=[str(tmp_path / "chat.jsonl")], validation_fraction=0))
    assert report.preview[:2] == [{"prompt": "What is 0 times 2?", "response": "0"},
                                  {"prompt": "What is 1 times 2?", "response": "2"}]
    assert report.ok and report.rows_usable == 8
    assert [str(p) for p in report.problems] == [
        "chat.jsonl: 4 conversations end on a user turn with no reply after it (row 1, 3, 5, 7): that last turn is "
        "not trained, the replies before it are"]


def test_a_model_folder_without_whole_weights_stops_train_before_a_run(tmp_path, assets, monkeypatch):
    """The check loaded the tokenizer only: a folder without its weights, with a shard missing or with a file
    cut short passed, and the run failed on loading ('SafetensorError: Error while deserializing header')."""
    import shutil
    from pipelines.llm.model import materialise_preset
    monkeypatch.setenv("STUDIO_MODEL_DIRS", str(tmp_path))
    whole = tmp_path / "whole"
    shutil.copytree(materialise_preset("tiny-llama"), whole)

    def blocker(folder):
        return inspect_data(LLMConfig(train_files=[str(assets / "llm" / "sample.csv")], base_model=str(folder))).blocker

    assert blocker(whole) == ""
    no_weights = tmp_path / "no-weights"
    shutil.copytree(whole, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    assert blocker(no_weights) == (
        f"the base model cannot be used: The model folder {no_weights} holds no weights (model.safetensors or "
        "pytorch_model.bin, or the index of its shards): copy the folder again, whole.")
    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[:len(data) // 2])
    assert blocker(cut).endswith(f"The weights file model.safetensors in {cut} is cut short or damaged: copy it again.")
    sharded = tmp_path / "sharded"
    shutil.copytree(whole, sharded, ignore=shutil.ignore_patterns("*.safetensors"))
    (sharded / "model-00001-of-00002.safetensors").write_bytes(data)
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    assert blocker(sharded).endswith("lacks 1 of its 2 weight files (model-00002-of-00002.safetensors): copy the "
                                     "folder again, whole.")


def test_a_semicolon_csv_saved_by_excel_is_read_in_its_columns(tmp_path):
    """European Excel saves ';' with CRLF line ends and quoted cells: csv.Sniffer gave up, and the file was read
    as one column 'prompt;completion' ('no known columns')."""
    rows = "".join(f'Question {i}?;"Answer {i}. Also; semicolons, and commas."\r\n' for i in range(6))
    report = check(tmp_path, "excel.csv", ("prompt;completion\r\n" + rows).encode("utf-8-sig"))
    assert report.summary() == "6 of 6 rows usable (prompt_completion)"
    assert report.preview[0] == {"prompt": "Question 0?", "response": "Answer 0. Also; semicolons, and commas."}


def test_common_column_pairs_and_pandas_json_are_read(tmp_path):
    """input/output, user/assistant, source/target and prompt/chosen pairs were 'no known columns'; pandas'
    default to_json layout ({column: {index: value}}) was one row of JSON objects, and Train was on."""
    for prompt, response in (("input", "output"), ("user", "assistant"), ("source", "target"), ("prompt", "chosen")):
        rows = "".join(f"Q{i},A{i}\n" for i in range(3))
        report = check(tmp_path, f"{prompt}.csv", f"{prompt},{response}\n{rows}")
        assert report.summary() == "3 of 3 rows usable (prompt_completion)", (prompt, report.problems)
        assert report.mapping == {"prompt": prompt, "response": response}
    frame = {"instruction": {"0": "Say hi", "1": "Say bye"}, "output": {"0": "hi", "1": "bye"}}
    pandas = check(tmp_path, "frame.json", json.dumps(frame))
    assert pandas.summary() == "2 of 2 rows usable (alpaca)" and pandas.preview[1] == {"prompt": "Say bye",
                                                                                       "response": "bye"}


def test_data_whose_every_reply_is_cut_off_by_max_length_stops_train(tmp_path):
    """Said, but Train stayed on, and the run failed: 'After truncation no example has any response token left'."""
    long = "word " * 3000
    report = check(tmp_path, "long.csv", f"instruction,output\n{long},yes\n{long},no\n")
    assert report.rows_usable == 2 and not report.ok
    assert report.blocker == (f"no training example keeps any of its reply within the max length of "
                              f"{LLMConfig().max_length} tokens: raise the max length")


def test_excel_unicode_text_is_read(tmp_path):
    """Excel's 'Unicode text' is UTF-16 with a byte order mark: it was called 'a binary file, not TSV text'."""
    report = check(tmp_path, "excel.tsv", "instruction\toutput\nSay ü\tü\nSay é\té\n".encode("utf-16"))
    assert report.summary() == "2 of 2 rows usable (alpaca)" and report.preview[0]["prompt"] == "Say ü"


def test_the_length_chart_and_the_time_per_epoch_follow_the_max_length(tmp_path):
    """With a few very long rows, the chart's first bar (0-1851 tokens) held examples on both sides of a max length
    of 128 and was all called 'over max length'; the time per epoch counted every token of rows cut to the max
    length (52,000 Alpaca rows: 15.3M tokens, where at most 6.7M train)."""
    from studio.tabs import llm as tab
    rows = ["instruction,output"] + [f"Say {n},{n}" for n in range(30)] + [f"Say {'many words ' * 1500},ok"] * 2
    report = check(tmp_path, "mixed.csv", "\n".join(rows) + "\n", max_length=128)
    chart = tab._histogram(report.stats)
    assert list(chart[chart.fits == "within max length"].examples) == [30]
    assert list(chart[chart.fits == "over max length"].examples) == [2]
    assert report.stats["tokens_trained"] <= 128 * report.rows_usable < sum(report.stats["lengths"])
    line = tab.preflight_line(LLMConfig(max_length=128), report.stats)
    assert f"({report.stats['tokens_trained']:,} tokens)" in line


def test_an_excel_csv_in_windows_1252_is_read_and_said_so(tmp_path):
    """Excel's plain 'CSV' on Western-European Windows is Windows-1252: it was refused as 'not UTF-8 text'."""
    rows = 'instruction,output\nQuel café préfères-tu ?,"Un crème – très “bon”, 2 €."\nWie heißt sie?,Hauptstraße\n'
    report = check(tmp_path, "excel.csv", rows.encode("cp1252"))
    assert report.summary() == "2 of 2 rows usable (alpaca)"
    assert report.preview[0]["prompt"] == "Quel café préfères-tu ?"
    assert report.preview[0]["response"] == "Un crème – très “bon”, 2 €."
    assert [(p.file, p.kept) for p in report.problems] == [("excel.csv", True)]
    assert report.problems[0].reason.startswith("is not UTF-8: read as Windows-1252, what Excel's 'CSV'")


def test_the_data_is_checked_again_only_when_what_the_check_reads_changes(tmp_path, assets):
    """Batch size and 4-bit, read by the pre-flight line alone, ran the whole check again (a minute for a 50 MB
    file), and Train checked in full what the tab had just checked, before a word on the page. A file changed on
    disk, a file added to a folder, or a setting the check reads, is checked again."""
    import shutil
    from pipelines.image.config import ImageConfig
    from studio import jobs
    data = tmp_path / "data.csv"
    shutil.copy(assets / "llm" / "sample.csv", data)
    config = LLMConfig(train_files=[str(data)], validation_fraction=0)
    first = jobs.check_data(config)
    assert jobs.check_data(config.changed(batch_size=2, load_in_4bit=True, learning_rate=1e-3, epochs=1.0,
                                          name="renamed")) is first
    assert jobs.check_data(config.changed(max_length=64)) is not first
    data.write_text(data.read_text() + "Say hi,,hi\n")
    assert jobs.check_data(config).rows_found == first.rows_found + 1

    folder = tmp_path / "images"
    shutil.copytree(assets / "image", folder, ignore=shutil.ignore_patterns("*.yaml"))
    images = ImageConfig(data_path=str(folder), resolution=32)
    before = jobs.check_data(images)
    shutil.copy(next(folder.rglob("*.png")), folder / "another.png")  # no caption: found, and not usable
    assert jobs.check_data(images).rows_found == before.rows_found + 1


@pytest.mark.parametrize("name, text, note", [
    ("lines.json", '{"prompt": "Hi", "completion": "Hello."}\n{"prompt": "Bye", "completion": "Goodbye."}\n',
     "holds JSON Lines (one object per line): read as such (a .jsonl name says so)"),
    ("list.jsonl", '[\n  {"prompt": "Hi", "completion": "Hello."},\n  {"prompt": "Bye", "completion": "Goodbye."}\n]\n',
     "holds one JSON value over several lines: read as such (a .json name says so)"),
    ("excel.csv", "sep=;\r\nprompt;completion\r\nHi, you;Hello.\r\nBye;Goodbye.\r\n", None),
])
def test_tables_saved_under_another_shape_are_read(tmp_path, name, text, note):
    """JSON Lines saved as .json was 'not valid JSON (Extra data)'; a pretty-printed list saved as .jsonl gave
    one error per line ('0 of 34 rows usable'); Excel's 'sep=;' first line was taken for the header."""
    (tmp_path / name).write_text(text)
    report = inspect_data(LLMConfig(train_files=[str(tmp_path / name)], validation_fraction=0))
    assert (report.rows_usable, [p.reason for p in report.problems]) == (2, [note] if note else [])
    assert report.preview[0]["prompt"] == ("Hi, you" if note is None else "Hi")


def test_an_excel_workbook_is_read_from_its_first_sheet(tmp_path):
    """Excel is where many people keep their question/answer pairs: an .xlsx was refused by the upload box."""
    import openpyxl
    book = openpyxl.Workbook()
    book.active.title = "Q&A"
    for row in (["Question", "Answer"], ["What is 2+2?", 4], [None, None], ["Name a colour.", "Blue"]):
        book.active.append(row)
    book.create_sheet("notes").append(["not data"])
    book.save(tmp_path / "qa.xlsx")
    (tmp_path / "broken.xlsx").write_bytes(b"PK\x03\x04 not really a workbook")
    with zipfile.ZipFile(tmp_path / "qa.xlsx") as whole, zipfile.ZipFile(tmp_path / "cut.xlsx", "w") as cut:
        for entry in whole.infolist():  # a sheet cut short: found only as its rows are read
            data = whole.read(entry)
            cut.writestr(entry, data[:len(data) // 2] if entry.filename.endswith("sheet1.xml") else data)
    files = [str(tmp_path / name) for name in ("qa.xlsx", "broken.xlsx", "cut.xlsx")]
    report = inspect_data(LLMConfig(train_files=files, validation_fraction=0))
    assert report.preview == [{"prompt": "What is 2+2?", "response": "4"},
                              {"prompt": "Name a colour.", "response": "Blue"}]
    assert [str(p).split(" (")[0] for p in report.problems] == [
        "qa.xlsx: has 2 sheets: only the first, 'Q&A', is read",
        "broken.xlsx: cannot be read as an Excel workbook",
        "cut.xlsx: has 2 sheets: only the first, 'Q&A', is read",
        "cut.xlsx: cannot be read as an Excel workbook"]


def test_other_spreadsheet_formats_say_how_to_save_them(tmp_path):
    """An .xls, .ods or .numbers file got only the browser's "Invalid file type"; a macro workbook (.xlsm) is an
    Excel workbook like any other."""
    import openpyxl
    book = openpyxl.Workbook()
    book.active.append(["instruction", "output"])
    book.active.append(["Say hi", "hi"])
    book.save(tmp_path / "macros.xlsm")
    for name in ("old.xls", "calc.ods", "mac.numbers"):
        (tmp_path / name).write_bytes(b"\xd0\xcf\x11\xe0 a spreadsheet")
    files = [str(tmp_path / name) for name in ("macros.xlsm", "old.xls", "calc.ods", "mac.numbers")]
    report = inspect_data(LLMConfig(train_files=files, validation_fraction=0))
    assert report.preview == [{"prompt": "Say hi", "response": "hi"}]
    found = {p.file: p.reason for p in report.problems}
    assert "save it as an Excel Workbook (.xlsx) or as CSV" in found["old.xls"]
    assert "LibreOffice: File > Save As" in found["calc.ods"] and "File > Export To" in found["mac.numbers"]


def test_rows_that_repeat_an_earlier_one_are_named(tmp_path):
    """Exact repeats were trained without a word (the image tab names its duplicate images); one held out for
    validation while its twin trains makes the validation loss look better than it is."""
    (tmp_path / "a.csv").write_text("prompt,completion\nSame?,Same.\nOther?,Other.\nSame?,Same.\n")
    (tmp_path / "b.jsonl").write_text('{"prompt": "Other?", "completion": "Other."}\n')
    report = inspect_data(LLMConfig(train_files=[str(tmp_path / "a.csv"), str(tmp_path / "b.jsonl")],
                                    validation_fraction=0))
    assert report.rows_usable == 4  # kept: repeating an example can be meant
    assert [str(p) for p in report.problems] == [
        "data: 2 rows repeat an earlier one exactly: a.csv row 4 copies a.csv row 2; b.jsonl row 1 copies a.csv row 3. "
        "Each copy is trained on, and one held out for validation makes the validation loss look better than it "
        "is: remove them unless that is meant"]


def test_columns_chosen_by_hand_for_one_file_leave_the_others_to_detection(tmp_path):
    """The check advised mapping the columns of a file it could not read alone; done, it refused the other files,
    which had none of those columns ('the prompt column 'Q' ... are not in this file')."""
    (tmp_path / "mine.csv").write_text("Q,A\nWhat is 2+2?,4\nName a colour.,Blue\n")
    (tmp_path / "theirs.csv").write_text("question,answer\nCapital of Zorbia?,Quillton.\n")
    report = inspect_data(LLMConfig(train_files=[str(tmp_path / "mine.csv"), str(tmp_path / "theirs.csv")],
                                    validation_fraction=0, prompt_column="Q", response_column="A"))
    assert report.rows_usable == 3
    assert [str(p) for p in report.problems] == [
        "theirs.csv: has none of the columns chosen by hand (Q, A): its own are used (question, answer)"]
