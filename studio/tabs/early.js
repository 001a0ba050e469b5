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
