/* Fable's one script: small enhancements that htmx attributes cannot express.
   The pages work without it (and without htmx): forms are plain POSTs then.
   No inline scripts or handlers anywhere, so a strict Content-Security-Policy can apply. */
(function () {
  "use strict";

  document.documentElement.classList.add("js");

  /* The text of an element as a reader sees it: without the screen-reader-only labels. */
  function visibleText(element) {
    var copy = element.cloneNode(true);
    copy.querySelectorAll(".visually-hidden").forEach(function (node) { node.remove(); });
    return copy.textContent;
  }

  function copyText(text) {
    if (navigator.clipboard && window.isSecureContext) {
      return navigator.clipboard.writeText(text).then(function () { return true; },
                                                       function () { return fallbackCopy(text); });
    }
    return Promise.resolve(fallbackCopy(text));
  }

  /* For pages where the Clipboard API is missing or refused (e.g. inside an iframe). */
  function fallbackCopy(text) {
    var area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.className = "visually-hidden";
    document.body.appendChild(area);
    area.select();
    var ok = false;
    try { ok = document.execCommand("copy"); } catch (e) { ok = false; }
    area.remove();
    return ok;
  }

  /* Copy buttons: <button data-copy-target="element-id">. */
  document.addEventListener("click", function (event) {
    var button = event.target.closest("[data-copy-target]");
    if (!button) { return; }
    var target = document.getElementById(button.getAttribute("data-copy-target"));
    if (!target) { return; }
    var label = button.textContent;
    copyText(visibleText(target)).then(function (ok) {
      button.textContent = ok ? "Copied" : "Copy failed";
      window.setTimeout(function () { button.textContent = label; }, 1600);
    });
  });

  /* Ctrl+Enter (or Cmd+Enter) in a form's text box submits the form. */
  document.addEventListener("keydown", function (event) {
    if (event.key !== "Enter" || !(event.ctrlKey || event.metaKey)) { return; }
    var form = event.target.form;
    if (!form) { return; }
    var submit = form.querySelector("button[type='submit']");
    if (submit && !submit.disabled) {
      event.preventDefault();
      form.requestSubmit(submit);
    }
  });

  /* The prompt box starts with the chosen model's suggested prompt (its data-prompt) and,
     while nobody has edited it, follows the picker to the next model's; the sampling
     options say how the model samples (data-sampling). */
  document.addEventListener("change", function (event) {
    var radio = event.target;
    if (radio.name !== "model" || !radio.form) { return; }
    var box = radio.form.querySelector("textarea[name='prompt'][data-example]");
    if (box && box.value === box.dataset.example && radio.dataset.prompt !== undefined) {
      box.value = box.dataset.example = radio.dataset.prompt;
    }
    var sampling = radio.form.querySelector(".model-sampling");  /* and says how it samples */
    if (sampling) { sampling.textContent = radio.dataset.sampling; }
  });

  /* A streamed result is busy (screen readers wait) until its stream closes. */
  document.addEventListener("htmx:sseClose", function (event) {
    event.target.querySelectorAll("[aria-busy='true']").forEach(function (node) {
      node.setAttribute("aria-busy", "false");
    });
  });

  /* A form post that failed (server error, network down): say so where the result goes. */
  function requestFailed(event) {
    var result = document.getElementById("result");
    if (!result || !event.target.closest("form")) { return; }
    var xhr = event.detail && event.detail.xhr;
    var status = xhr ? xhr.status : 0;
    var message = document.createElement("p");
    message.className = "alert";
    message.setAttribute("role", "alert");
    if (status === 429) {
      var wait = xhr.getResponseHeader("Retry-After");
      message.textContent = "Too many generations from your address. Please try again" +
        (wait ? " in " + wait + " s." : " in a moment.");
    } else if (status === 403) {
      message.textContent = "The server refused the form as coming from another site. " +
        "Reload the page and try again.";
    } else {
      message.textContent = status
        ? "The server could not start the generation (HTTP " + status + "). Please try again."
        : "The server cannot be reached. Check the connection and try again.";
    }
    result.replaceChildren(message);
  }
  document.addEventListener("htmx:responseError", requestFailed);
  document.addEventListener("htmx:sendError", requestFailed);
})();
