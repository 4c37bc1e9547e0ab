// Compare: one comparison's trade-offs — score against trainable parameters (log scale),
// marker area for peak memory, every figure on hover — its table and the report's reading.
// While `deltatune compare` runs, the finished methods appear one by one.
"use strict";
(() => {
  const { el, fmt, badge, api, link } = DT;

  function scoreText(row) {
    if (row.score === null || row.score === undefined) return "—";
    const score = row.metric === "perplexity" ? fmt.num(row.score, 2) : fmt.pct(row.score);
    return row.learned === false ? `${score} (did not learn)` : score;
  }

  function details(row) {
    const out = [[row.metric || "score", scoreText(row)],
      ["trainable", `${fmt.int(row.trainable_params)} (${fmt.num(row.trainable_percent, 3)}%)`],
      ["peak memory", `${fmt.num(row.peak_memory_mb, 0)} MB`],
      ["wall time", `${fmt.num(row.wall_time_s, 1)} s`], ["step time", `${fmt.num(row.time_per_step_s, 3)} s`],
      ["tokens/s", fmt.num(row.tokens_per_s, 0)], ["file", `${fmt.num(row.saved_mb, 2)} MB`]];
    if (row.planned_peak_mb !== undefined) out.push(["planned peak", `${fmt.num(row.planned_peak_mb, 0)} MB`]);
    if (row.forgetting !== undefined && row.forgetting !== null) out.push(["forgetting Δppl", fmt.num(row.forgetting, 3)]);
    if (row.lr) out.push(["lr", String(row.lr)]);
    return out;
  }

  const COLUMNS = [["method", "method"], ["score", "score"], ["trainable_params", "trainable"],
    ["trainable_percent", "share %"], ["wall_time_s", "wall s"], ["time_per_step_s", "s/step"],
    ["tokens_per_s", "tok/s"], ["peak_memory_mb", "peak MB"], ["planned_peak_mb", "plan MB"],
    ["saved_mb", "file MB"], ["forgetting", "forgetting Δppl"]];

  function cell(row, key) {
    if (row.error && key !== "method") return key === "score" ? "failed" : "";
    const v = row[key];
    if (key === "method") return v;
    if (key === "score") return scoreText(row);
    if (v === null || v === undefined) return "—";
    const digits = { trainable_percent: 3, time_per_step_s: 3, saved_mb: 2, forgetting: 3, wall_time_s: 1 }[key] || 0;
    return key === "trainable_params" ? fmt.int(v) : fmt.num(v, digits);
  }

  function table(rows) {
    const columns = COLUMNS.filter(([k]) => ["method", "score"].includes(k) || rows.some((r) => r[k] !== undefined));
    return el("table", { id: "compare-table" },
      el("thead", {}, el("tr", {}, columns.map(([, h], i) => el("th", { class: i ? "num" : null }, h)))),
      el("tbody", {}, rows.map((r) => el("tr", { class: "link", dataset: { method: r.method },
        onclick: () => { location.hash = link("run", r.run); } },
        columns.map(([k], i) => el("td", { class: i ? "num" : null }, cell(r, k)))))));
  }

  function picker(comparisons) {
    if (!comparisons.length) {
      return el("div", { class: "empty" }, "No comparisons yet: start one on the Launch page (what to start: compare).");
    }
    return el("table", {}, el("tbody", {}, comparisons.map((c) => el("tr", { class: "link",
      onclick: () => { location.hash = link("compare", c.id); } },
      el("td", {}, c.id), el("td", {}, badge(c.state)), el("td", {}, c.base), el("td", {}, c.methods.join(", "))))));
  }

  DT.pages.compare = async (view, id) => {
    if (!id) {
      const data = await api("/api/runs");
      if (data.comparisons.length === 1) { location.hash = link("compare", data.comparisons[0].id); return; }
      view.append(el("h1", {}, "Compare"), picker(data.comparisons));
      return;
    }
    const head = el("div", { class: "row" });
    const chartBox = el("div", { class: "chart card", id: "tradeoff-chart" });
    const progress = el("div", { class: "row", id: "compare-progress" });
    const tableBox = el("div");
    const readingBox = el("div", { class: "card", id: "compare-reading" });
    view.append(head, progress, chartBox, el("h2", {}, "Table"), tableBox, el("h2", {}, "Reading"), readingBox);
    let last = "", state = null;
    async function refresh() {
      const data = await api(`/api/comparison?id=${encodeURIComponent(id)}`);
      state = data.state;
      const key = JSON.stringify(data);
      if (key === last) return;
      last = key;
      head.textContent = "";
      head.append(el("h1", {}, `Comparison ${data.id}`), badge(data.state),
        el("span", { class: "muted" }, `${data.base} · ${data.task} · ${data.data || ""}`),
        DT.trackerLink(data.tracking) || "");
      progress.textContent = "";
      for (const [method, s] of Object.entries(data.progress)) progress.append(el("span", {}, `${method} `, badge(s)));
      const rows = data.rows.filter((r) => !r.error);
      const metric = (rows[0] && rows[0].metric) || "score";
      const percent = metric !== "perplexity";
      const noSkill = rows.map((r) => r.no_skill).filter((v) => Number.isFinite(v));
      Chart.scatter(chartBox, rows.map((r) => ({ key: r.method, x: r.trainable_params,
        y: percent ? 100 * r.score : r.score, size: r.peak_memory_mb, hollow: r.learned === false,
        label: r.learned === false ? `${r.method} (did not learn)` : r.method, details: details(r) })),
        { xLabel: "trainable parameters (log scale) · marker area: peak memory", yLabel: percent ? `${metric} (%)` : metric,
          // classification: the majority class; generation (exact_match): the untrained base's score
          baseline: noSkill.length && (metric === "accuracy" || metric === "exact_match")
            ? { y: 100 * Math.max(...noSkill),
                label: `no skill: ${(rows.find((r) => r.no_skill_kind) || {}).no_skill_kind || "majority class"} ${(100 * Math.max(...noSkill)).toFixed(1)}%` }
            : null });
      tableBox.textContent = "";
      tableBox.append(data.rows.length ? table(data.rows) : el("div", { class: "empty" }, "No method has finished yet."));
      readingBox.textContent = "";
      readingBox.append(data.reading ? DT.markdown(data.reading) : el("div", { class: "empty" }, "Written when runs finish."));
    }
    await refresh();
    DT.every(DT.pollMs, () => { if (state !== "finished") refresh().catch(() => {}); });
  };
})();
