/* The experiments page's chart: the chosen runs' training (solid) and validation (dashed)
   losses by step, overlaid with uPlot (static/vendor/, from its npm package).
   The runs come as JSON from the URL in #experiment-chart's data-src (/experiments/data
   with the page's own selection); their colours are the CSS variables --run-0 ... --run-7
   (static/style.css), so the chart and the table's marks match. Without JavaScript the
   page shows the table and the admin page's PNG plots instead. */
(function () {
  "use strict";

  var box = document.getElementById("experiment-chart");
  if (!box) { return; }
  var status = document.getElementById("chart-status");

  function say(text) {
    if (status) { status.textContent = text; }
  }

  if (typeof window.uPlot !== "function") {
    say("The chart could not be drawn (uPlot did not load); the runs' figures are in the table.");
    return;
  }

  var plot = null;
  var runs = [];

  function css(name) {
    return getComputedStyle(box).getPropertyValue(name).trim();
  }

  /* Wide charts are shorter than tall ones would be: a phone still sees the whole curve. */
  function size() {
    var width = Math.max(box.clientWidth, 200);
    return {width: width, height: Math.round(Math.min(420, Math.max(240, width * 0.62)))};
  }

  function options() {
    var text = css("--muted") || "#555e6b";
    var grid = css("--border") || "#dcdfe5";
    var axis = {stroke: text, grid: {stroke: grid, width: 1}, ticks: {stroke: grid, width: 1}};
    var series = [{label: "step"}];
    runs.forEach(function (run) {
      var colour = css("--run-" + run.colour) || text;
      var name = run.model + " · " + run.run_id;
      series.push({label: name + " train", stroke: colour, width: 2, spanGaps: true});
      series.push({label: name + " validation", stroke: colour, width: 2, dash: [6, 4],
                   spanGaps: true});
    });
    var dims = size();
    return {
      width: dims.width,
      height: dims.height,
      scales: {x: {time: false}},
      axes: [Object.assign({label: "step"}, axis),
             Object.assign({label: "loss (nats/token)", size: 56}, axis)],
      series: series,
      /* the legend's marks dashed like the lines they stand for */
      legend: {live: false, markers: {dash: function (u, i) {
        return u.series[i].dash ? "dashed" : "solid";
      }}},
      cursor: {drag: {x: true, y: false}}
    };
  }

  function draw() {
    if (plot) { plot.destroy(); }
    var tables = runs.map(function (run) {
      return [run.steps, run.train_loss, run.val_loss];
    });
    box.textContent = "";
    plot = new window.uPlot(options(), window.uPlot.join(tables), box);
    box.setAttribute("data-series", String(plot.series.length - 1));
  }

  fetch(box.getAttribute("data-src"), {headers: {Accept: "application/json"},
                                       credentials: "same-origin"})
    .then(function (response) {
      return response.json().then(function (body) {
        if (!response.ok) { throw new Error(body.error || "HTTP " + response.status); }
        return body;
      });
    })
    .then(function (body) {
      if (body.error) { throw new Error(body.error); }
      runs = body.runs.filter(function (run) { return run.steps.length > 0; });
      if (!runs.length) {
        say("None of the chosen runs has a loss to draw.");
        return;
      }
      draw();
      if (window.ResizeObserver) {
        var width = box.clientWidth;
        new ResizeObserver(function () {
          if (plot && box.clientWidth !== width) {
            width = box.clientWidth;
            plot.setSize(size());
          }
        }).observe(box);
      }
      /* the colours are the scheme's: redraw when it changes */
      var scheme = window.matchMedia && window.matchMedia("(prefers-color-scheme: dark)");
      if (scheme && scheme.addEventListener) { scheme.addEventListener("change", draw); }
    })
    .catch(function (error) {
      say("The chart could not be drawn: " + error.message);
    });
})();
