/* The compare page's script: a comparison opened from its URL starts at once, and the
   Compare button comes back once every column's stream has ended (each column is its
   own EventSource; the server cannot tell which one ends last). */
(function () {
  "use strict";

  function finished(column) {
    return column.querySelector(".status .status-text:not(.is-streaming)") !== null;
  }

  document.addEventListener("htmx:sseMessage", function (event) {
    if (!event.detail || event.detail.type !== "done") { return; }
    var columns = document.querySelectorAll("#result .compare-column");
    var button = document.getElementById("compare-submit");
    if (!button || !columns.length || !Array.prototype.every.call(columns, finished)) { return; }
    button.disabled = false;
    button.classList.remove("is-busy");
    button.textContent = "Compare";
  });

  /* /compare?models=...&prompt=... (a shared comparison): run it, through htmx. */
  function autostart() {
    var form = document.querySelector("#compare-form[data-autostart]");
    if (!form || !window.htmx) { return; }
    form.removeAttribute("data-autostart");
    form.requestSubmit(document.getElementById("compare-submit"));
  }
  /* after htmx has set the form up (its own DOMContentLoaded handler runs first) */
  document.addEventListener("DOMContentLoaded", function () { window.setTimeout(autostart, 0); });
})();
