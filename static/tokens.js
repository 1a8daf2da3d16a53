/* The token view: once a generation has finished, its text can be shown token by token,
   each token shaded by its probability; focusing or hovering one shows its likeliest
   alternatives. The data comes in the stream's last event, as the JSON of a hidden
   element's data-tokens attribute ([[text, logprob, [[alternative, logprob], ...]], ...]).
   Every piece of model text goes into the page as textContent, never as markup; no
   inline styles (the tooltip is placed through the CSSOM, which the CSP allows).
   Keyboard: Tab reaches the tokens (one tab stop), arrow keys move between them,
   Home/End go to the ends, Escape closes the alternatives, Enter or Space opens them. */
(function () {
  "use strict";

  var BANDS = [0.9, 0.6, 0.3, 0.1];  // band 1: p >= 90 %, ..., band 5: p < 10 %
  var BAND_LABELS = ["90 % or more", "60–90 %", "30–60 %", "10–30 %", "under 10 %"];
  var views = 0;
  var resizer = null;  /* repositions the tooltip shown now (one listener for every view) */
  window.addEventListener("resize", function () { if (resizer) { resizer(); } });
  /* the classes of the text's parts, and their names in its token view */
  var RENAMED = {"output-generated": "token-generated", "story-middle": "token-generated",
                 "output-prompt": "token-prompt", "story-first": "token-context",
                 "story-last": "token-context"};

  function band(p) {
    for (var i = 0; i < BANDS.length; i++) {
      if (p >= BANDS[i]) { return i + 1; }
    }
    return BANDS.length + 1;
  }

  function percent(p) {
    var value = p * 100;
    if (value >= 10) { return Math.round(value) + " %"; }
    if (value >= 1) { return value.toFixed(1) + " %"; }
    if (value >= 0.01) { return value.toFixed(2) + " %"; }
    return "under 0.01 %";
  }

  /* Whitespace made visible (an alternative's text, a line-break token). */
  function visible(text) {
    return text.replace(/\n/g, "↵").replace(/\t/g, "⇥").replace(/ /g, "␣");
  }

  /* A token's text as a screen reader should say it. */
  function spoken(text) {
    if (text === "") { return "no text: a special token or part of a character"; }
    if (!text.trim()) {
      return text.replace(/\n/g, " line break").replace(/\t/g, " tab").replace(/ /g, " space").trim();
    }
    return text.replace(/\n/g, " line break ").trim();
  }

  function element(tag, className, text) {
    var node = document.createElement(tag);
    if (className) { node.className = className; }
    if (text !== undefined) { node.textContent = text; }
    return node;
  }

  /* Text shown with its whitespace made visible, said as words. */
  function tokenText(className, text) {
    var shown = visible(text);
    var span = element("span", className, shown);
    if (shown === text) { return span; }
    span.setAttribute("aria-hidden", "true");
    var wrapper = element("span");
    wrapper.append(span, element("span", "visually-hidden", spoken(text)));
    return wrapper;
  }

  function fillTip(tip, entry) {
    var p = Math.exp(entry[1]);
    var head = element("p", "token-tip-head");
    head.setAttribute("aria-hidden", "true");  // the token's own label says it already
    head.append(tokenText("token-tip-token", entry[0]), " ", element("span", "token-tip-prob", percent(p)));
    var title = element("p", "token-tip-title", "Likeliest here:");
    var list = element("ol", "token-tip-list");
    var chosenListed = false;
    entry[2].forEach(function (alternative, i) {
      var item = element("li");
      var chosen = alternative[0] === entry[0] && !chosenListed;
      if (chosen) { item.className = "is-chosen"; chosenListed = true; }
      item.append(tokenText("token-tip-alt", alternative[0]), " ",
                  element("span", "token-tip-prob", percent(Math.exp(alternative[1]))));
      if (chosen) { item.append(element("span", "visually-hidden", " (chosen)")); }
      if (i < entry[2].length - 1) { item.append(element("span", "visually-hidden", ", ")); }
      list.append(item);
    });
    tip.replaceChildren(head, title, list);
    if (!chosenListed) {
      var note = element("p", "token-tip-note", "Chosen: ");
      note.append(tokenText("token-tip-alt", entry[0]), " " + percent(p));
      tip.append(note);
    }
  }

  /* The token view of one finished result (its .output cloned, the model's text in
     tokens), the toggle that shows it, and its tooltip. */
  function build(result, tokens) {
    var output = result.querySelector(".output");
    var head = result.querySelector(".result-head");
    if (!output || !head || !output.querySelector(".output-generated, .story-middle")) { return; }
    var id = ++views;
    var view = output.cloneNode(true);
    ["id", "aria-live", "aria-busy"].forEach(function (name) { view.removeAttribute(name); });
    view.querySelectorAll("[sse-swap]").forEach(function (node) {
      ["sse-swap", "hx-target", "hx-swap"].forEach(function (name) { node.removeAttribute(name); });
    });
    view.classList.add("token-view");
    Object.keys(RENAMED).forEach(function (name) {  // page scripts and tests find the text's
      view.querySelectorAll("." + name).forEach(function (node) {  // own parts only
        node.classList.replace(name, RENAMED[name]);
      });
    });
    var list = element("span", "token-list");
    list.setAttribute("role", "group");
    list.setAttribute("aria-label", tokens.length + " tokens, shaded by probability: arrow keys " +
                      "move between them, Escape closes the alternatives");
    tokens.forEach(function (entry, i) {
      var p = Math.exp(entry[1]);
      var token = element("span", "token token-band-" + band(p), entry[0]);
      if (entry[0] === "") { token.classList.add("token-empty"); }
      if (/^\n+$/.test(entry[0])) { token.classList.add("token-newline"); }
      token.setAttribute("role", "button");
      token.setAttribute("aria-label", "token '" + spoken(entry[0]) + "', probability " + percent(p));
      token.tabIndex = i === 0 ? 0 : -1;
      token.dataset.index = String(i);
      list.append(token);
    });
    view.querySelector(".token-generated").replaceChildren(list);

    var legend = element("p", "legend token-legend");
    legend.append("Probability of each token under the model (before temperature): ");
    BAND_LABELS.forEach(function (label, i) {
      legend.append(element("span", "token-swatch token-band-" + (i + 1), label), " ");
    });
    var panel = element("div", "token-panel");
    panel.hidden = true;
    panel.append(view, legend);
    output.after(panel);

    var tip = element("div", "token-tip");
    tip.id = "token-tip-" + id;
    tip.setAttribute("role", "tooltip");
    tip.hidden = true;
    result.classList.add("token-host");
    result.append(tip);

    var toggle = element("button", "button button-quiet token-toggle", "Token view");
    toggle.type = "button";
    toggle.setAttribute("aria-pressed", "false");
    toggle.setAttribute("aria-controls", "token-panel-" + id);
    panel.id = "token-panel-" + id;
    var copy = head.querySelector(".copy-button");
    if (copy) { copy.before(toggle); } else { head.append(toggle); }
    toggle.addEventListener("click", function () {
      var on = panel.hidden;
      panel.hidden = !on;
      output.hidden = on;
      toggle.setAttribute("aria-pressed", on ? "true" : "false");
      if (!on) { hide(); }
    });

    var shown = null;  // the token whose alternatives the tooltip shows

    function show(token) {
      if (shown) { shown.removeAttribute("aria-describedby"); }
      fillTip(tip, tokens[Number(token.dataset.index)]);
      tip.hidden = false;
      token.setAttribute("aria-describedby", tip.id);
      shown = token;
      resizer = reposition;
      place(token);
    }

    function hide() {
      if (shown) { shown.removeAttribute("aria-describedby"); }
      shown = null;
      tip.hidden = true;
      if (resizer === reposition) { resizer = null; }
    }

    function reposition() { if (shown) { place(shown); } }

    function place(token) {
      var box = token.getClientRects()[0] || token.getBoundingClientRect();
      var host = result.getBoundingClientRect();
      var left = Math.min(box.left - host.left, result.clientWidth - tip.offsetWidth);
      tip.style.left = Math.max(0, left) + "px";
      tip.style.top = (box.bottom - host.top + 6) + "px";
    }

    function focusToken(token) {
      var current = list.querySelector(".token[tabindex='0']");
      if (current) { current.tabIndex = -1; }
      token.tabIndex = 0;
      token.focus();
    }

    list.addEventListener("keydown", function (event) {
      var token = event.target.closest(".token");
      if (!token) { return; }
      var all = list.children;
      var index = Number(token.dataset.index);
      var next = null;
      if (event.key === "ArrowRight" || event.key === "ArrowDown") { next = all[index + 1]; }
      else if (event.key === "ArrowLeft" || event.key === "ArrowUp") { next = all[index - 1]; }
      else if (event.key === "Home") { next = all[0]; }
      else if (event.key === "End") { next = all[all.length - 1]; }
      else if (event.key === "Escape") {
        if (!tip.hidden) { event.preventDefault(); hide(); }
        return;
      } else if (event.key === "Enter" || event.key === " ") {
        event.preventDefault();
        if (tip.hidden) { show(token); } else { hide(); }
        return;
      } else {
        return;
      }
      event.preventDefault();
      if (next) { focusToken(next); }
    });
    list.addEventListener("focusin", function (event) {
      var token = event.target.closest(".token");
      if (token) { show(token); }
    });
    list.addEventListener("focusout", function (event) {
      if (!list.contains(event.relatedTarget)) { hide(); }
    });
    list.addEventListener("click", function (event) {
      var token = event.target.closest(".token");
      if (token) { focusToken(token); }
    });
    list.addEventListener("mouseover", function (event) {
      var token = event.target.closest(".token");
      if (token && token !== shown) { show(token); }
    });
    list.addEventListener("mouseleave", function () {
      var focused = list.contains(document.activeElement) ? document.activeElement : null;
      if (focused) { show(focused); } else { hide(); }
    });
    view.addEventListener("scroll", reposition);
  }

  /* Every finished result under `root` whose data has come and has no view yet. */
  function scan(root) {
    root.querySelectorAll(".token-data[data-tokens]").forEach(function (data) {
      var result = data.closest(".result");
      if (!result || result.dataset.tokenView) { return; }
      result.dataset.tokenView = "ready";
      var tokens;
      try { tokens = JSON.parse(data.getAttribute("data-tokens")); } catch (e) { return; }
      if (Array.isArray(tokens) && tokens.length) { build(result, tokens); }
    });
  }

  document.addEventListener("htmx:sseMessage", function (event) {
    if (event.detail && event.detail.type === "done") {
      var result = event.target.closest(".result");
      if (result) { scan(result); }
    }
  });
  document.addEventListener("htmx:afterSettle", function (event) { scan(event.target); });
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", function () { scan(document); });
  } else {
    scan(document);
  }
})();
