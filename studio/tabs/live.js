// The live panels' and the Runs table's fast refresh, outside Gradio's event system (see FAST_REFRESH in
// widgets.py). Every 3 s, for each panel that is on screen and whose run can still change, ask the server
// what was written since the version the page shows, and swap in the status line, the curve and the log's
// tail it sends. When the change needs the whole panel (the run's status at once; new samples or evaluations
// at most every 10 s), press the panel's hidden Refresh button, which asks Gradio for all of it. The Runs
// table, while on screen, is refreshed the same way (runs_tab.table_version says when).
(() => {
  // A poll with its swaps costs the browser and the server about 50 ms of CPU (software-rendered Chromium),
  // taken from a run training on all the cores (BENCHMARKS.md, "UI versus CLI"); every 3 s is still live.
  const POLL_MS = 3000;
  // New samples or evaluations are fetched with the whole panel at most this often; a new status at once.
  const EXTRAS_EVERY_MS = 10000;
  // The Runs table: runs that come, go or change status at once; only their progress at most this often.
  const TABLE_PROGRESS_EVERY_MS = 15000;
  let tableRefreshedAt = 0; // when the table last changed its version (runs_tab.version_mark)
  let tableAskedFor = null; // the server's version the last refresh was asked for
  const wholeShown = {}; // panel key -> {run, panel, at}: what the last whole-panel refresh showed, and when
  const root = () => (window.gradio_config && window.gradio_config.root) || window.location.origin;

  // While the server does not answer, the page says so: the panels froze at their last state, and Gradio
  // said "Connection lost" only after a click. An idle page asks every 10 s so as to know. A request that
  // hangs (a network gone) ends after 10 s; a proxy's "bad gateway" (5xx) is no answer either.
  const IDLE_ASK_MS = 10000;
  let askedAt = 0;
  async function ask(path) {
    askedAt = Date.now();
    let response;
    try {
      response = await fetch(`${root()}${path}`, { credentials: "same-origin", cache: "no-store",
                                                   signal: AbortSignal.timeout(10000) });
    } catch (err) {
      serverAnswers(false);
      throw err;
    }
    serverAnswers(response.status < 500);
    return response;
  }
  function serverAnswers(yes) {
    const banner = document.getElementById("studio-offline");
    if (yes || banner) {
      if (yes) banner?.remove();
      return;
    }
    const line = document.createElement("div");
    line.id = "studio-offline";
    line.setAttribute("role", "alert");
    line.textContent = "The studio's server is not answering (stopped or restarting, or the network is down). " +
      "Runs keep training in their own processes. This page reconnects by itself, and may reload when it " +
      "does: settings not yet used for a run are then lost (Save config keeps them).";
    document.body.prepend(line);
  }

  async function update(line) {
    const panel = line.closest("[id$='-run-status']");
    if (!panel) return;
    const key = panel.id.slice(0, -"-run-status".length);
    const query = new URLSearchParams({ run: line.dataset.liveRun, version: line.dataset.liveVersion });
    const response = await ask(`/studio/live?${query}`);
    if (!response.ok) return;
    const answer = await response.json();
    // Unchanged, or Gradio redrew the panel while we waited (its version is the newer one then).
    if (answer.version === line.dataset.liveVersion || !line.isConnected) return;
    const run = line.dataset.liveRun;
    if (!(wholeShown[key] && wholeShown[key].run === run)) wholeShown[key] = { run, panel: line.dataset.livePanel, at: 0 };
    const curve = document.querySelector(`#${key}-loss-plot .live-curve`);
    if (curve) curve.outerHTML = answer.curve;
    const log = document.querySelector(`#${key}-log textarea`);
    if (log && log.value !== answer.log) {
      log.value = answer.log;
      log.scrollTop = log.scrollHeight;
    }
    line.outerHTML = answer.status;
    const fresh = panel.querySelector(".live-status");
    const now = fresh ? fresh.dataset.livePanel : "gone";
    const shown = wholeShown[key];
    const statusChanged = now.split(":")[0] !== shown.panel.split(":")[0];
    if (now !== shown.panel && (statusChanged || Date.now() - shown.at > EXTRAS_EVERY_MS)) {
      wholeShown[key] = { run, panel: now, at: Date.now() };
      document.getElementById(`${key}-refresh`)?.click();
    }
  }

  async function updateTable() {
    const table = document.getElementById("runs-table");
    const mark = document.querySelector("#runs-table-version [data-version]");
    if (!table || !mark || table.offsetParent === null) return;
    if (mark.dataset.version !== table.dataset.madeAt) { // Gradio refreshed it, for whatever reason
      table.dataset.madeAt = mark.dataset.version;
      tableRefreshedAt = Date.now();
    }
    const response = await ask("/studio/runs");
    if (!response.ok) return;
    const { version } = await response.json();
    const [runs, progress] = version.split(":");
    const [shownRuns, shownProgress] = mark.dataset.version.split(":");
    const due = runs !== shownRuns || (progress !== shownProgress && Date.now() - tableRefreshedAt > TABLE_PROGRESS_EVERY_MS);
    if (due && version !== tableAskedFor) {
      tableAskedFor = version; // once per version, even if Gradio is slow to answer
      tableRefreshedAt = Date.now();
      document.getElementById("runs-table-refresh")?.click();
    }
  }

  async function poll() {
    if (!document.hidden) {
      const shown = [...document.querySelectorAll(".live-status[data-live-poll='1']")]
        .filter((line) => line.offsetParent !== null);
      for (const step of [...shown.map((line) => () => update(line)), updateTable]) {
        try {
          await step();
        } catch (err) {
          // The server restarting, say: the next round asks again.
        }
      }
      if (Date.now() - askedAt > IDLE_ASK_MS) await ask("/studio/runs").catch(() => {});
    }
    setTimeout(poll, POLL_MS);
  }
  setTimeout(poll, POLL_MS);
})();
