"""The Playground's model side: one base model and the adapters of chosen runs, side by side.

This is the one place the web app runs models. It calls the library directly (load_model,
load_adapter, set_adapter / disable_adapters, model.generate with a streamer), so the serving
engine can be swapped in here later without touching the app or the page.

PEFT deltas share one copy of the base (named adapters, switched per request); a full
fine-tune is a whole model of its own. One base is kept loaded at a time: picking another
frees the first. Requests run one at a time (a lock): the models are shared state.
"""
from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any, Iterator

import torch

from deltatune.errors import DeltatuneError
from deltatune.ui import runs as runs_index

BASE = "base"  # the id of "no adapter" in requests


def choices(root: Path) -> list[dict]:
    """The bases runs were trained on, each with its finished runs (the adapters to try)."""
    bases: dict[tuple[str, str], dict] = {}
    for row in runs_index.scan(root)["runs"]:
        if row["state"] != "finished" or not row["base"]:
            continue
        key = (row["base"], row["task"])
        entry = bases.setdefault(key, {"base": row["base"], "task": row["task"], "adapters": []})
        entry["adapters"].append({"id": row["id"], "method": row["method_label"], "score": row["score"],
                                  "metric": row["metric"]})
    return list(bases.values())


def _label_names(run_dir: Path) -> tuple[int, list[str] | None]:
    config = runs_index._read_yaml(run_dir / "config.yaml")
    names = (config.get("data") or {}).get("label_names")
    return int(config.get("num_labels") or (len(names) if names else 2)), names


class Playground:
    def __init__(self, runs_root: Path) -> None:
        self.root = Path(runs_root).resolve()
        self.lock = threading.Lock()
        self.base_key: tuple | None = None
        self.shared: Any = None            # (model, tokenizer) carrying the PEFT adapters
        self.loaded: dict[str, str] = {}   # run id -> adapter name on the shared model
        self.full: dict[str, Any] = {}     # run id -> (model, tokenizer) of a full fine-tune

    # ------------------------------------------------------------------ loading
    def _run_dir(self, run_id: str, base: str, task: str) -> Path:
        directory = runs_index.resolve(self.root, run_id)
        summary = runs_index._read_json(directory / "summary.json") or {}
        if summary.get("model") != base or summary.get("task") != task:
            raise DeltatuneError(f"{run_id}: not a finished {task} run on base {base!r}")
        return directory

    def _use_base(self, base: str, task: str, num_labels: int | None) -> None:
        from deltatune.models import load_model

        key = (base, task, num_labels)
        if self.base_key != key:
            self.shared, self.loaded, self.full, self.base_key = None, {}, {}, None
            self.shared = load_model(base, task=task, num_labels=num_labels)
            self.shared[0].eval()
            self.base_key = key

    def _model_for(self, run_id: str, base: str, task: str):
        """(model, tokenizer) with `run_id`'s delta active (BASE: the bare base model)."""
        from deltatune.adapters_io import load_adapter
        from deltatune.deltas import set_adapter
        from deltatune.models import load_model

        if run_id == BASE:
            return self.shared
        directory = self._run_dir(run_id, base, task)
        if not (directory / "adapter_config.json").is_file():  # full fine-tuning: its own model
            if run_id not in self.full:
                model, tokenizer = load_model(base, task=task, num_labels=self.base_key[2])
                self.full[run_id] = (load_adapter(model, directory).eval(), tokenizer)
            return self.full[run_id]
        model, tokenizer = self.shared
        if run_id not in self.loaded:
            name = f"run{len(self.loaded)}_" + re.sub(r"\W", "_", run_id)[-40:]
            load_adapter(model, directory, name=name)
            self.loaded[run_id] = name
        set_adapter(model, self.loaded[run_id])
        model.eval()
        return model, tokenizer

    def _context(self, run_id: str, model):
        import contextlib

        from deltatune.deltas import adapter_names, disable_adapters

        if run_id == BASE and adapter_names(model):
            return disable_adapters(model)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ classify
    def classify(self, base: str, run_ids: list[str], text: str) -> list[dict]:
        """Each run's label and class probabilities for `text`, in the order given."""
        if not text.strip():
            raise DeltatuneError("type a text to classify")
        if not run_ids:
            raise DeltatuneError("pick at least one adapter (or the base)")
        first = next((r for r in run_ids if r != BASE), None)
        num_labels, names = _label_names(runs_index.resolve(self.root, first)) if first else (2, None)
        results = []
        with self.lock, torch.no_grad():
            self._use_base(base, "classification", num_labels)
            for run_id in run_ids:
                model, tokenizer = self._model_for(run_id, base, "classification")
                batch = tokenizer(text, return_tensors="pt", truncation=True, max_length=512)
                with self._context(run_id, model):
                    logits = model(**batch).logits[0].float()  # (num_labels,)
                probs = torch.softmax(logits, dim=-1).tolist()
                labels = names or [str(i) for i in range(len(probs))]
                best = max(range(len(probs)), key=probs.__getitem__)
                results.append({"run": run_id, "label": labels[best],
                                "probabilities": dict(zip(labels, probs))})
        return results

    # ------------------------------------------------------------------ chat
    def chat(self, base: str, run_id: str, messages: list[dict], max_tokens: int = 64,
             temperature: float = 0.0) -> Iterator[str]:
        """The reply of `run_id`'s model to the chat so far, piece by piece as it is generated."""
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        from deltatune.serving.generate import check_options

        check_options(max_tokens, temperature, 1.0)
        if not messages or not str(messages[-1].get("content", "")).strip():
            raise DeltatuneError("type a message")
        with self.lock:
            self._use_base(base, "causal-lm", None)
            model, tokenizer = self._model_for(run_id, base, "causal-lm")
            if getattr(tokenizer, "chat_template", None):
                ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                    return_tensors="pt", return_dict=True)["input_ids"]
            else:  # a plain LM: the turns as text
                text = "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
                ids = tokenizer(text, return_tensors="pt").input_ids
            streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
            options: dict[str, Any] = {"max_new_tokens": max_tokens, "do_sample": temperature > 0,
                                       "pad_token_id": tokenizer.pad_token_id, "streamer": streamer}
            if temperature > 0:
                options.update(temperature=temperature, top_k=0, top_p=1.0)
            else:  # the model's generation_config may ask for sampling; greedy is promised
                options.update(temperature=None, top_p=None, top_k=None)
            failure: list[BaseException] = []
            halt = threading.Event()  # the page went away: stop before the lock is let go

            class Halt(StoppingCriteria):
                def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
                    return torch.full((input_ids.shape[0],), halt.is_set(), dtype=torch.bool)

            options["stopping_criteria"] = StoppingCriteriaList([Halt()])

            def generate() -> None:
                try:
                    with torch.no_grad(), self._context(run_id, model):
                        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **options)
                except BaseException as exc:  # reported to the page, not lost in a thread
                    failure.append(exc)
                    streamer.end()

            worker = threading.Thread(target=generate, daemon=True)
            worker.start()
            try:
                for piece in streamer:
                    if piece:
                        yield piece
            finally:
                halt.set()
                worker.join()
        if failure:
            raise DeltatuneError(f"generation failed: {type(failure[0]).__name__}: {failure[0]}")
