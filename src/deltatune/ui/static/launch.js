// Launch: a form -> `deltatune plan`'s prediction -> `deltatune train|compare` in a child
// process; the jobs this page started, with their log's last lines and a Stop button.
"use strict";
(() => {
  const { el, fmt, badge, api, link } = DT;
  const HINTS = {
    model: "a preset or a local transformers directory / .gguf file",
    train: "path on this machine (.jsonl .json .csv .tsv .parquet .txt)",
    target_modules: "comma-separated; empty: all linear layers",
    lr: "empty: the method's default",
    label_names: "comma-separated, label 0 first; shown in the playground",
    max_steps: "empty: run the epochs",
    init: "pissa / olora: start from the weights' principal part",
    loraplus_lr_ratio: "empty: one lr; LoRA+ suggests 16",
  };

  function field(name, label, input, cls) {
    input.id = `f-${name}`;
    if (!input.name) input.name = name;
    return el("div", { class: `field ${cls || ""}`, dataset: { field: name } },
      el("label", { for: input.id }, label), input,
      HINTS[name] ? el("span", { class: "hint" }, HINTS[name]) : null,
      el("span", { class: "error", dataset: { errorFor: name } }));
  }

  const input = (attrs) => el("input", Object.assign({ type: "text", autocomplete: "off" }, attrs));
  const select = (name, values, selected) => el("select", { name },
    values.map((v) => el("option", { value: v, selected: v === selected }, v)));

  function buildForm(options) {
    const methods = Object.keys(options.methods);
    const presets = Object.keys(options.presets);
    const task = select("task", Object.keys(options.formats), "classification");
    const format = select("format", options.formats.classification, "classification");
    task.addEventListener("change", () => {
      format.textContent = "";
      options.formats[task.value].forEach((f) => format.appendChild(el("option", { value: f }, f)));
    });
    const kind = select("kind", ["train", "compare"], "train");
    const method = select("method", methods, "lora");
    const boxes = el("div", { class: "methods" }, methods.map((m) => el("label", {},
      el("input", { type: "checkbox", name: "methods", value: m, checked: options.compare_defaults.includes(m) }), ` ${m}`)));
    const methodField = field("method", "method", method);
    const methodsField = field("methods", "methods to compare", boxes, "span2");
    const sync = () => {
      methodField.hidden = kind.value !== "train";
      methodsField.hidden = kind.value !== "compare";
      const chosen = kind.value === "train" ? [method.value]
        : [...boxes.querySelectorAll("input:checked")].map((b) => b.value);
      for (const name of ["r", "alpha", "target_modules", "init", "bottleneck_size", "num_virtual_tokens"]) {
        const owners = methods.filter((m) => (options.methods[m] || []).includes(name));  // METHOD_OPTIONS
        form.querySelector(`[data-field="${name}"]`).hidden = !owners.some((o) => chosen.includes(o));
      }
      {  // LoRA+ is a train option of LoRA and DoRA (LORAPLUS_METHODS)
        const name = "loraplus_lr_ratio", owners = ["lora", "dora"];
        form.querySelector(`[data-field="${name}"]`).hidden = !owners.some((o) => chosen.includes(o));
      }
    };
    const form = el("form", { class: "launch", id: "launch-form", novalidate: true },
      field("kind", "what to start", kind),
      field("name", "run name (folder in the runs folder)", input({ placeholder: "sst2-lora" })),
      field("model", "model", input({ list: "presets", placeholder: presets[0] || "" })),
      field("task", "task", task),
      field("train", "training data", input({ list: "data-files", placeholder: "../shared/data/sst2/train.jsonl" })),
      field("eval", "evaluation data (optional)", input({ list: "data-files" })),
      field("format", "data format", format),
      field("label_names", "label names (optional)", input({ placeholder: "negative, positive" })),
      methodField, methodsField,
      field("r", "rank r (LoRA, LoHa, LoKr, VeRA)", input({ placeholder: "LoRA 8, VeRA 256" })),
      field("alpha", "alpha (LoRA, LoHa, LoKr, AdaLoRA)", input({ placeholder: "LoRA 16, AdaLoRA 24" })),
      field("target_modules", "target modules", input({ placeholder: "all-linear" })),
      field("init", "LoRA init", select("init", ["default", "gaussian", "pissa", "olora"], "default")),
      field("loraplus_lr_ratio", "LoRA+ ratio (B's lr / A's)", input({ placeholder: "off" })),
      field("bottleneck_size", "adapter bottleneck size", input({ placeholder: "hidden/16" })),
      field("num_virtual_tokens", "virtual tokens", input({ placeholder: "20" })),
      field("max_steps", "max steps", input({ placeholder: "" })),
      field("epochs", "epochs", input({ placeholder: "1" })),
      field("batch_size", "batch size", input({ placeholder: "32" })),
      field("lr", "learning rate", input({ placeholder: "method default" })),
      field("max_train_rows", "max training rows", input({ placeholder: "all" })),
      field("max_length", "max length (tokens)", input({ placeholder: "128" })),
      field("eval_every", "evaluate every (steps)", input({ placeholder: "end only" })),
      el("label", { class: "span3" }, el("input", { type: "checkbox", name: "overwrite" }),
        " replace an existing run of that name"),
      el("datalist", { id: "presets" }, presets.map((p) => el("option", { value: p }, options.presets[p]))),
      el("datalist", { id: "data-files" }, options.data_files.map((f) => el("option", { value: f }))));
    kind.addEventListener("change", sync);
    method.addEventListener("change", sync);
    boxes.addEventListener("change", sync);
    sync();
    return form;
  }

  function values(form) {
    const out = {};
    for (const node of form.querySelectorAll("input, select")) {
      if (!node.name || node.closest("[hidden]")) continue;
      if (node.type === "checkbox" && node.name === "methods") {
        out.methods = out.methods || [];
        if (node.checked) out.methods.push(node.value);
      } else if (node.type === "checkbox") out[node.name] = node.checked;
      else if (node.value.trim() !== "") out[node.name] = node.value.trim();
    }
    return out;
  }

  function showErrors(form, general, errors) {
    form.querySelectorAll(".field").forEach((f) => f.classList.remove("invalid"));
    form.querySelectorAll(".error").forEach((e) => { e.textContent = ""; });
    general.textContent = "";
    for (const [name, message] of Object.entries(errors || {})) {
      const slot = form.querySelector(`[data-error-for="${name}"]`);
      if (slot && !slot.closest("[hidden]")) {
        slot.textContent = message;
        slot.closest(".field").classList.add("invalid");
      } else general.appendChild(DT.notice(message));
    }
  }

  function planTable(plans) {
    return el("table", { id: "plan-table" },
      el("thead", {}, el("tr", {}, ["method", "trainable", "share %", "activations MB", "predicted peak MB", "file MB"]
        .map((h, i) => el("th", { class: i ? "num" : null }, h)))),
      el("tbody", {}, plans.map((p) => el("tr", { dataset: { method: p.method } }, el("td", {}, p.method),
        el("td", { class: "num" }, fmt.int(p.trainable_params)), el("td", { class: "num" }, fmt.num(p.trainable_percent, 3)),
        el("td", { class: "num" }, fmt.num(p.activation_mb, 1)),
        el("td", { class: "num peak" }, fmt.num(p.predicted_peak_mb, 0)),
        el("td", { class: "num" }, fmt.num(p.predicted_file_mb, 2))))));
  }

  function jobsList(jobs) {
    if (!jobs.length) return el("div", { class: "empty" }, "Nothing started from this page yet.");
    return el("div", {}, jobs.map((j) => el("div", { class: "card job", dataset: { job: j.id, state: j.state } },
      el("div", { class: "row" }, el("b", {}, `${j.kind} ${j.name}`), badge(j.state),
        el("a", { href: j.kind === "compare" ? link("compare", j.run) : link("run", j.run) }, "open"),
        ["running", "stopping"].includes(j.state) ? el("button", { class: "danger", type: "button",
          disabled: j.state === "stopping", onclick: () => api(`/api/jobs/${encodeURIComponent(j.id)}/stop`, {}) }, "Stop") : null),
      j.error ? DT.notice(j.error) : null,
      el("div", { class: "log" }, j.log.slice(-6).join("\n")))));
  }

  DT.pages.launch = async (view) => {
    const options = DT.options || await api("/api/options");
    const form = buildForm(options);
    const general = el("div", { id: "form-errors" });
    const planBox = el("div", { id: "plan" });
    const jobsBox = el("div", { id: "jobs" });
    const planButton = el("button", { type: "button", class: "secondary", id: "plan-button" }, "Plan memory");
    const startButton = el("button", { type: "button", id: "start-button" }, "Start");
    const busy = async (button, work) => {
      planButton.disabled = startButton.disabled = true;
      const label = button.textContent;
      button.textContent = `${label}…`;
      try { await work(); } catch (e) { showErrors(form, general, e.errors || { "": e.message }); }
      finally { planButton.disabled = startButton.disabled = false; button.textContent = label; }
    };
    planButton.addEventListener("click", () => busy(planButton, async () => {
      showErrors(form, general, null);
      planBox.textContent = "";
      const data = await api("/api/plan", values(form));
      planBox.append(el("h2", {}, "Predicted by deltatune plan (before training)"), planTable(data.plans));
    }));
    startButton.addEventListener("click", () => busy(startButton, async () => {
      showErrors(form, general, null);
      await api("/api/launch", values(form));
      await refreshJobs();
    }));
    view.append(el("h1", {}, "Launch"), el("div", { class: "card" }, form, general,
      el("div", { class: "row", style: "margin-top:12px" }, planButton, startButton)), planBox,
      el("h2", {}, "Started from this page"), jobsBox);
    let last = "";
    async function refreshJobs() {
      const data = await api("/api/runs");
      const key = JSON.stringify(data.jobs);
      if (key === last) return;
      last = key;
      jobsBox.textContent = "";
      jobsBox.append(jobsList(data.jobs));
    }
    await refreshJobs();
    DT.every(DT.pollMs, () => refreshJobs().catch(() => {}));
  };
})();
