/* Line charts for the eventing dashboard, drawn as SVG from JSON the page embeds.
 *
 * Each chart container names its data: <div data-chart="ID">, with
 * <script type="application/json" id="ID"> holding
 *   {"title": ..., "unit": ..., "labels": ["HH:MM", ...],
 *    "series": [{"name": ..., "values": [number | null, ...]}, ...]}
 * A null value is a gap (no sample that minute). No dependencies, no build step.
 */
(function () {
  "use strict";

  var SVG_NS = "http://www.w3.org/2000/svg";
  var COLORS = ["#417690", "#e07b39", "#5b9b4a", "#a05195", "#d45087", "#2f4b7c", "#b8860b"];
  var HEIGHT = 230;
  var MARGIN = { top: 10, right: 12, bottom: 26, left: 44 };

  function el(name, attrs, parent) {
    var node = document.createElementNS(SVG_NS, name);
    Object.keys(attrs || {}).forEach(function (key) { node.setAttribute(key, attrs[key]); });
    if (parent) { parent.appendChild(node); }
    return node;
  }

  // A tick step of 1, 2, 2.5 or 5 times a power of ten, whole numbers only
  // (the charts count events), so at most five steps cover the largest value.
  function tickStep(max) {
    var raw = max / 5;
    if (raw <= 1) { return 1; }
    var magnitude = Math.pow(10, Math.floor(Math.log10(raw)));
    var factors = [1, 2, 2.5, 5, 10];
    for (var i = 0; i < factors.length; i++) {
      var step = factors[i] * magnitude;
      if (step >= raw && Number.isInteger(step)) { return step; }
    }
    return 10 * magnitude;
  }

  function draw(container, data) {
    container.textContent = "";
    var width = Math.max(container.clientWidth - 16, 320);
    var plotW = width - MARGIN.left - MARGIN.right;
    var plotH = HEIGHT - MARGIN.top - MARGIN.bottom;
    var labels = data.labels || [];
    var series = data.series || [];
    var max = 0;
    series.forEach(function (s) {
      s.values.forEach(function (v) { if (v !== null && v > max) { max = v; } });
    });
    var step = tickStep(max);
    var top = Math.max(1, Math.ceil(max / step)) * step;
    var svg = el("svg", { viewBox: "0 0 " + width + " " + HEIGHT, role: "img" }, container);
    el("title", {}, svg).textContent = data.title || "";
    var x = function (i) { return MARGIN.left + (labels.length > 1 ? (i * plotW) / (labels.length - 1) : 0); };
    var y = function (v) { return MARGIN.top + plotH - (v / top) * plotH; };

    for (var value = 0; value <= top; value += step) {
      el("line", { class: value ? "ev-grid" : "ev-axis", x1: MARGIN.left, x2: width - MARGIN.right, y1: y(value), y2: y(value) }, svg);
      var tick = el("text", { x: MARGIN.left - 6, y: y(value) + 4, "text-anchor": "end" }, svg);
      tick.textContent = String(value);
    }
    labels.forEach(function (label, i) {
      if (i % 10 === 0 || i === labels.length - 1) {
        var anchor = i === labels.length - 1 ? "end" : i === 0 ? "start" : "middle";
        var text = el("text", { x: x(i), y: HEIGHT - 8, "text-anchor": anchor }, svg);
        text.textContent = label;
      }
    });

    series.forEach(function (s, n) {
      var color = COLORS[n % COLORS.length];
      var d = "";
      var pen = "M";
      s.values.forEach(function (v, i) {
        if (v === null) { pen = "M"; return; }
        d += pen + x(i).toFixed(1) + "," + y(v).toFixed(1) + " ";
        pen = "L";
        var dot = el("circle", { cx: x(i), cy: y(v), r: 2.5, fill: color }, svg);
        el("title", {}, dot).textContent = s.name + " " + labels[i] + ": " + v + " " + (data.unit || "");
      });
      if (d) { el("path", { class: "ev-line", d: d, stroke: color }, svg); }
    });

    var legend = document.createElement("div");
    legend.className = "ev-chart-legend";
    series.forEach(function (s, n) {
      var item = document.createElement("span");
      item.style.setProperty("--swatch", COLORS[n % COLORS.length]);
      item.textContent = s.name;
      legend.appendChild(item);
    });
    container.appendChild(legend);
    if (max === 0) {
      var empty = document.createElement("div");
      empty.className = "ev-chart-empty";
      empty.textContent = "Nothing in the last hour.";
      container.appendChild(empty);
    }
  }

  function drawAll() {
    document.querySelectorAll("[data-chart]").forEach(function (container) {
      var source = document.getElementById(container.getAttribute("data-chart"));
      if (source) { draw(container, JSON.parse(source.textContent)); }
    });
  }

  var pending = null;
  window.addEventListener("resize", function () {
    clearTimeout(pending);
    pending = setTimeout(drawAll, 150);
  });
  document.addEventListener("DOMContentLoaded", drawAll);
})();
