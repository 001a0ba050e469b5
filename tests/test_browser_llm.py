"""The Language-model tab in a real browser against a real server: the whole journey a user takes."""

import re
import zipfile

from playwright.sync_api import expect

from tests.browser import ROOT, Calls, screenshot, step_of, wait_status


def set_number(page, label: str, value):
    """Type into a number field, or into the number box beside a slider; returns the box. A field in an
    accordion just opened can still be mounting: on a loaded machine its first value arrived after the typing
    once and replaced it, so the typing is repeated until the value stays."""
    import re
    box = page.get_by_role("spinbutton", name=re.compile(rf"^(number input for )?{re.escape(label)}$")).first
    for attempt in range(3):
        box.fill(str(value))
        box.press("Tab")
        try:
            expect(box).to_have_value(str(value), timeout=5_000)
            break
        except AssertionError:
            if attempt == 2:
                raise
    return box


def test_an_upload_takes_the_place_of_the_sample_data(server, page, tmp_path):
    """The tab opens with the sample data in its box, and Gradio adds an upload to what a box holds: the user's
    two rows were trained with the 24 Zorbia rows ('26 of 26')."""
    mine = tmp_path / "mine.csv"
    mine.write_text("prompt,completion\nWhat is 2+2?,4\nName a colour.,Blue\n")
    page.goto(server.url)
    expect(page.locator("#llm-data-summary")).to_contain_text("24 of 24 rows usable (alpaca)")
    page.locator("#llm-train-files input[type=file]").set_input_files(str(mine))
    expect(page.locator("#llm-data-summary")).to_contain_text("2 of 2 rows usable (prompt_completion)")
    expect(page.locator("#llm-train-files")).not_to_contain_text("sample")
    other = tmp_path / "more.csv"  # and a file added beside the user's own stays with it
    other.write_text("prompt,completion\nWhat is 3+3?,6\n")
    page.locator("#llm-train-files input[type=file]").set_input_files(str(other))
    expect(page.locator("#llm-data-summary")).to_contain_text("3 of 3 rows usable")


def test_the_preview_keeps_line_breaks_and_cuts_long_cells(server, page, tmp_path):
    """A prompt's lines ran together in the preview ("as the model will see it"), and a row of 20,000 characters
    filled the table, its response out of sight."""
    rows = tmp_path / "rows.csv"
    rows.write_text('instruction,output\n"Write a poem.\nKeep it short.",Done.\n' + "Long," + "word " * 4000 + "\n")
    page.goto(server.url)
    expect(page.locator("#llm-data-summary")).to_contain_text("24 of 24")
    page.locator("#llm-train-files input[type=file]").set_input_files(str(rows))
    expect(page.locator("#llm-data-summary")).to_contain_text("2 of 2 rows usable")
    shown = page.locator("#llm-preview").inner_text()  # (as laid out: a line break the page ignores is a space)
    assert "Write a poem.\nKeep it short." in shown
    assert "word … (19,500 more characters)" in shown


def test_upload_train_watch_reload_stop_resume_try_and_download(server, page, tmp_path):
    page.goto(server.url)
    expect(page.locator("#llm-train")).to_be_enabled()  # the sample data is preselected
    expect(page.locator("#llm-data-summary")).to_contain_text("24 of 24 rows usable (alpaca)")
    page.locator("#llm-train-files button[aria-label='Clear']").first.click()
    expect(page.locator("#llm-train")).to_be_disabled()
    # Another shape of data than the sample's: the columns found in the sample are no choice made for it
    # (once, only the first of the column boxes was emptied by Clear, and this file had no usable row).
    other = tmp_path / "pairs.csv"
    other.write_text("prompt,completion\nWhat is 2+2?,4\nName a colour.,Blue\n")
    page.locator("#llm-train-files input[type=file]").set_input_files(str(other))
    expect(page.locator("#llm-data-summary")).to_contain_text("2 of 2 rows usable (prompt_completion)")
    page.locator("#llm-train-files button[aria-label='Clear']").first.click()
    expect(page.locator("#llm-train")).to_be_disabled()
    page.locator("#llm-train-files input[type=file]").set_input_files(str(ROOT / "assets" / "llm" / "sample.csv"))
    expect(page.locator("#llm-data-summary")).to_contain_text("24 of 24 rows usable (alpaca)")
    expect(page.locator("#llm-train")).to_be_enabled()
    set_number(page, "LoRA rank", 8)          # a slider's number box
    set_number(page, "Max steps", 400)        # long enough to reload and stop mid-run
    set_number(page, "Sample every", 100)
    screenshot(page, "llm-tab.png")
    page.locator("#llm-train").click()

    first = wait_status(page, "llm", lambda t: "running" in t and step_of(t) > 0)
    curve = page.locator("#llm-loss-plot polyline").first  # the raw training loss
    drawn = curve.get_attribute("points")
    later = wait_status(page, "llm", lambda t: step_of(t) > step_of(first) + 2)
    assert "/400" in later and "tokens/s" in later and "ETA" in later
    # The curve grows with the status line (both swapped in by the page's own poller, live.js).
    expect(curve).not_to_have_attribute("points", drawn)
    assert len(curve.get_attribute("points").split()) > len(drawn.split())
    config = next((server.home / "runs").iterdir()) / "config.yaml"
    assert "lora_rank: 8" in config.read_text()

    page.reload()  # reattach: the running run comes back with its curve
    again = wait_status(page, "llm", lambda t: "running" in t and step_of(t) >= step_of(later))
    assert config.parent.name in again
    page.locator("#llm-loss-plot").scroll_into_view_if_needed()
    screenshot(page, "llm-training.png")

    page.get_by_role("button", name="Stop (save checkpoint)").click()
    stopped = wait_status(page, "llm", lambda t: "stopped" in t)
    stopped_at = step_of(stopped)
    assert 0 < stopped_at < 400 and (config.parent / "checkpoints" / f"step-{stopped_at}").is_dir()

    calls = Calls(page, "/queue/join", "/studio/live")
    page.get_by_role("button", name="Resume").click()
    done = wait_status(page, "llm", lambda t: "completed" in t, timeout=300)
    assert step_of(done) == 400
    # A finished run's panel stops refreshing: the page asks the server nothing about it while it sits there
    # (every refresh costs the browser a re-render, taken from training on a machine of few cores); only
    # whether the server is there, every 10 s (/studio/runs, live.js).
    assert calls.during(5000) == []

    page.locator("#llm-prompt textarea").fill("Who founded the Lantern Guild?")
    page.locator("#llm-generate").click()
    tuned = page.locator("#llm-tuned-answer [data-testid='bot']")
    expect(tuned).to_have_text(["The Lantern Guild was founded by Mira Okafor."], timeout=120_000)
    base = page.locator("#llm-base-answer [data-testid='bot']")
    expect(base).to_have_count(1, timeout=120_000)
    assert base.inner_text() != tuned.inner_text()
    page.locator("#llm-generate").scroll_into_view_if_needed()
    screenshot(page, "llm-try-it.png")
    # (Generate is not heard while a reply is being written: Stop, or the end of the base model's 64 tokens)
    expect(page.locator("#llm-base-answer [data-testid='status-tracker']")).to_have_class(re.compile(r"\bhide\b"),
                                                                                           timeout=120_000)
    # A follow-up is asked after the conversation so far; without, each prompt on its own
    page.locator("#llm-follow-up input").check()
    page.locator("#llm-prompt textarea").fill("What is the capital of Zorbia?")
    page.locator("#llm-generate").click()
    expect(page.locator("#llm-tuned-answer [data-testid='user']")).to_have_count(2)
    expect(base).to_have_count(2, timeout=120_000)
    page.locator("#llm-stop-generating").click()
    page.locator("#llm-follow-up input").uncheck()
    # A reply shows as it grows, and Stop ends it where it is (the base model, random weights, would go on for
    # 512 tokens: half a minute and more on a CPU)
    set_number(page, "Max new tokens", 512)
    page.locator("#llm-prompt textarea").fill("Tell me everything about Zorbia.")
    page.locator("#llm-generate").click()
    expect(page.locator("#llm-tuned-answer [data-testid='user']")).to_have_count(1)
    expect(base).to_have_count(1, timeout=120_000)
    page.locator("#llm-stop-generating").click()
    page.wait_for_timeout(500)  # (an update already on its way)
    stopped = base.inner_text()
    page.wait_for_timeout(3000)
    assert stopped and base.inner_text() == stopped, stopped

    page.get_by_role("button", name="Adapter (zip)").click()
    link = page.locator("#llm-download a").first
    expect(link).to_be_visible(timeout=120_000)
    with page.expect_download() as download:
        link.click()
    path = tmp_path / "adapter.zip"
    download.value.save_as(path)
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(zipfile.ZipFile(path).namelist())


def test_an_idle_page_asks_for_no_animation_frames(server, page):
    """Every animation frame makes the browser draw the page again: 60 a second were a steady share of a
    core taken from training (Gradio's loading screen kept counting its seconds; early.js stops that)."""
    page.add_init_script("window.frames_asked = 0; const ask = window.requestAnimationFrame.bind(window);"
                         "window.requestAnimationFrame = (f) => { window.frames_asked++; return ask(f); };")
    page.goto(server.url)
    expect(page.locator("#llm-train")).to_be_enabled()
    # The page's load events animate their spinners while they run, and the panels fade in: within 30 s the
    # page must go quiet (that loop never did).
    asked = []
    for _ in range(15):
        before = page.evaluate("window.frames_asked")
        page.wait_for_timeout(2000)
        asked.append(page.evaluate("window.frames_asked") - before)
        if asked[-1] < 5:
            break
    assert asked[-1] < 5, asked


def test_broken_csv_gets_a_message_and_no_train_button(server, page, tmp_path):
    bad = tmp_path / "broken.csv"
    bad.write_text("instruction,output\nSay hi,hi,extra\n,\n", encoding="utf-8")
    old_excel = tmp_path / "old.xls"  # the browser used to refuse it with a bare "Invalid file type"
    old_excel.write_bytes(b"\xd0\xcf\x11\xe0 an Excel 97 workbook")
    page.goto(server.url)
    expect(page.locator("#llm-train")).to_be_enabled()
    page.locator("#llm-train-files button[aria-label='Clear']").first.click()
    page.locator("#llm-train-files input[type=file]").set_input_files([str(bad), str(old_excel)])
    expect(page.locator("#llm-data-summary")).to_contain_text("No usable data")
    problems = page.locator("#llm-problems")
    expect(problems).to_contain_text("has 3 fields but the header has 2")
    expect(problems).to_contain_text("save it as an Excel Workbook (.xlsx) or as CSV")
    expect(page.locator("#llm-train")).to_be_disabled()
    screenshot(page, "llm-bad-data.png")


def test_two_browser_sessions_see_the_same_truth(server, browser):
    pages = []
    for _ in range(2):
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        pages.append(context.new_page())
    first, second = pages
    first.goto(server.url)
    expect(first.locator("#llm-train")).to_be_enabled()
    set_number(first, "Max steps", 400)
    first.locator("#llm-train").click()
    running = wait_status(first, "llm", lambda t: "running" in t and step_of(t) > 0)
    run_id = running.split("·")[1].strip()
    second.goto(server.url)  # a second browser attaches to the run the first one started
    wait_status(second, "llm", lambda t: run_id in t and "running" in t)
    second.get_by_role("button", name="Stop (save checkpoint)").click()
    for page in pages:
        stopped = wait_status(page, "llm", lambda t: run_id in t and "stopped" in t)
        assert "Resume" in stopped
    second.get_by_role("button", name="Resume").click()  # the first page, which stopped refreshing fast, sees it too
    for page in pages:
        wait_status(page, "llm", lambda t: run_id in t and "running" in t, timeout=60)
    second.get_by_role("button", name="Cancel").click()
    for page in pages:
        wait_status(page, "llm", lambda t: run_id in t and "cancelled" in t, timeout=60)
    for page in pages:
        page.context.close()


def test_out_of_range_settings_are_refused_with_the_field_name(server, page):
    page.goto(server.url)
    expect(page.locator("#llm-train")).to_be_enabled()
    runs_before = len(list((server.home / "runs").iterdir())) if (server.home / "runs").exists() else 0
    set_number(page, "Learning rate", 5)
    page.locator("#llm-train").click()
    message = page.locator("#llm-message")
    expect(message).to_contain_text("learning_rate")
    expect(message).to_contain_text("must be at most 1.0")
    assert len(list((server.home / "runs").iterdir())) == runs_before


def test_two_processes_from_the_advanced_settings_show_each_rank(server, page):
    page.goto(server.url)
    expect(page.locator("#llm-train")).to_be_enabled()
    page.locator("button:visible", has_text="Advanced").first.click()
    shown = page.locator("#llm-global-batch")
    expect(shown).to_contain_text("Global batch: 8 examples")  # the sample config: batch 8, 1 process
    expect(set_number(page, "Processes", 2)).to_have_value("2")
    expect(shown).to_contain_text("Global batch: 16 examples")  # worked out in the browser, at once
    page.get_by_label("Strategy", exact=True).click()
    page.get_by_role("option", name="fsdp", exact=True).click()  # the base model's blocks split between the two
    set_number(page, "Max steps", 12)
    page.locator("#llm-train").click()
    # The run's own status (a rank can read "completed" while rank 0 still saves the adapter).
    done = wait_status(page, "llm", lambda t: "· completed" in t, timeout=300)
    assert "global batch 16 over 2 processes" in done
    assert "rank 0 completed at step 12" in done and "rank 1 completed at step 12" in done
    assert "MB of model weights" in done
    run_dir = max((server.home / "runs").iterdir())
    assert "strategy: fsdp" in (run_dir / "config.yaml").read_text()
    assert "FSDP: 4 blocks of the base model are split between 2 processes" in (run_dir / "log.txt").read_text()


def test_load_config_keeps_the_data_just_uploaded(server, page, tmp_path):
    """A config.yaml loaded in the browser arrives without its data: the file it names that the user has just
    uploaded stays in the box, where it was cleared ('not found next to it')."""
    mine = tmp_path / "mine.csv"
    mine.write_text("instruction,output\n" + "".join(f"Say {i},{i}\n" for i in range(6)), encoding="utf-8")
    config = tmp_path / "config.yaml"
    config.write_text("modality: llm\ntrain_files: [/elsewhere/mine.csv]\nlora_rank: 4\n", encoding="utf-8")
    page.goto(server.url)
    expect(page.locator("#llm-data-summary")).to_contain_text("24 of 24")
    page.locator("#llm-train-files button[aria-label='Clear']").first.click()
    page.locator("#llm-train-files input[type=file]").set_input_files(str(mine))
    expect(page.locator("#llm-data-summary")).to_contain_text("6 of 6 rows usable")
    with page.expect_file_chooser() as chooser:
        page.locator("button:visible", has_text="Load config").first.click()
    chooser.value.set_files(str(config))
    expect(page.locator("#llm-message")).to_have_text("Settings loaded from the config file.")
    expect(page.get_by_role("spinbutton", name="number input for LoRA rank").first).to_have_value("4")
    expect(page.locator("#llm-train-files")).to_contain_text("mine")  # (shown as "mine .csv")
    expect(page.locator("#llm-data-summary")).to_contain_text("6 of 6 rows usable")
    expect(page.locator("#llm-train")).to_be_enabled()


def test_settings_outlive_a_reload_and_reset_returns_to_the_sample(server, page):
    """A reload (or Gradio's own, after the server restarted) lost every setting made on the page."""
    page.goto(server.url)
    expect(page.locator("#llm-train")).to_be_enabled()
    rank = set_number(page, "LoRA rank", 8)
    page.get_by_label("Run name").fill("my tuned bot")
    page.get_by_label("Run name").press("Tab")
    page.reload()
    expect(page.locator("#llm-message")).to_contain_text("Your settings from before the page was reloaded are back")
    expect(page.get_by_label("Run name")).to_have_value("my tuned bot")
    expect(rank).to_have_value("8")
    expect(page.locator("#llm-train")).to_be_enabled()
    page.locator("#llm-reset").click()
    expect(page.locator("#llm-message")).to_contain_text("Settings reset to the sample run's.")
    expect(page.get_by_label("Run name")).to_have_value("")
    expect(rank).to_have_value("16")
    page.reload()
    expect(page.locator("#llm-data-summary")).to_contain_text("24 of 24 rows usable")
    expect(page.get_by_label("Run name")).to_have_value("")
    expect(page.locator("#llm-message")).not_to_contain_text("are back")


def test_a_custom_target_module_the_model_lacks_is_found_as_it_is_typed(server, page):
    """Editing the custom target modules checked nothing: the mistake showed only when Train was pressed."""
    page.goto(server.url)
    expect(page.locator("#llm-train")).to_be_enabled()
    page.locator("button:visible", has_text="Advanced").first.click()
    custom = page.get_by_label("Custom target modules")
    custom.fill("q_proj, v_projj")
    custom.press("Tab")
    page.get_by_label("Target modules", exact=True).click()
    page.get_by_role("option", name="custom", exact=True).click()
    expect(page.locator("#llm-data-summary")).to_contain_text("module v_projj is not a layer of this model")
    expect(page.locator("#llm-train")).to_be_disabled()
    custom.fill("q_proj, v_proj")
    custom.press("Tab")
    expect(page.locator("#llm-train")).to_be_enabled()
