// The page's core: the JSON API client (with the API key when the server asks for one), a
// hash router (#/runs, #/run/ID, #/launch, #/compare/ID, #/playground), timers that stop when
// the page changes, and small DOM and number-format helpers the pages share.
"use strict";
const DT = (() => {
  const pages = {};
  let timers = [];
  let pollMs = 1000;

  class ApiError extends Error {
    constructor(message, status, errors) { super(message); this.status = status; this.errors = errors || null; }
  }

  function headers(extra) {
    const h = Object.assign({}, extra || {});
    const key = localStorage.getItem("deltatune-api-key");
    if (key) h.Authorization = `Bearer ${key}`;
    return h;
  }

  async function api(path, body, retried) {
    const init = body === undefined ? { headers: headers() }
      : { method: "POST", headers: headers({ "Content-Type": "application/json" }), body: JSON.stringify(body) };
    const response = await fetch(path, init);
    if (response.status === 401 && !retried) {
      const key = window.prompt("This deltatune ui needs its API key (--api-key):");
      if (key) { localStorage.setItem("deltatune-api-key", key); return api(path, body, true); }
    }
    let data = null;
    try { data = await response.json(); } catch (e) { data = null; }
    if (!response.ok) {
      const message = (data && data.error) || (data && data.errors && Object.values(data.errors).join("; "))
        || `${response.status} ${response.statusText}`;
      throw new ApiError(message, response.status, data && data.errors);
    }
    return data;
  }

  // A POST whose answer is server-sent events; onEvent(object) for each `data:` line.
  async function stream(path, body, onEvent) {
    const response = await fetch(path, { method: "POST", body: JSON.stringify(body),
      headers: headers({ "Content-Type": "application/json" }) });
    if (!response.ok) {
      let data = null;
      try { data = await response.json(); } catch (e) { data = null; }
      throw new ApiError((data && data.error) || `${response.status} ${response.statusText}`, response.status);
    }
    const reader = response.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const chunk = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (chunk.startsWith("data: ")) onEvent(JSON.parse(chunk.slice(6)));
      }
    }
  }

  // el("div", {class: "x", onclick: f}, child, "text", ...): children are nodes or text (never HTML).
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else if (k === "dataset") Object.assign(node.dataset, v);
      else node.setAttribute(k, v === true ? "" : v);
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.appendChild(typeof child === "object" ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  // A run's or comparison's MLflow run (from its tracking.json): a link to it, or null.
  function trackerLink(tracking) {
    const run = tracking && tracking.mlflow;
    if (!run) return null;
    return el("a", { href: run.url, target: "_blank", rel: "noopener", class: "tracker-link",
      title: `MLflow run ${run.run_id} in ${run.tracking_uri}` }, "MLflow run");
  }

  const fmt = {
    num: (v, d = 0) => (v === null || v === undefined || Number.isNaN(v)) ? "—"
      : Number(v).toLocaleString("en-US", { minimumFractionDigits: d, maximumFractionDigits: d }),
    pct: (v, d = 2) => (v === null || v === undefined) ? "—" : `${(100 * v).toFixed(d)}%`,
    int: (v) => (v === null || v === undefined) ? "—" : Number(v).toLocaleString("en-US"),
    score: (row) => (row.score === null || row.score === undefined) ? "—"
      : (row.metric === "perplexity" ? Number(row.score).toFixed(2) : `${(100 * row.score).toFixed(2)}%`),
  };

  function badge(state) { return el("span", { class: `badge ${state}` }, state); }

  // Markdown of the report's reading: paragraphs/bullets, **bold** and `code`, nothing else.
  function markdown(text) {
    const list = el("ul", { class: "reading" });
    for (const line of (text || "").split("\n")) {
      if (!line.trim()) continue;
      const item = el("li");
      const parts = line.replace(/^\s*-\s*/, "").split(/(\*\*[^*]+\*\*|`[^`]+`)/);
      for (const part of parts) {
        if (part.startsWith("**")) item.appendChild(el("b", {}, part.slice(2, -2)));
        else if (part.startsWith("`")) item.appendChild(el("code", {}, part.slice(1, -1)));
        else if (part) item.appendChild(document.createTextNode(part));
      }
      list.appendChild(item);
    }
    return list;
  }

  function every(ms, fn) {
    const id = setInterval(fn, ms);
    timers.push(id);
    return id;
  }

  function notice(message) { return el("div", { class: "notice" }, message); }

  async function route() {
    timers.forEach(clearInterval);
    timers = [];
    document.getElementById("tooltip").hidden = true;
    const hash = location.hash.replace(/^#\/?/, "") || "runs";
    const [name, ...rest] = hash.split("/");
    const arg = rest.length ? decodeURIComponent(rest.join("/")) : null;
    const tab = name === "run" ? "runs" : name;
    document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.dataset.tab === tab));
    const view = document.getElementById("view");
    view.textContent = "";
    const page = pages[name] || pages.runs;
    try {
      await page(view, arg);
    } catch (e) {
      view.appendChild(notice(e.message));
    }
  }

  function link(page, id) { return `#/${page}/${encodeURIComponent(id)}`; }

  async function start() {
    window.addEventListener("hashchange", route);
    try {
      const options = await api("/api/options");
      document.getElementById("root-dir").textContent = `runs folder: ${options.runs_root}`;
      DT.options = options;
      pollMs = (await api("/api/runs")).poll_ms || pollMs;
    } catch (e) { /* the page shows the error when it asks again */ }
    route();
  }

  return { pages, api, stream, el, fmt, badge, markdown, every, notice, link, start, trackerLink,
           get pollMs() { return pollMs; }, options: null };
})();
