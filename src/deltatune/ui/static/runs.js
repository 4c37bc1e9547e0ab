// Runs: every run and comparison under the runs folder; a run's page follows its metrics.jsonl.
"use strict";
(() => {
  const { el, fmt, badge, api, link } = DT;

  function runsTable(runs) {
    if (!runs.length) return el("div", { class: "empty" }, "No runs yet: start one on the Launch page.");
    const head = ["run", "state", "method", "base", "trainable %", "score", "wall s", "peak MB", "file MB"];
    const numeric = new Set(["trainable %", "score", "wall s", "peak MB", "file MB"]);
    return el("table", { id: "runs-table" },
      el("thead", {}, el("tr", {}, head.map((h) => el("th", { class: numeric.has(h) ? "num" : null }, h)))),
      el("tbody", {}, runs.map((r) => el("tr", { class: "link", dataset: { run: r.id },
        onclick: () => { location.hash = link("run", r.id); } },
        el("td", {}, r.id), el("td", {}, badge(r.state)), el("td", {}, r.method_label),
        el("td", { title: r.base }, shortBase(r.base)),
        el("td", { class: "num" }, r.trainable_percent === null ? "—" : fmt.num(r.trainable_percent, 3)),
        el("td", { class: "num" }, r.state === "finished" ? fmt.score(r) : `step ${r.steps || 0}`),
        el("td", { class: "num" }, fmt.num(r.wall_time_s, 1)),
        el("td", { class: "num" }, fmt.num(r.peak_memory_mb, 0)),
        el("td", { class: "num" }, fmt.num(r.saved_mb, 2))))));
  }

  function shortBase(base) {
    const text = String(base || "");
    return text.length > 28 ? "…" + text.slice(-27) : text;
  }

  function comparisonsTable(comparisons) {
    return el("table", { id: "comparisons-table" },
      el("thead", {}, el("tr", {}, ["comparison", "state", "base", "task", "methods"].map((h) => el("th", {}, h)))),
      el("tbody", {}, comparisons.map((c) => el("tr", { class: "link", dataset: { comparison: c.id },
        onclick: () => { location.hash = link("compare", c.id); } },
        el("td", {}, c.id), el("td", {}, badge(c.state)), el("td", { title: c.base }, shortBase(c.base)),
        el("td", {}, c.task || ""), el("td", {}, (c.methods || []).join(", "))))));
  }

  DT.pages.runs = async (view) => {
    const title = el("h1", {}, "Runs");
    const body = el("div");
    view.append(title, body);
    let last = "";
    async function refresh() {
      const data = await api("/api/runs");
      const key = JSON.stringify([data.runs, data.comparisons]);
      if (key === last) return;
      last = key;
      body.textContent = "";
      if (data.comparisons.length) body.append(el("h2", {}, "Comparisons"), comparisonsTable(data.comparisons));
      body.append(el("h2", {}, `Runs (${data.runs.length})`), runsTable(data.runs));
    }
    await refresh();
    DT.every(DT.pollMs, () => refresh().catch(() => {}));
  };

  function stat(label, value) { return el("div", { class: "stat" }, el("b", {}, value), el("span", {}, label)); }

  // Loss per step, and every eval_* metric (eval_loss next to loss; the others on their own).
  function drawCurves(lossBox, evalBox, records) {
    const train = records.filter((r) => typeof r.loss === "number").map((r) => [r.step, r.loss]);
    const evalLoss = records.filter((r) => typeof r.eval_loss === "number").map((r) => [r.step, r.eval_loss]);
    Chart.lines(lossBox, [{ name: "train loss", points: train }, { name: "eval loss", points: evalLoss }],
      { yLabel: "loss" });
    const names = [...new Set(records.flatMap((r) => Object.keys(r)))]
      .filter((k) => k.startsWith("eval_") && !["eval_loss", "eval_examples"].includes(k));
    Chart.lines(evalBox, names.map((k) => ({ name: k.slice(5),
      points: records.filter((r) => typeof r[k] === "number").map((r) => [r.step, r[k]]) })),
      { yLabel: "eval metric" });
  }

  DT.pages.run = async (view, id) => {
    const records = [];
    let next = 0, state = null;
    const head = el("div", { class: "row" });
    const stats = el("div", { class: "stats" });
    const lossBox = el("div", { class: "chart card", id: "loss-chart" });
    const evalBox = el("div", { class: "chart card", id: "eval-chart" });
    const checkpoints = el("div");
    const config = el("pre", { id: "run-config" });
    view.append(head, stats, el("h2", {}, "Curves"), el("div", { class: "charts" }, lossBox, evalBox),
      el("div", { class: "charts" }, el("div", {}, el("h2", {}, "Config"), config),
        el("div", {}, el("h2", {}, "Checkpoints"), checkpoints)));

    function render(data) {
      head.textContent = "";
      head.append(el("h1", {}, id), badge(data.state));
      if (data.row && data.row.comparison) {
        head.append(el("a", { href: link("compare", data.row.comparison) }, `comparison ${data.row.comparison}`));
      }
      head.append(DT.trackerLink(data.tracking) || "");
      const r = data.row || {};
      stats.textContent = "";
      stats.append(stat("method", r.method_label || "—"), stat(r.metric || "score", fmt.score(r)),
        stat("trainable", r.trainable_params ? `${fmt.int(r.trainable_params)} (${fmt.num(r.trainable_percent, 3)}%)` : "—"),
        stat("steps", fmt.int(r.steps)), stat("wall s", fmt.num(r.wall_time_s, 1)),
        stat("peak MB", fmt.num(r.peak_memory_mb, 0)), stat("file MB", fmt.num(r.saved_mb, 3)));
      config.textContent = data.config || "(no config.yaml yet)";
      checkpoints.textContent = "";
      checkpoints.append(data.checkpoints.length ? el("table", {},
        el("thead", {}, el("tr", {}, el("th", {}, "checkpoint"), el("th", { class: "num" }, "step"), el("th", { class: "num" }, "MB"))),
        el("tbody", {}, data.checkpoints.map((c) => el("tr", {}, el("td", {}, c.name),
          el("td", { class: "num" }, c.step === null ? "" : c.step), el("td", { class: "num" }, fmt.num(c.size_mb, 3))))))
        : el("div", { class: "empty" }, "none (train.save_every writes them)"));
    }

    async function poll() {
      const data = await api(`/api/run?id=${encodeURIComponent(id)}&since=${next}`);
      records.push(...data.metrics);
      next = data.next;
      if (data.metrics.length || data.state !== state) drawCurves(lossBox, evalBox, records);
      if (data.state !== state || data.state !== "finished") render(data);
      state = data.state;
    }
    try {
      await poll();
    } catch (e) {  // launched a moment ago: its directory appears when the child starts writing
      head.append(el("h1", {}, id), DT.notice(e.message));
    }
    DT.every(DT.pollMs, () => { if (state !== "finished") poll().catch(() => {}); });
  };
})();
