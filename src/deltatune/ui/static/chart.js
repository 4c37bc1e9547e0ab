// Two small SVG charts, written for this page (no library): line curves over training steps,
// and the comparison's trade-off scatter (log-scaled x, marker area for memory, hover details).
"use strict";
const Chart = (() => {
  const NS = "http://www.w3.org/2000/svg";
  const COLORS = ["#3b5bdb", "#e8590c", "#2b8a3e", "#c2255c", "#7048e8", "#1098ad", "#f08c00", "#495057"];

  function svg(tag, attrs, parent) {
    const node = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (parent) parent.appendChild(node);
    return node;
  }

  function text(parent, x, y, content, attrs) {
    const node = svg("text", Object.assign({ x, y }, attrs || {}), parent);
    node.textContent = content;
    return node;
  }

  // "Nice" ticks: 1, 2 or 5 times a power of ten, about `count` of them.
  function ticks(lo, hi, count) {
    if (!(hi > lo)) { hi = lo + 1; }
    const raw = (hi - lo) / count, power = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw);
    const out = [];
    for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) out.push(+t.toPrecision(12));
    return out;
  }

  function short(v) {
    const a = Math.abs(v);
    if (a >= 1e9) return (v / 1e9).toFixed(a >= 1e10 ? 0 : 1) + "G";
    if (a >= 1e6) return (v / 1e6).toFixed(a >= 1e7 ? 0 : 1) + "M";
    if (a >= 1e3) return (v / 1e3).toFixed(a >= 1e4 ? 0 : 1) + "k";
    return +v.toPrecision(3) + "";
  }

  function frame(container, width, height, pad) {
    container.textContent = "";
    const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img" }, container);
    return { root, x0: pad.l, x1: width - pad.r, y0: height - pad.b, y1: pad.t };
  }

  // series: [{name, points: [[x, y], ...]}]; one polyline each, with a legend.
  function lines(container, series, opts) {
    const o = Object.assign({ width: 540, height: 260, xLabel: "step", yLabel: "" }, opts || {});
    const f = frame(container, o.width, o.height, { l: 52, r: 14, t: 26, b: 36 });
    const all = series.flatMap((s) => s.points).filter((p) => Number.isFinite(p[1]));
    container.dataset.points = String(all.length);
    if (!all.length) {
      text(f.root, (f.x0 + f.x1) / 2, (f.y0 + f.y1) / 2, "no points yet", { "text-anchor": "middle" });
      return;
    }
    let [xmin, xmax] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
    let [ymin, ymax] = [Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))];
    if (xmax === xmin) { xmin -= 1; xmax += 1; }
    const ypad = (ymax - ymin) * 0.08 || Math.abs(ymax) * 0.05 || 0.5;
    ymin -= ypad; ymax += ypad;
    const sx = (x) => f.x0 + (x - xmin) / (xmax - xmin) * (f.x1 - f.x0);
    const sy = (y) => f.y0 - (y - ymin) / (ymax - ymin) * (f.y0 - f.y1);
    const steps = ticks(xmin, xmax, 6).filter((t) => Number.isInteger(t));  // steps are whole
    axes(f, steps.map((t) => [sx(t), short(t)]), ticks(ymin, ymax, 5).map((t) => [sy(t), short(t)]),
         o.xLabel, o.yLabel);
    series.forEach((s, i) => {
      const pts = s.points.filter((p) => Number.isFinite(p[1]));
      const color = COLORS[i % COLORS.length];
      const path = svg("polyline", { class: "series", stroke: color, "data-series": s.name,
        "data-points": pts.length, points: pts.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ") }, f.root);
      if (pts.length === 1) svg("circle", { cx: sx(pts[0][0]), cy: sy(pts[0][1]), r: 3, fill: color }, f.root);
      path.appendChild(svg("title", {})).textContent = s.name;
      const lx = f.x0 + 8 + i * 130;
      svg("rect", { x: lx, y: 8, width: 12, height: 3, fill: color }, f.root);
      text(f.root, lx + 16, 13, s.name);
    });
  }

  function axes(f, xt, yt, xLabel, yLabel) {
    for (const [y, label] of yt) {
      svg("line", { class: "grid", x1: f.x0, x2: f.x1, y1: y, y2: y }, f.root);
      text(f.root, f.x0 - 6, y + 4, label, { "text-anchor": "end" });
    }
    for (const [x, label] of xt) {
      svg("line", { class: "grid", x1: x, x2: x, y1: f.y0, y2: f.y1 }, f.root);
      text(f.root, x, f.y0 + 15, label, { "text-anchor": "middle" });
    }
    svg("line", { class: "axis", x1: f.x0, x2: f.x1, y1: f.y0, y2: f.y0 }, f.root);
    svg("line", { class: "axis", x1: f.x0, x2: f.x0, y1: f.y0, y2: f.y1 }, f.root);
    text(f.root, (f.x0 + f.x1) / 2, f.y0 + 31, xLabel, { "text-anchor": "middle" });
    text(f.root, 12, (f.y0 + f.y1) / 2, yLabel, { "text-anchor": "middle",
      transform: `rotate(-90 12 ${(f.y0 + f.y1) / 2})` });
  }

  // points: [{key, x, y, size, label, hollow, details: [[name, value], ...]}]; x on a log scale,
  // marker area proportional to `size` (hollow: a run that did not learn); hovering a marker shows
  // every detail in #tooltip. opts.baseline {y, label}: a dashed no-skill line.
  function scatter(container, points, opts) {
    const o = Object.assign({ width: 1000, height: 420, xLabel: "", yLabel: "" }, opts || {});
    const f = frame(container, o.width, o.height, { l: 58, r: 30, t: 24, b: 42 });
    const ok = points.filter((p) => p.x > 0 && Number.isFinite(p.y));
    container.dataset.points = String(ok.length);
    if (!ok.length) {
      text(f.root, (f.x0 + f.x1) / 2, (f.y0 + f.y1) / 2, "no finished runs yet", { "text-anchor": "middle" });
      return;
    }
    let lx0 = Math.floor(Math.log10(Math.min(...ok.map((p) => p.x))));
    let lx1 = Math.ceil(Math.log10(Math.max(...ok.map((p) => p.x))));
    if (lx1 === lx0) { lx0 -= 1; lx1 += 1; }
    let ymin = Math.min(...ok.map((p) => p.y)), ymax = Math.max(...ok.map((p) => p.y));
    const ypad = (ymax - ymin) * 0.2 || 2;
    ymin -= ypad; ymax += ypad;
    const sx = (x) => f.x0 + (Math.log10(x) - lx0) / (lx1 - lx0) * (f.x1 - f.x0);
    const sy = (y) => f.y0 - (y - ymin) / (ymax - ymin) * (f.y0 - f.y1);
    const xt = [];
    for (let e = lx0; e <= lx1; e++) xt.push([sx(Math.pow(10, e)), short(Math.pow(10, e))]);
    axes(f, xt, ticks(ymin, ymax, 5).map((t) => [sy(t), short(t)]), o.xLabel, o.yLabel);
    if (o.baseline && Number.isFinite(o.baseline.y) && o.baseline.y >= ymin && o.baseline.y <= ymax) {
      // the no-skill level (e.g. the majority class): a score on it is no result
      svg("line", { class: "baseline", x1: f.x0, x2: f.x1, y1: sy(o.baseline.y), y2: sy(o.baseline.y),
        stroke: "#777", "stroke-dasharray": "4 4", "pointer-events": "none" }, f.root);
      text(f.root, f.x1 - 4, sy(o.baseline.y) - 4, o.baseline.label,
        { class: "label", "text-anchor": "end", "pointer-events": "none" });
    }
    const placed = [];  // label boxes so far: a label that would cover one moves down or up a line
    const labelAt = (x, y, label) => {
      const w = 7 * label.length, h = 14;
      for (let shift = 0; shift < 200; shift++) {
        const ty = y + Math.ceil(shift / 2) * (h + 2) * (shift % 2 ? 1 : -1);
        if (placed.every((b) => x + w <= b.x || x >= b.x + b.w || ty <= b.y - h || ty - h >= b.y)) {
          placed.push({ x, y: ty, w });
          return ty;
        }
      }
      return y;
    };
    const biggest = Math.max(...ok.map((p) => p.size || 0)) || 1;
    const tip = document.getElementById("tooltip");
    // largest first, so a small marker is never hidden under a big one
    ok.slice().sort((a, b) => (b.size || 0) - (a.size || 0)).forEach((p) => {
      const i = points.indexOf(p), color = COLORS[i % COLORS.length];
      const r = 6 + 22 * Math.sqrt((p.size || 0) / biggest);
      const dot = svg("circle", { class: p.hollow ? "point hollow" : "point", cx: sx(p.x), cy: sy(p.y), r,
        fill: p.hollow ? "none" : color, stroke: color, "data-key": p.key, "pointer-events": "all" }, f.root);
      text(f.root, sx(p.x) + r + 4, labelAt(sx(p.x) + r + 4, sy(p.y) + 4, p.label), p.label, { class: "label" });
      dot.addEventListener("mouseenter", () => {
        tip.textContent = "";
        const head = document.createElement("b");
        head.textContent = p.label;
        tip.appendChild(head);
        for (const [name, value] of p.details) {
          const line = document.createElement("div");
          line.textContent = `${name}: ${value}`;
          tip.appendChild(line);
        }
        tip.hidden = false;
      });
      const place = (e) => {
        tip.style.left = `${Math.min(e.clientX + 14, window.innerWidth - tip.offsetWidth - 8)}px`;
        tip.style.top = `${e.clientY + 14}px`;
      };
      dot.addEventListener("mouseenter", place);
      dot.addEventListener("mousemove", place);
      dot.addEventListener("mouseleave", () => { tip.hidden = true; });
    });
  }

  return { lines, scatter, COLORS };
})();
