// Small SVG charts for the Switchyard dashboard: lines and points on linear or log axes. No dependencies.
//
//   const c = SyChart.create(container, {title: "loss", xLabel: "step", logX: false, logY: false});
//   c.setData([{name: "loss", color: "#2f6fde", points: [[1, 5.2], [2, 4.9]], line: true, dots: false}]);
//
// Every series is one <path class="series" data-name=... data-points=N>; the <svg> carries
// data-points with the total, which is what the tests read.
"use strict";

const SyChart = (() => {
  const NS = "http://www.w3.org/2000/svg";
  const M = {left: 58, right: 14, top: 22, bottom: 34};
  const PALETTE = ["#2f6fde", "#d14343", "#1f9d55", "#c98a00", "#7b4fd6", "#0f9bb0", "#d6487e", "#5b6b82"];

  function el(tag, attrs, text) {
    const e = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function fmt(v) {
    if (!isFinite(v)) return "";
    const a = Math.abs(v);
    if (a !== 0 && (a >= 1e5 || a < 1e-3)) return v.toExponential(1).replace("e+", "e");
    return String(Number(v.toPrecision(3)));
  }

  function niceTicks(lo, hi, n) {
    if (hi <= lo) { hi = lo + (lo === 0 ? 1 : Math.abs(lo) * 0.1); lo = lo - (hi - lo) * 0.01; }
    const raw = (hi - lo) / n, mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 2.5, 5, 10].map(s => s * mag).find(s => s >= raw) || raw;
    const ticks = [];
    for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(Number(t.toPrecision(12)));
    return {lo, hi, ticks};
  }

  function logTicks(lo, hi) {  // lo, hi in log10 units
    if (hi <= lo) { lo -= 0.5; hi += 0.5; }
    const ticks = [];
    for (let e = Math.ceil(lo); e <= Math.floor(hi); e++) ticks.push(e);
    if (ticks.length < 2) {  // less than a decade: ticks at 1, 2, 5 x 10^k
      for (let e = Math.floor(lo); e <= Math.ceil(hi); e++) {
        for (const m of [1, 2, 5]) { const t = e + Math.log10(m); if (t >= lo && t <= hi) ticks.push(t); }
      }
      ticks.sort((a, b) => a - b);
    }
    return {lo, hi, ticks: [...new Set(ticks)]};
  }

  function create(container, opts) {
    opts = opts || {};
    const W = opts.width || 560, H = opts.height || 230;  // viewBox units: a wide chart gets a wide box
    const svg = el("svg", {viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img",
                           "aria-label": opts.title || "chart", "data-points": 0});
    if (opts.id) svg.id = opts.id;
    container.appendChild(svg);
    let series = [];

    function scale(v, log) { return log ? (v > 0 ? Math.log10(v) : NaN) : v; }

    function render() {
      while (svg.firstChild) svg.removeChild(svg.firstChild);
      svg.appendChild(el("text", {x: M.left, y: 14, class: "title"}, opts.title || ""));
      const pts = series.flatMap(s => s.points).map(([x, y]) => [scale(x, opts.logX), scale(y, opts.logY)])
        .filter(([x, y]) => isFinite(x) && isFinite(y));
      const total = series.reduce((n, s) => n + (s.count !== undefined ? s.count : s.points.length), 0);
      svg.setAttribute("data-points", total);
      if (!pts.length) {
        svg.appendChild(el("text", {x: W / 2, y: H / 2, "text-anchor": "middle"}, opts.empty || "no data yet"));
        return;
      }
      let x0 = Math.min(...pts.map(p => p[0])), x1 = Math.max(...pts.map(p => p[0]));
      let y0 = Math.min(...pts.map(p => p[1])), y1 = Math.max(...pts.map(p => p[1]));
      const pad = (y1 - y0) * 0.05 || Math.abs(y0) * 0.05 || 0.5;
      y0 -= pad; y1 += pad;
      if (!opts.logY && opts.zeroY && y0 > 0) y0 = 0;
      const xs = opts.logX ? logTicks(x0, x1) : niceTicks(x0, x1, 6);
      const ys = opts.logY ? logTicks(y0, y1) : niceTicks(y0, y1, opts.yTicks || 4);
      [x0, x1, y0, y1] = [xs.lo, xs.hi, ys.lo, ys.hi];
      const px = x => M.left + (x - x0) / (x1 - x0) * (W - M.left - M.right);
      const py = y => H - M.bottom - (y - y0) / (y1 - y0) * (H - M.top - M.bottom);
      for (const t of ys.ticks) {
        if (t < y0 || t > y1) continue;
        svg.appendChild(el("line", {x1: M.left, x2: W - M.right, y1: py(t), y2: py(t), class: "gridline"}));
        svg.appendChild(el("text", {x: M.left - 6, y: py(t) + 4, "text-anchor": "end"},
                           fmt(opts.logY ? Math.pow(10, t) : t)));
      }
      for (const t of xs.ticks) {
        if (t < x0 || t > x1) continue;
        svg.appendChild(el("line", {x1: px(t), x2: px(t), y1: H - M.bottom, y2: H - M.bottom + 4, class: "axis"}));
        svg.appendChild(el("text", {x: px(t), y: H - M.bottom + 16, "text-anchor": "middle"},
                           fmt(opts.logX ? Math.pow(10, t) : t)));
      }
      svg.appendChild(el("line", {x1: M.left, x2: W - M.right, y1: H - M.bottom, y2: H - M.bottom, class: "axis"}));
      svg.appendChild(el("line", {x1: M.left, x2: M.left, y1: M.top, y2: H - M.bottom, class: "axis"}));
      if (opts.xLabel) svg.appendChild(el("text", {x: W - M.right, y: H - 4, "text-anchor": "end"}, opts.xLabel));
      series.forEach((s, i) => {
        const color = s.color || PALETTE[i % PALETTE.length];
        const xy = s.points.map(([x, y]) => [scale(x, opts.logX), scale(y, opts.logY)])
          .filter(([x, y]) => isFinite(x) && isFinite(y)).map(([x, y]) => [px(x), py(y)]);
        const d = xy.map(([x, y], j) => `${j ? "L" : "M"}${x.toFixed(1)},${y.toFixed(1)}`).join("");
        const path = el("path", {d: s.line === false ? "" : d, fill: "none", stroke: color,
                                 "stroke-width": s.width || 1.6, class: "series", "data-name": s.name || "",
                                 "data-points": s.points.length});
        if (s.dash) path.setAttribute("stroke-dasharray", "5 3");
        svg.appendChild(path);
        if (s.dots || s.marker) {
          for (const [x, y] of xy) {
            svg.appendChild(s.marker === "star"
              ? el("path", {d: star(x, y, 7), fill: color, stroke: "#1d2330", "stroke-width": 0.6, class: "marker"})
              : el("circle", {cx: x, cy: y, r: s.r || 3, fill: color, class: "dot"}));
          }
        }
      });
    }

    function star(cx, cy, r) {
      let d = "";
      for (let k = 0; k < 10; k++) {
        const a = -Math.PI / 2 + k * Math.PI / 5, rr = k % 2 ? r * 0.45 : r;
        d += `${k ? "L" : "M"}${(cx + rr * Math.cos(a)).toFixed(1)},${(cy + rr * Math.sin(a)).toFixed(1)}`;
      }
      return d + "Z";
    }

    render();
    return {svg, setData(s) { series = s; render(); }, palette: PALETTE};
  }

  return {create, PALETTE, fmt};
})();
