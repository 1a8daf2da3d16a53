/* A training run's page while it trains: its records stream from /train/<name>/events
   (server-sent events; a reconnecting EventSource resumes at the byte offset it had),
   the training and validation losses draw with uPlot (static/vendor/), samples and the
   latest figures update, and the time bar counts down. When the run ends the page shows
   the outcome; without JavaScript it refreshes itself instead (train_run.html). */
(function () {
  "use strict";

  var box = document.getElementById("train-run");
  if (!box || box.getAttribute("data-state") !== "running" || typeof EventSource !== "function") {
    return;
  }
  var chartBox = document.getElementById("train-chart");
  var chartStatus = document.getElementById("chart-status");
  var started = parseFloat(box.getAttribute("data-started"));
  var budget = parseFloat(box.getAttribute("data-budget"));
  var steps = [], train = [], validation = [];
  var plot = null, dirty = false, finished = false;
  var MAX_SAMPLES = 20;

  function byId(id) { return document.getElementById(id); }
  function setText(id, text) { var node = byId(id); if (node) { node.textContent = text; } }
  function figure(value) { return typeof value === "number" ? value.toFixed(3) : "–"; }

  function duration(seconds) {
    seconds = Math.max(0, Math.round(seconds));
    var minutes = Math.floor(seconds / 60), rest = seconds % 60;
    return minutes ? minutes + " min " + (rest < 10 ? "0" : "") + rest + " s" : rest + " s";
  }

  function css(name) { return getComputedStyle(chartBox).getPropertyValue(name).trim(); }

  function options() {
    var text = css("--muted") || "#555e6b", grid = css("--border") || "#dcdfe5";
    var axis = {stroke: text, grid: {stroke: grid, width: 1}, ticks: {stroke: grid, width: 1}};
    var width = Math.max(chartBox.clientWidth, 200);
    return {
      width: width,
      height: Math.round(Math.min(380, Math.max(220, width * 0.55))),
      scales: {x: {time: false}},
      axes: [Object.assign({label: "step"}, axis),
             Object.assign({label: "loss (nats/token)", size: 56}, axis)],
      series: [{label: "step"},
               {label: "training", stroke: css("--run-0") || text, width: 1.5},
               {label: "validation", stroke: css("--run-1") || text, width: 2.5,
                dash: [6, 4], spanGaps: true, points: {show: true, size: 6}}],
      legend: {live: false},
      cursor: {drag: {x: true, y: false}}
    };
  }

  function draw() {
    if (!dirty || !chartBox || typeof window.uPlot !== "function" || !steps.length) { return; }
    dirty = false;
    var data = [steps, train, validation];
    if (!plot) {
      chartBox.textContent = "";
      plot = new window.uPlot(options(), data, chartBox);
    } else {
      plot.setData(data);
    }
    chartBox.setAttribute("data-points", String(steps.length));
    chartBox.setAttribute("data-validation-points",
                          String(validation.filter(function (v) { return v !== null; }).length));
  }

  function addSample(record) {
    var list = byId("train-samples");
    if (!list) { return; }
    var item = document.createElement("li");
    var step = document.createElement("span");
    step.className = "sub";
    step.textContent = "step " + record.step;
    var text = document.createElement("pre");
    text.className = "sample-text";
    text.textContent = record.text;
    item.appendChild(step);
    item.appendChild(text);
    list.insertBefore(item, list.firstChild);
    while (list.children.length > MAX_SAMPLES) { list.removeChild(list.lastChild); }
    var none = byId("no-samples");
    if (none) { none.hidden = true; }
  }

  function add(record) {
    var values = record.values || {};
    if (record.event === "start" && record.step === 0) {
      steps = []; train = []; validation = [];
    } else if (record.group === "train") {
      steps.push(record.step); train.push(values.loss); validation.push(null);
      setText("figure-step", String(record.step));
      setText("figure-train", figure(values.loss));
    } else if (record.group === "validation") {
      if (steps.length && steps[steps.length - 1] === record.step) {
        validation[validation.length - 1] = values.loss;
      } else {
        steps.push(record.step); train.push(null); validation.push(values.loss);
      }
      setText("figure-validation", figure(values.loss));
      setText("figure-perplexity", typeof values.perplexity === "number" ?
              values.perplexity.toFixed(2) : "–");
    } else if (record.group === "sample") {
      addSample(record);
    }
    dirty = true;
  }

  function tick() {
    if (finished) { return; }
    var elapsed = Math.min(Date.now() / 1000 - started, budget);
    var bar = byId("train-progress");
    if (bar) { bar.value = elapsed; }
    setText("train-progress-text", duration(elapsed) + " of " + duration(budget) + "; about " +
            duration(budget - elapsed) + " left. It keeps training if you close this page.");
  }

  function end(outcome) {
    finished = true;
    source.close();
    draw();
    var state = byId("train-state");
    if (state) {
      state.textContent = outcome.state;
      state.className = "tag train-state train-" + outcome.state;
    }
    box.setAttribute("data-state", outcome.state);
    ["train-progress", "train-progress-text", "train-actions"].forEach(function (id) {
      var node = byId(id);
      if (node) { node.hidden = true; }
    });
    if (outcome.message) {
      var message = byId("train-message");
      message.textContent = outcome.message;
      message.className = outcome.state === "failed" ? "field-error" : "hint";
      message.hidden = false;
    }
    if (outcome.state === "done") { byId("train-done").hidden = false; }
  }

  var source = new EventSource(box.getAttribute("data-events"));
  source.addEventListener("records", function (event) {
    JSON.parse(event.data).forEach(add);
    if (chartStatus && !steps.length) { chartStatus.textContent = "Preparing the text and the model…"; }
  });
  source.addEventListener("end", function (event) { end(JSON.parse(event.data)); });
  if (typeof window.uPlot !== "function" && chartStatus) {
    chartStatus.textContent = "The chart could not be drawn (uPlot did not load); the figures above still update.";
  }
  setInterval(draw, 500);
  setInterval(tick, 1000);
  tick();
  window.addEventListener("resize", function () {
    if (plot) { plot.setSize({width: Math.max(chartBox.clientWidth, 200), height: plot.height}); }
  });
}());
