// Playground: one base model and the adapters of chosen runs, side by side. A classifier shows
// each adapter's label and class probabilities; a causal LM chats with each (streamed).
"use strict";
(() => {
  const { el, fmt, api } = DT;
  const BASE = "base";

  function columnTitle(choice) { return choice ? `${choice.id} (${choice.method})` : "base model (no adapter)"; }

  function classifier(area, base, picked, byId) {
    const text = el("textarea", { id: "play-text", rows: 3, style: "width:100%",
      placeholder: "Type a sentence to classify" });
    const button = el("button", { type: "button", id: "play-classify" }, "Classify");
    const out = el("div", { class: "columns", id: "play-results" });
    const error = el("div");
    button.addEventListener("click", async () => {
      error.textContent = "";
      button.disabled = true;
      try {
        const data = await api("/api/playground/classify", { base: base.base, runs: picked(), text: text.value });
        out.textContent = "";
        for (const r of data.results) {
          const probs = Object.entries(r.probabilities);
          out.append(el("div", { class: "card column", dataset: { run: r.run } },
            el("h3", {}, columnTitle(byId[r.run])), el("div", { class: "predicted" }, r.label),
            probs.map(([label, p]) => el("div", {}, el("div", { class: "row" }, el("span", {}, label),
              el("span", { class: "muted" }, fmt.pct(p, 1))),
              el("div", { class: "bar" }, el("div", { style: `width:${(100 * p).toFixed(1)}%` }))))));
        }
      } catch (e) { error.appendChild(DT.notice(e.message)); }
      finally { button.disabled = false; }
    });
    area.append(text, el("div", { class: "row", style: "margin:8px 0" }, button), error, out);
  }

  function chat(area, base, picked, byId) {
    const input = el("textarea", { id: "play-message", rows: 2, style: "width:100%",
      placeholder: "Send a message to every picked adapter" });
    const button = el("button", { type: "button", id: "play-send" }, "Send");
    const tokens = el("input", { type: "number", id: "play-max-tokens", value: 64, min: 1, style: "width:80px" });
    const reset = el("button", { type: "button", class: "secondary" }, "New chat");
    const out = el("div", { class: "columns", id: "play-chats" });
    const histories = {};
    reset.addEventListener("click", () => { for (const k of Object.keys(histories)) delete histories[k]; out.textContent = ""; });
    button.addEventListener("click", async () => {
      const message = input.value.trim();
      const ids = picked();
      if (!message || !ids.length) return;
      input.value = "";
      button.disabled = true;
      // one column per adapter; the server answers one at a time, each streamed as it is produced
      const jobs = ids.map((id) => {
        histories[id] = histories[id] || [];
        let column = out.querySelector(`[data-run="${CSS.escape(id)}"]`);
        if (!column) {
          column = el("div", { class: "card column", dataset: { run: id } }, el("h3", {}, columnTitle(byId[id])));
          out.appendChild(column);
        }
        column.append(el("div", { class: "bubble user" }, message));
        const reply = el("div", { class: "bubble assistant", dataset: { state: "streaming" } });
        column.append(reply);
        histories[id].push({ role: "user", content: message });
        return { id, reply };
      });
      for (const { id, reply } of jobs) {
        let text = "";
        try {
          await DT.stream("/api/playground/chat", { base: base.base, run: id, messages: histories[id],
            max_tokens: Number(tokens.value) || 64 }, (event) => {
            if (event.text) { text += event.text; reply.textContent = text; }
            if (event.error) reply.appendChild(DT.notice(event.error));
          });
        } catch (e) { reply.appendChild(DT.notice(e.message)); }
        reply.dataset.state = "done";
        if (!text) reply.appendChild(el("span", { class: "muted" }, "(empty reply)"));
        histories[id].push({ role: "assistant", content: text });
      }
      button.disabled = false;
    });
    area.append(input, el("div", { class: "row", style: "margin:8px 0" }, button,
      el("label", { class: "muted" }, "max new tokens ", tokens), reset), out);
  }

  DT.pages.playground = async (view) => {
    const data = await api("/api/playground");
    view.append(el("h1", {}, "Playground"));
    if (!data.bases.length) {
      view.append(el("div", { class: "empty" }, "No finished runs yet: the playground tries the adapters runs leave."));
      return;
    }
    const baseSelect = el("select", { id: "play-base" },
      data.bases.map((b, i) => el("option", { value: i }, `${b.base} · ${b.task}`)));
    const adapters = el("div", { class: "methods", id: "play-adapters" });
    const area = el("div", { id: "play-area" });
    view.append(el("div", { class: "card" }, el("div", { class: "row" }, el("label", { for: "play-base" }, "base "),
      baseSelect), el("h2", {}, "Adapters"), adapters), area);
    function show() {
      const base = data.bases[Number(baseSelect.value)];
      const byId = Object.fromEntries(base.adapters.map((a) => [a.id, a]));
      adapters.textContent = "";
      adapters.append(el("label", {}, el("input", { type: "checkbox", value: BASE }), " base model"),
        ...base.adapters.map((a, i) => el("label", {}, el("input", { type: "checkbox", value: a.id, checked: i < 3 }),
          ` ${a.id} (${a.method}${a.score === null ? "" : ", " + fmt.score(a)})`)));
      const picked = () => [...adapters.querySelectorAll("input:checked")].map((b) => b.value);
      area.textContent = "";
      (base.task === "classification" ? classifier : chat)(area, base, picked, byId);
    }
    baseSelect.addEventListener("change", show);
    show();
  };
})();
