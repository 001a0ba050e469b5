// Runs before Gradio's modules load (studio/page.py puts it first in the page's <head>).
//
// Gradio's status tracker counts how long an event has run, shown to a tenth of a second, by asking for
// every animation frame (60 a second); and the tracker of the page's loading screen never stops counting,
// long after the screen is gone. Each frame makes the browser draw the page again: on a machine without a
// GPU that is a steady 4% of a core taken from training. These ticks now come ten times a second from a
// plain timer, which draws nothing unless the shown count changed.
(() => {
  const frame = window.requestAnimationFrame.bind(window);
  const cancelFrame = window.cancelAnimationFrame.bind(window);
  // The tracker's tick, as Gradio 6 ships it minified: ()=>{a(b,(performance.now()-c(d))/1e3),e&&f()}
  const elapsedTick = /^\(\)=>\{\w+\(\w+,\(performance\.now\(\)-\w+\(\w+\)\)\/1e3\),\w+&&\w+\(\)\}$/;
  window.requestAnimationFrame = (callback) =>
    elapsedTick.test(String(callback)) ? -setTimeout(() => callback(performance.now()), 100) : frame(callback);
  window.cancelAnimationFrame = (id) => (id < 0 ? clearTimeout(-id) : cancelFrame(id));
})();

// A folder picked in an upload box reaches the server as loose files: Gradio sends each file's name, not its
// place in the folder, so cat/001.png and dog/001.png would meet as two 001.png and a kohya-style 10_cat/
// would lose its name. Before Gradio's own listener reads the files, each is renamed after its path in the
// folder, with U+2215 for "/" (a character Gradio's file names keep); the server puts them back in their
// folders (pipelines/archives.py, gather_folder). A path longer than Gradio keeps of a name (200 bytes, see
// MARKED_NAME_BYTES) is sent as the file's name alone, as before.
document.addEventListener("change", (event) => {
  const input = event.target;
  if (!(input instanceof HTMLInputElement) || !input.webkitdirectory || !input.files) return;
  const files = Array.from(input.files);
  if (!files.some((file) => file.webkitRelativePath.includes("/"))) return;
  const named = new DataTransfer();
  for (const file of files) {
    const parts = (file.webkitRelativePath || file.name).split("/").map((part) => part.replaceAll("\u2215", "_"));
    const place = parts.join("\u2215");
    const name = new TextEncoder().encode(place).length <= 200 ? place : file.name;
    named.items.add(new File([file], name, { type: file.type, lastModified: file.lastModified }));
  }
  input.files = named.files;
}, true);
