// AutoCode run viewer: while the run is queued or running, poll `<token>/state` and swap in the re-rendered body.
// The HTML comes from the same server-side template as the page (autoescaped); open <details> stay open.
(function () {
  "use strict";
  var root = document.getElementById("run");
  if (!root) return;
  var FINISHED = ["succeeded", "failed", "cancelled", "interrupted"];
  var url = root.getAttribute("data-state-url");
  var version = root.getAttribute("data-version") || "";
  var every = parseInt(root.getAttribute("data-poll-ms"), 10) || 1000;
  var delay = every;

  function finished() {
    return FINISHED.indexOf(root.getAttribute("data-status")) >= 0;
  }

  function swap(html) {
    var open = {}, closed = {};
    root.querySelectorAll("details[id]").forEach(function (d) {
      (d.open ? open : closed)[d.id] = true;
    });
    root.innerHTML = html;
    root.querySelectorAll("details[id]").forEach(function (d) {
      if (open[d.id]) d.open = true;
      else if (closed[d.id]) d.open = false;
    });
  }

  function poll() {
    fetch(url + "?v=" + encodeURIComponent(version), {cache: "no-store", credentials: "same-origin"})
      .then(function (response) {
        if (response.status === 404) throw new Error("gone");
        if (!response.ok) throw new Error("HTTP " + response.status);
        return response.json();
      })
      .then(function (state) {
        if (state.html !== null && state.version !== version) {
          swap(state.html);
          version = state.version;
        }
        root.setAttribute("data-status", state.status);
        document.title = document.title.replace(/ · [a-z]+$/, " · " + state.status);
        delay = every;
        if (!finished()) setTimeout(poll, delay);
      })
      .catch(function (error) {
        if (error.message === "gone") return;
        delay = Math.min(delay * 2, 15000);  // server restarting or network hiccup: back off, keep trying
        setTimeout(poll, delay);
      });
  }

  if (!finished()) setTimeout(poll, every);
})();
