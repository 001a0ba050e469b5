"""The Runs tab in a real browser against a real server, over runs made by the real CLI."""

import json
import os
import re
import subprocess
import sys
import time
import zipfile

import yaml
from playwright.sync_api import expect

from studio.runs import Registry
from tests.browser import ROOT, Calls, screenshot


def train_detached(server, tmp_path, **changes) -> str:
    data = yaml.safe_load((ROOT / "assets" / "llm" / "config.yaml").read_text())
    data.update({"train_files": [str(ROOT / "assets" / "llm" / "sample.csv")], "sample_every": 3,
                 "checkpoint_every": 3, "validation_fraction": 0.25, "eval_every": 3, **changes})
    path = tmp_path / f"{changes['name']}.yaml"
    path.write_text(yaml.safe_dump(data))
    result = subprocess.run([sys.executable, "-m", "studio.cli", "train", str(path), "--detach"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, STUDIO_HOME=str(server.home), STUDIO_MAX_CONCURRENT_RUNS="2"))
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.split()[1]


def row_cell(page, text: str):
    page.locator("#runs-table").scroll_into_view_if_needed()
    return page.locator("#runs-table").get_by_text(text, exact=True).filter(visible=True).first


def test_list_select_compare_clone_and_delete(server, page, tmp_path):
    ids = [train_detached(server, tmp_path, name="run-a", max_steps=6, lora_rank=8),
           train_detached(server, tmp_path, name="run-b", max_steps=6, lora_rank=4)]
    registry = Registry(server.home)
    deadline = time.monotonic() + 240
    while not all(registry.get(i).status == "completed" for i in ids):
        assert time.monotonic() < deadline, [registry.get(i).status for i in ids]
        time.sleep(0.5)

    page.goto(server.url)
    page.get_by_role("tab", name="Runs").click()
    table = page.locator("#runs-table")
    expect(table).to_contain_text("run-a")
    expect(table).to_contain_text("run-b")
    expect(table).to_contain_text("6/6 (100%)")
    expect(table).to_contain_text("completed")
    # The whole table fits the page: fitted to content, its last column ran off the right edge, and "best
    # validation" stood one letter a line (on a small laptop's 1024 px)
    page.set_viewport_size({"width": 1024, "height": 1000})
    width = 1024
    for header in ("duration", "best validation"):
        box = table.locator("th", has_text=header).first.bounding_box()
        assert box["x"] + box["width"] <= width and box["height"] < 80, (header, box, width)
    page.set_viewport_size({"width": 1400, "height": 1000})
    # Clone with nothing selected: said, where a raised error covered every field of the tab with error frames
    page.locator("#runs-clone").click()
    expect(page.locator("#runs-message")).to_contain_text("Select a run first.")
    expect(page.locator(".error")).to_have_count(0)
    page.locator(".toast-close").first.click()  # (the warning, out of the screenshot below)

    # select one: its summary, config, files, curve and log
    row_cell(page, "run-a").click()
    expect(page.locator("#runs-selected")).to_contain_text("run-a")
    expect(page.locator("#runs-run-status")).to_contain_text("completed")
    expect(page.locator("#runs-name input, #runs-name textarea").first).to_have_value("run-a")
    screenshot(page, "runs-tab.png")
    page.get_by_text("Config", exact=True).click()
    expect(page.locator("#runs-config")).to_contain_text("lora_rank: 8")
    page.get_by_text("Files", exact=True).click()
    expect(page.locator("#runs-files")).to_contain_text("checkpoints/step-6/")
    expect(page.locator("#runs-samples")).to_contain_text("Zorbia")

    # compare both: one plot coloured by run, and only the settings that differ
    select = page.locator("#runs-compare-select input").first
    for label in ("run-a", "run-b"):
        select.click()
        page.get_by_role("option", name=f"{label} (").first.click()
    page.locator("#runs-compare").click()
    plot = page.locator("#runs-compare-plot")
    expect(plot).to_contain_text("run-a (")
    expect(plot).to_contain_text("run-b (")
    diff = page.locator("#runs-diff")
    expect(diff).to_contain_text("lora_rank")
    expect(diff).not_to_contain_text("batch_size")
    plot.scroll_into_view_if_needed()
    screenshot(page, "runs-compare.png")
    page.locator("#runs-compare-metric input").first.click()
    page.get_by_role("option", name="eval_loss").click()
    expect(plot).to_contain_text("eval_loss")  # the validation curves, still one per run
    expect(plot).to_contain_text("run-b (")

    # clone: the Language model tab opens with the run's settings filled in
    row_cell(page, "run-b").click()
    expect(page.locator("#runs-selected")).to_contain_text("run-b")
    page.locator("#runs-clone").click()
    expect(page.locator("#llm-message")).to_contain_text("Cloned from run run-b")
    expect(page.get_by_label("Run name")).to_have_value("run-b-clone")
    expect(page.get_by_role("spinbutton", name="LoRA rank").first).to_have_value("4")
    expect(page.locator("#llm-train")).to_be_enabled()  # the run's own copy of the data passed the check

    # open the older run in its tab, to export (and try) it there: the tabs only ever showed their newest run
    page.get_by_role("tab", name="Runs").click()
    row_cell(page, "run-a").click()
    expect(page.locator("#runs-selected")).to_contain_text("run-a")
    page.locator("#runs-open").click()
    expect(page.locator("#llm-run-status")).to_contain_text("run-a")
    # with run-a's settings in the form, not those left there (run-b's clone: rank 4), which Train would use
    expect(page.locator("#llm-message")).to_contain_text("Opened run run-a")
    expect(page.get_by_role("spinbutton", name="LoRA rank").first).to_have_value("8")
    page.get_by_role("button", name="Adapter (zip)").click()
    link = page.locator("#llm-download a").first
    expect(link).to_be_visible(timeout=120_000)
    with page.expect_download() as download:
        link.click()
    download.value.save_as(tmp_path / "adapter.zip")
    with zipfile.ZipFile(tmp_path / "adapter.zip") as archive:
        settings = next(n for n in archive.namelist() if n.endswith("adapter_config.json"))
        assert json.loads(archive.read(settings))["r"] == 8  # run-a's rank (run-b, the newest, has 4)

    # delete, with confirmation
    page.get_by_role("tab", name="Runs").click()
    row_cell(page, "run-a").click()
    expect(page.locator("#runs-selected")).to_contain_text("run-a")
    page.locator("#runs-delete").click()
    expect(page.locator("#runs-confirm-text")).to_contain_text("Delete run-a")
    assert (server.home / "runs" / ids[0]).is_dir()  # nothing happens before the confirmation
    page.locator("#runs-confirm-delete").click()
    expect(page.locator("#runs-message")).to_contain_text("Deleted run run-a")
    expect(table).not_to_contain_text("run-a")
    expect(table).to_contain_text("run-b")
    assert not (server.home / "runs" / ids[0]).exists() and registry.get(ids[0]) is None
    # the Language tab showed run-a (opened there above): it shows the tab's newest run now, not "No run yet"
    page.get_by_role("tab", name="Language model").click()
    expect(page.locator("#llm-run-status")).to_contain_text("run-b")
    expect(page.locator("#llm-download")).to_be_hidden()  # run-a's adapter is not offered beside run-b


def shown_row(page, run_id: str) -> str:
    """The run's row as the table shows it (its cells' text; the table's <tr>s are a hidden copy)."""
    text = " ".join(page.locator("#runs-table").inner_text().split())
    match = re.search(re.escape(run_id) + r"(.*?)(?=\d{8}-\d{6}-|$)", text)
    return match.group(1) if match else ""


def test_the_table_follows_a_training_run_without_a_gradio_event_each_tick(server, page, tmp_path):
    run_id = train_detached(server, tmp_path, name="run-live", max_steps=3000, epochs=1000, sample_every=0,
                            checkpoint_every=10_000, eval_every=0)
    calls = Calls(page, "/queue/join", "/studio/runs")
    page.goto(server.url)
    page.get_by_role("tab", name="Runs").click()
    progress = re.compile(r"running (\d+)/3000 \(")

    def wait_row(predicate, timeout=90):
        deadline = time.monotonic() + timeout
        while not predicate(row := shown_row(page, run_id)):
            assert time.monotonic() < deadline, row
            page.wait_for_timeout(300)
        return row

    shown = int(progress.search(wait_row(progress.search)).group(1))

    # The page asks the server for the table's version (a plain route, /studio/runs) and goes through
    # Gradio only when the table changed: progress alone at most every 15 s. (A Gradio event costs the
    # browser ~0.2 s of a core; the table's old 3 s timer took ~15% of a core from training.)
    made = calls.during(9000, quiet="/queue/join")
    assert sum("/studio/runs" in url for url in made) >= 2
    assert sum("/queue/join" in url for url in made) <= 1, made
    wait_row(lambda row: (m := progress.search(row)) and int(m.group(1)) > shown, timeout=30)  # it moves on

    row_cell(page, "run-live").click()
    expect(page.locator("#runs-selected")).to_contain_text("running")

    # A change of status shows at once, not at the next progress refresh.
    cancel = subprocess.run([sys.executable, "-m", "studio.cli", "cancel", run_id], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, env=dict(os.environ, STUDIO_HOME=str(server.home)))
    assert cancel.returncode == 0, cancel.stdout + cancel.stderr
    wait_row(lambda row: "cancelled" in row, timeout=10)
    expect(page.locator("#runs-selected")).to_contain_text("cancelled", timeout=15_000)  # not left at running
