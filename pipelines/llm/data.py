"""Reading and checking language-model training data.

Tables (CSV/TSV, JSONL, JSON, Parquet) become examples: a list of chat messages, or plain text. The
same code feeds the data check the user sees and the training run, so what the check accepts is
exactly what trains. Bad rows are reported with their row number and reason, never raised.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import random
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.data import MAX_CELL_CHARS, MAX_TABLE_BYTES, DataReport, NotText, decode_text
from pipelines.events import TrainingFailure
from pipelines.llm.config import LLMConfig

TABLE_SUFFIXES = [".csv", ".tsv", ".jsonl", ".json", ".parquet", ".xlsx", ".xlsm"]  # (the order the tabs list them in)
# Spreadsheets in formats the studio does not read, and the way out. The upload box takes them, so that the
# check says this instead of the browser's bare "Invalid file type".
SAVE_AS_FIRST = {
    ".xls": "is an Excel 97-2003 workbook, which the studio does not read: open it in Excel and save it as an "
            "Excel Workbook (.xlsx) or as CSV",
    ".ods": "is an OpenDocument spreadsheet, which the studio does not read: save it as .xlsx or CSV "
            "(LibreOffice: File > Save As)",
    ".numbers": "is an Apple Numbers document, which the studio does not read: export it to Excel or CSV "
                "(Numbers: File > Export To)",
}

# Column names recognised for each role, in order of preference (compared case-insensitively).
ROLE_NAMES = {
    "messages": ["messages", "conversations", "conversation", "chat"],
    "prompt": ["instruction", "prompt", "question", "query", "input_text", "user", "source"],
    "input": ["input", "context"],
    "response": ["output", "response", "completion", "answer", "target", "assistant", "chosen"],
    "text": ["text", "content", "document"],
}
# The columns each format cannot do without ("input" is optional for alpaca).
FORMAT_ROLES = {"chat": ["messages"], "alpaca": ["prompt", "response"], "prompt_completion": ["prompt", "response"],
                "text": ["text"]}
CHAT_ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
              "model": "assistant", "bot": "assistant"}


@dataclass
class Example:
    """One training example: chat messages (loss on assistant turns) or plain text (loss on all)."""

    messages: list[dict[str, str]] | None = None
    text: str | None = None
    source: str = ""  # "file.csv row 3", for messages about this example

    @property
    def prompt(self) -> str:
        if self.messages:  # the user turn the last reply answers (a user turn after it answers nothing)
            users = [m["content"] for m in self.context if m["role"] == "user"]
            return users[-1] if users else ""
        return (self.text or "")[:80]

    @property
    def context(self) -> list[dict[str, str]]:
        """The conversation its last reply answers (system turn and earlier turns included): what a sample
        of the tuned model is asked."""
        last = max((i for i, m in enumerate(self.messages or []) if m["role"] == "assistant"), default=0)
        return (self.messages or [])[:last]

    @property
    def answer(self) -> str:
        if self.messages:
            replies = [m["content"] for m in self.messages if m["role"] == "assistant"]
            return replies[-1] if replies else ""
        return ""


# ---- reading tables --------------------------------------------------------------------------

def read_table(path: Path, report: DataReport) -> list[tuple[int, dict[str, Any]]]:
    """Rows of one file as (row number, record). Problems go into the report."""
    name = path.name
    if not path.is_file():
        report.problem(name, "file not found")
        return []
    suffix = path.suffix.lower()
    if suffix in SAVE_AS_FIRST:
        report.problem(name, SAVE_AS_FIRST[suffix])
        return []
    if suffix not in TABLE_SUFFIXES:
        report.problem(name, f"unsupported file type '{suffix}': use CSV, TSV, JSONL, JSON, Parquet or Excel (.xlsx)")
        return []
    size = path.stat().st_size
    if size == 0:
        report.problem(name, "the file is empty")
        return []
    if size > MAX_TABLE_BYTES:
        report.problem(name, f"the file is {size / 2**20:.0f} MB, over the {MAX_TABLE_BYTES // 2**20} MB limit: "
                             "split it into smaller files, or start the studio with a higher STUDIO_MAX_TABLE_MB")
        return []
    if suffix == ".parquet":
        return _read_parquet(path, report)
    if suffix in (".xlsx", ".xlsm"):
        return _read_excel(path, report)
    try:
        text, read_as = decode_text(path.read_bytes())
    except NotText as err:
        report.problem(name, str(err))
        return []
    if read_as:
        report.problem(name, read_as, kept=True)
    if not text.strip():
        report.problem(name, "the file holds only blank space")
        return []
    if suffix in (".csv", ".tsv"):
        return _read_csv(name, text, "\t" if suffix == ".tsv" else None, report)
    if suffix == ".jsonl":
        return _read_jsonl(name, text, report)
    return _read_json(name, text, report)


# JSON Lines saved as .json, and a JSON list saved as .jsonl, are read as what they hold, with a note.
READ_AS_OTHER_JSON = "holds {}: read as such (a .{} name says so)"


def _one_object_per_line(text: str) -> bool:
    """Whether the first lines of a text are each a whole JSON object (JSON Lines; a JSON file is one value)."""
    lines = [line for line in text.splitlines()[:20] if line.strip()]
    try:
        return len(lines) > 1 and all(isinstance(json.loads(line), dict) for line in lines)
    except json.JSONDecodeError:
        return False


def _read_csv(name: str, text: str, delimiter: str | None, report: DataReport) -> list[tuple[int, dict]]:
    excel = re.match(r"sep=(.)\r?\n", text)  # Excel's first line naming the delimiter, before the header
    if excel:
        delimiter, text = excel.group(1), text[excel.end():]
    delimiter = delimiter or _delimiter(text)
    csv.field_size_limit(MAX_CELL_CHARS + 1)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows: list[tuple[int, dict]] = []
    try:
        header = next(reader)
    except (StopIteration, csv.Error) as err:
        report.problem(name, f"the header row cannot be read: {err}")
        return []
    header = _checked_header(name, header, report)
    if header is None:
        return []
    number, before, blank = 1, len(report.problems), 0  # rows as a spreadsheet numbers them: the header is row 1
    unclosed_at_end, lines_in_file = text.count('"') % 2 == 1, text.rstrip("\n").count("\n") + 1
    while True:
        number += 1
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            reason = str(err)
            if "field larger" in reason:
                reason = f"a cell is longer than the {MAX_CELL_CHARS:,} character limit (STUDIO_MAX_CELL_CHARS)"
            report.problem(name, f"cannot be read: {reason}; the rest of the file was skipped", number)
            break
        if not any(c.strip() for c in cells):
            blank += 1
            continue
        if len(cells) != len(header):
            swallowed = max((c.rstrip("\n").count("\n") for c in cells), default=0)
            if swallowed:  # a quote never closed takes every line after it into one cell, to the file's end
                lines = f"the {swallowed} lines after it were" if swallowed > 1 else "the line after it was"
                report.problem(name, f"a quote opened in this row is never closed, so {lines} read as one cell: "
                                     "close it (a quote inside a cell is written \"\")", number, rows=1 + swallowed)
            elif unclosed_at_end and reader.line_num >= lines_in_file:  # the last row opened a quote never closed
                report.problem(name, "a quote opened in this row is never closed: close it (a quote inside a cell "
                                     "is written \"\")", number)
            else:
                report.problem(name, f"has {len(cells)} fields but the header has {len(header)}"
                                     " (a stray delimiter or a missing quote?)", number)
            continue
        rows.append((number, {h: cell for h, cell in zip(header, cells) if h}))
    if not rows and len(report.problems) == before:  # (rows with every cell empty are no data either)
        report.problem(name, "has a header row but no data rows" + (f", only {blank} empty ones" if blank else ""))
    return rows


def _checked_header(name: str, header: list[str], report: DataReport) -> list[str] | None:
    """A table's header row (a CSV's, an Excel sheet's), its names stripped; None when it cannot name the
    columns (the problem is reported)."""
    header = [h.strip() for h in header]
    named = [h for h in header if h]
    if len(set(named)) != len(named) or not named:
        report.problem(name, f"the header row has empty or repeated column names: {header}")
        return None
    if len(named) < len(header):  # pandas' index column, Excel's empty columns at the end: nothing to map
        unnamed = [str(i) for i, h in enumerate(header, start=1) if not h]
        report.problem(name, f"column{'s' if len(unnamed) > 1 else ''} {', '.join(unnamed)} of the header "
                             f"{'have' if len(unnamed) > 1 else 'has'} no name: ignored", kept=True)
    report.columns = report.columns or named
    return header


def _delimiter(text: str) -> str:
    """The delimiter the header row uses most, outside quotes (csv.Sniffer gave up on a European Excel file, ';'
    with CRLF line ends and quoted cells, and the file was read as one column); ',' for a single column."""
    header = re.sub(r'"[^"]*"', "", text.split("\n", 1)[0])
    counts = {d: header.count(d) for d in ",;\t|"}
    best = max(counts, key=counts.get)
    return best if counts[best] else ","


def _read_jsonl(name: str, text: str, report: DataReport) -> list[tuple[int, dict]]:
    if text.lstrip()[:1] in "[{" and "\n" in text.strip() and not _one_object_per_line(text):
        try:
            json.loads(text)
        except json.JSONDecodeError:
            pass
        else:
            report.problem(name, READ_AS_OTHER_JSON.format("one JSON value over several lines", "json"), kept=True)
            return _read_json(name, text, report)
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            report.problem(name, f"is not valid JSON ({err.msg} at column {err.colno})", number)
            continue
        if not isinstance(record, dict):
            report.problem(name, f"is a JSON {type(record).__name__}, not an object with named fields", number)
            continue
        rows.append((number, record))
    return rows


def _read_json(name: str, text: str, report: DataReport) -> list[tuple[int, dict]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data" and _one_object_per_line(text):
            report.problem(name, READ_AS_OTHER_JSON.format("JSON Lines (one object per line)", "jsonl"), kept=True)
            return _read_jsonl(name, text, report)
        report.problem(name, f"is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})")
        return []
    if isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
        # pandas' DataFrame.to_json() default: {column: {row index: value}}, read as one row of JSON objects
        columns = list(data)
        data = [{c: data[c].get(index) for c in columns} for index in data[columns[0]]]
    if isinstance(data, dict):  # {"data": [...]} and similar wrappers; {"train": [...], "test": [...]} splits
        lists = {k: v for k, v in data.items() if isinstance(v, list)}
        if len(lists) > 1 and "train" in lists:
            report.problem(name, f"holds the splits {', '.join(lists)}: the 'train' split is read (upload another "
                                 "split as the validation file)", kept=True)
            data = lists["train"]
        else:
            data = next(iter(lists.values())) if len(lists) == 1 else [data]
    if not isinstance(data, list):
        report.problem(name, "must hold a list of objects")
        return []
    rows = []
    for number, record in enumerate(data, start=1):
        if isinstance(record, dict):
            rows.append((number, record))
        else:
            report.problem(name, f"item is a {type(record).__name__}, not an object", number)
    return rows


def _read_parquet(path: Path, report: DataReport) -> list[tuple[int, dict]]:
    try:
        import pyarrow.parquet as pq
        records = pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several types for damaged files
        report.problem(path.name, f"cannot be read as Parquet (truncated or damaged?): {str(err).splitlines()[0]}")
        return []
    return list(enumerate(records, start=1))


def _read_excel(path: Path, report: DataReport) -> list[tuple[int, dict]]:
    """An Excel workbook's first sheet: its first row names the columns, as in a CSV. Cells are read as Excel
    shows them (a formula's last value); a number stays a number, as in the other formats."""
    import openpyxl
    rows = []
    try:
        book = openpyxl.load_workbook(path, read_only=True, data_only=True)
        try:
            sheet = book.worksheets[0]
            if len(book.worksheets) > 1:
                report.problem(path.name, f"has {len(book.worksheets)} sheets: only the first, '{sheet.title}', is "
                                          "read", kept=True)
            lines = sheet.iter_rows(values_only=True)
            header = _checked_header(path.name, ["" if h is None else str(h) for h in next(lines, [])], report)
            if header is None:
                return []
            for number, cells in enumerate(lines, start=2):  # (as Excel numbers them: the header is row 1)
                if any(c is not None and str(c).strip() for c in cells):
                    rows.append((number, {h: cell for h, cell in zip(header, cells) if h}))
        finally:
            book.close()
    except Exception as err:  # openpyxl raises zipfile, XML and its own errors for damaged files, some only as read
        report.problem(path.name, f"cannot be read as an Excel workbook (damaged, or saved in another format?): {err}")
        return []
    if not rows:
        report.problem(path.name, "has a header row but no data rows")
    return rows


# ---- shapes ----------------------------------------------------------------------------------

def detect_mapping(columns: list[str], config: LLMConfig) -> tuple[str, dict[str, str]]:
    """Pick the data format and the column for each role, honouring explicit choices."""
    lower = {c.lower(): c for c in columns}

    def find(role: str, explicit: str) -> str:
        if explicit:
            return explicit if explicit in columns else ""
        return next((lower[n] for n in ROLE_NAMES[role] if n in lower), "")

    mapping = {role: find(role, getattr(config, f"{role}_column")) for role in ROLE_NAMES}
    if mapping["prompt"] == mapping["input"]:
        mapping["input"] = ""
    if not mapping["prompt"] and not config.prompt_column and mapping["input"]:  # input/output pairs
        mapping["prompt"], mapping["input"] = mapping["input"], ""
    fmt = config.data_format
    if fmt == "auto":
        if mapping["messages"]:
            fmt = "chat"
        elif mapping["prompt"] and mapping["response"]:
            fmt = "alpaca" if mapping["input"] or "instruction" in lower else "prompt_completion"
        elif mapping["text"]:
            fmt = "text"
        else:
            fmt = ""
    needed = FORMAT_ROLES.get(fmt, [])
    used = {role: mapping[role] for role in needed + (["input"] if fmt == "alpaca" else []) if mapping[role]}
    return fmt, used


def _cell(record: dict, column: str) -> str:
    value = record.get(column)
    if value is None or (isinstance(value, float) and value != value):  # None or NaN
        return ""
    if isinstance(value, str):
        return value
    if hasattr(value, "tolist"):  # a Parquet list arrives as a numpy array
        value = value.tolist()
    # JSON's own spelling, not Python's: a JSONL answer ["a", "b"] trained as "['a', 'b']", true as "True"
    return json.dumps(value, ensure_ascii=False) if isinstance(value, (list, dict, bool)) else str(value)


def to_example(record: dict, fmt: str, mapping: dict[str, str], system_prompt: str) -> Example | str:
    """An Example, or the reason this row cannot be used."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    if fmt == "text":
        text = _cell(record, mapping["text"])
        return Example(text=text) if text.strip() else f"the '{mapping['text']}' column is empty"
    if fmt == "chat":
        return _chat_example(record.get(mapping["messages"]), mapping["messages"], system)
    prompt, response = _cell(record, mapping["prompt"]), _cell(record, mapping["response"])
    if not prompt.strip():
        return f"the '{mapping['prompt']}' column is empty"
    if not response.strip():
        return f"the '{mapping['response']}' column is empty"
    extra = _cell(record, mapping["input"]) if mapping.get("input") else ""
    if extra.strip():
        prompt = f"{prompt}\n\n{extra}"
    return Example(messages=system + [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}])


def _chat_example(value: Any, column: str, system: list[dict]) -> Example | str:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return f"the '{column}' column is not a JSON list of messages"
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, list) or not value:
        return f"the '{column}' column must be a non-empty list of messages"
    messages = []
    for i, message in enumerate(value, start=1):
        if not isinstance(message, dict):
            return f"message {i} is not an object with role and content"
        role = str(message.get("role", message.get("from", ""))).lower()
        content = message.get("content", message.get("value"))
        if role not in CHAT_ROLES:
            return f"message {i} has an unknown role '{role}' (use system, user or assistant)"
        if not isinstance(content, str) or not content.strip():
            return f"message {i} has no text content"
        messages.append({"role": CHAT_ROLES[role], "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        return "the conversation has no assistant message to learn from"
    if messages[0]["role"] != "system":
        messages = system + messages
    return Example(messages=messages)


# ---- the whole data set ----------------------------------------------------------------------

def _note_repeats(examples: list[Example], report: DataReport) -> None:
    """Say which rows repeat an earlier one exactly: each copy is trained on (and may be held out to validate
    on, where its twin trains, which makes the validation loss look better than it is); kept, as repeating an
    example can be meant."""
    seen: dict[bytes, str] = {}  # (a digest, not the text: a data set of 50,000 rows is checked in the server)
    repeats = []
    for example in examples:
        key = hashlib.blake2b(json.dumps([example.messages, example.text]).encode(), digest_size=16).digest()
        if key in seen:
            repeats.append(f"{example.source} copies {seen[key]}")
        else:
            seen[key] = example.source
    if repeats:
        named = "; ".join(repeats[:3]) + (f"; and {len(repeats) - 3} more" if len(repeats) > 3 else "")
        report.problem("data", f"{len(repeats)} row{'s repeat' if len(repeats) > 1 else ' repeats'} an earlier one "
                               f"exactly: {named}. Each copy is trained on, and one held out for validation makes "
                               "the validation loss look better than it is: remove them unless that is meant",
                       kept=True)


def load_examples(config: LLMConfig, report: DataReport | None = None
                  ) -> tuple[DataReport, list[Example], list[Example]]:
    """Read every file, report every problem, split train/validation. Never raises on bad data."""
    report = report or DataReport()
    train = _examples_from(config.train_files, config, report)
    _note_repeats(train, report)
    validation: list[Example] = []
    if config.validation_files:
        validation = _examples_from(config.validation_files, config, report, count=False)
    elif config.validation_fraction > 0 and 0 < len(train) < 5:
        report.problem("validation", f"{len(train)} rows are too few to hold some out (5 or more are needed): "
                                     "the run measures no validation loss", kept=True)
    elif config.validation_fraction > 0 and len(train) >= 5:
        shuffled = train[:]
        random.Random(config.seed).shuffle(shuffled)
        held = max(1, round(len(train) * config.validation_fraction))
        validation, held_ids = shuffled[:held], {id(e) for e in shuffled[:held]}
        train = [e for e in train if id(e) not in held_ids]
    report.validation_rows = len(validation)
    report.validation_from_files = bool(config.validation_files)
    return report, train, validation


def _examples_from(files: list[str], config: LLMConfig, report: DataReport, count: bool = True) -> list[Example]:
    examples: list[Example] = []
    for file in files:
        path = Path(file)
        before = len(report.problems)
        rows = read_table(path, report)
        if count:  # rows that could not be read at all count as found, and dropped
            report.rows_found += len(rows) + sum(p.rows for p in report.problems[before:] if p.row is not None)
        if not rows:
            continue
        columns = list(dict.fromkeys(k for _, record in rows[:200] for k in record))
        chosen = {role: name for role in ROLE_NAMES if (name := getattr(config, f"{role}_column"))}
        absent = [f"{role} column '{name}'" for role, name in chosen.items() if name not in columns]
        fmt, mapping = detect_mapping(columns, config)
        if chosen and len(absent) == len(chosen):
            # None of the columns chosen by hand (for another file): this one's own are detected, as when none
            # is chosen (the check had advised mapping one file's columns, which then refused the others).
            fmt, mapping = detect_mapping(columns, config.changed(**{f"{role}_column": "" for role in chosen}))
            absent = []
            if fmt:
                report.problem(path, f"has none of the columns chosen by hand ({', '.join(chosen.values())}): its "
                                     f"own are used ({', '.join(dict.fromkeys(mapping.values()))})", kept=True)
        if count:  # over all the training files, each read with its own format and columns
            report.columns = list(dict.fromkeys(report.columns + columns))
            if fmt and fmt not in report.format.split(", "):
                report.format = ", ".join(filter(None, [report.format, fmt]))
            for role, column in mapping.items():
                used = report.mapping.get(role, "")
                report.mapping[role] = used if column in used.split(" / ") else " / ".join(filter(None, [used, column]))
        if absent:
            verb = "is" if len(absent) == 1 else "are"
            report.problem(path, f"the {' and '.join(absent)} set in the settings {verb} not in this file, whose "
                                 f"columns are {columns}: choose others, or leave them empty to detect them")
            continue
        if not fmt:
            report.problem(path, f"no known columns among {columns}: expected instruction/output, prompt/completion, "
                                 "question/answer, messages or text; or map the columns yourself")
            continue
        unused_input = next((c for c in columns if c.lower() in ROLE_NAMES["input"] and c not in mapping.values()), "")
        if fmt == "prompt_completion" and unused_input:  # alpaca's 'input' would be dropped unseen
            report.problem(path, f"the '{unused_input}' column is not used by the prompt_completion format: choose "
                                 "alpaca (or auto) to add it to each prompt", kept=True)
        lacking = [role for role in FORMAT_ROLES[fmt] if role not in mapping]
        if lacking:  # a format chosen by hand that this file's columns do not fit
            report.problem(path, f"the {fmt} format needs a {' and a '.join(lacking)} column, and none was found "
                                 f"among {columns}: map the columns yourself, or choose another format")
            continue
        unanswered = []
        for number, record in rows:
            example = to_example(record, fmt, mapping, config.system_prompt)
            if isinstance(example, str):
                report.problem(path, example, number)
                continue
            example.source = f"{path.name} row {number}"
            examples.append(example)
            if example.messages and example.messages[-1]["role"] == "user":
                unanswered.append(number)
        if unanswered:
            rows_named = ", ".join(map(str, unanswered[:5])) + (", …" if len(unanswered) > 5 else "")
            report.problem(path, f"{len(unanswered)} conversation{'s end' if len(unanswered) > 1 else ' ends'} on a "
                                 f"user turn with no reply after it (row {rows_named}): that last turn is not trained, "
                                 "the replies before it are", kept=True)
        if count:
            report.rows_usable = len(examples)
    return examples


def inspect_data(config: LLMConfig) -> DataReport:
    """The data check the UI and CLI show before training: rows, format, problems, token lengths."""
    report, train, validation = load_examples(config)
    report.rows_usable = len(train) + len(validation) if not config.validation_files else len(train)
    # The prompt as the model sees it: a system turn and earlier turns too, each after its role (the last user
    # turn alone hid them)
    report.preview = [{"prompt": e.prompt if len(e.context) == 1 else
                       "\n".join(f"[{m['role']}] {m['content']}" for m in e.context), "response": e.answer}
                      if e.messages else {"text": e.text} for e in train[:20]]
    if not train:
        return report
    try:
        from pipelines.llm.model import load_model_config, load_tokenizer, unusable_weights
        from pipelines.llm.tokenize import encode, keeps_a_reply, takes_no_system_turn
        tokenizer = load_tokenizer(config.base_model, config.trust_remote_code)
        load_model_config(config.base_model, config.trust_remote_code)
        report.base_model_unusable(unusable_weights(config.base_model))
    except TrainingFailure as err:  # unreachable offline, a folder not allowed: a run could not load it either
        report.base_model_unusable(str(err))
        return report
    except Exception as err:  # anything else: still report the rows
        report.problem("", f"token lengths not computed: {getattr(err, 'cause', None) or err}")
        return report
    if config.target_modules == "custom" and config.custom_target_modules and not report.blocker:
        report.blocker = _custom_targets_blocker(config)
    if takes_no_system_turn(tokenizer) and any(m["role"] == "system" for e in train for m in e.messages or []):
        report.problem("", "this model's chat template takes no system turn: the system text is put at the start of "
                           "the first user turn, in training and in Try it alike", kept=True)
    # Each example's tokens are let go once counted: kept for all 52,000 rows of an Alpaca-sized file they took
    # a gigabyte, which the server then held on to.
    lengths, no_reply, trained = [], 0, 0
    for number, example in enumerate(train + validation):
        try:
            ids, labels = encode(example, tokenizer, config)
        except Exception as err:  # the template's own raise_exception ("roles must alternate user/assistant")
            report.blocker = (f"the base model's chat template refuses {example.source or 'a conversation'}: "
                              f"{str(err).rstrip('.')}. "
                              "Choose another base model, or change that conversation")
            return report
        lengths.append(len(ids))
        if number < len(train):
            kept = keeps_a_reply(labels, config.max_length)
            no_reply += not kept
            trained += min(len(ids), config.max_length) if kept else 0
    over = sum(n > config.max_length for n in lengths)
    if no_reply == len(train) and not report.blocker:  # training skips them all, and fails with nothing to learn
        report.blocker = (f"no training example keeps any of its reply within the max length of "
                          f"{config.max_length} tokens: raise the max length")
    # tokens_p95: 95% of the examples are at most this long (the nearest rank)
    report.stats = {"tokens_min": min(lengths), "tokens_mean": round(statistics.mean(lengths), 1),
                    "tokens_p95": sorted(lengths)[math.ceil(0.95 * len(lengths)) - 1], "tokens_max": max(lengths),
                    "tokens_trained": trained,  # an epoch's: cut to the max length, those without a reply skipped
                    "over_max_length": over, "no_reply_within_max_length": no_reply,
                    "max_length": config.max_length,
                    "lengths": lengths}
    return report


def _custom_targets_blocker(config: LLMConfig) -> str:
    """Custom target modules the base model has no layer for: a run would load the model only to fail."""
    from pipelines.llm.model import linear_layer_names, missing_targets, model_skeleton
    try:
        skeleton = model_skeleton(config.base_model, config.trust_remote_code)
    except Exception:  # a config transformers cannot build: the run's own failure will say more
        return ""
    missing = missing_targets(skeleton, config.custom_target_modules)
    if not missing:
        return ""
    return (f"the custom target module{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
            f"{'are not layers' if len(missing) > 1 else 'is not a layer'} of this model, whose linear layers are: "
            f"{', '.join(linear_layer_names(skeleton))}")
