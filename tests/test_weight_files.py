"""A quantized base is read from its files, except an untied input embedding, which stays on a
private map of its file (weight_files.py): only the rows looked up become resident, the values
are the file's, and nothing written to the table reaches the file."""
from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
from tiny_runs import tiny_llama_dir

import deltatune as dt
import deltatune.models as models

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory.mktemp("weightfiles"))


def mapped_regions(path: Path) -> list[tuple[int, int]]:
    regions = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path)):
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            regions.append((start, end))
    return regions


def on_file_map(tensor: torch.Tensor, path: Path) -> bool:
    pointer = tensor.data_ptr()
    return any(start <= pointer < end for start, end in mapped_regions(path))


def ids() -> torch.Tensor:
    return torch.tensor([[5, 9, 40, 41, 7, 3]])


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_an_untied_embedding_stays_on_the_file_map_and_computes_the_same(llama_dir, monkeypatch, quantize):
    gc.collect()
    file = llama_dir / "model.safetensors"
    model, _ = dt.load_model(str(llama_dir), quantize=quantize)
    table = model.get_input_embeddings().weight
    assert on_file_map(table, file)
    # only the embedding is there: the map covers its bytes, not the codes or the head
    assert sum(end - start for start, end in mapped_regions(file)) <= table.numel() * 4 + 2 * 4096
    assert not on_file_map(model.get_output_embeddings().weight, file)
    with torch.no_grad():
        mapped_logits = model(input_ids=ids()).logits

    monkeypatch.setattr(models, "map_input_embedding", lambda *args: False)
    copied, _ = dt.load_model(str(llama_dir), quantize=quantize)
    assert not on_file_map(copied.get_input_embeddings().weight, file)
    assert torch.equal(copied.get_input_embeddings().weight, table)
    with torch.no_grad():
        assert torch.equal(copied(input_ids=ids()).logits, mapped_logits)


def test_writing_the_mapped_table_never_reaches_the_file(llama_dir):
    file = llama_dir / "model.safetensors"
    before = file.read_bytes()
    model, _ = dt.load_model(str(llama_dir), quantize="nf4")
    table = model.get_input_embeddings().weight
    assert on_file_map(table, file)
    with torch.no_grad():
        table[3] += 1.0  # copy-on-write: a private page
    assert file.read_bytes() == before
    fresh, _ = dt.load_model(str(llama_dir), quantize="nf4")
    assert torch.equal(fresh.get_input_embeddings().weight[3] + 1.0, table[3])


def test_a_converted_or_tied_table_keeps_its_copy(tmp_path, llama_dir):
    file = llama_dir / "model.safetensors"
    # another dtype than the file's: converted while loading, so the values are not the file's bytes
    model, _ = dt.load_model(str(llama_dir), quantize="nf4", dtype="bf16")
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert not on_file_map(model.get_input_embeddings().weight, file)

    tied_model, tokenizer = dt.load_model(str(llama_dir))
    tied_model.config.tie_word_embeddings = True
    tied_model.tie_weights()
    tied_model.save_pretrained(tmp_path / "tied")
    tokenizer.save_pretrained(tmp_path / "tied")
    tied, _ = dt.load_model(str(tmp_path / "tied"), quantize="nf4")
    table = tied.get_input_embeddings().weight
    assert tied.get_output_embeddings().weight is table  # still one table
    assert not on_file_map(table, tmp_path / "tied" / "model.safetensors")


def test_a_dense_base_is_left_to_transformers(llama_dir, monkeypatch):
    calls = []
    monkeypatch.setattr(models, "map_input_embedding", lambda *args: calls.append(args))
    dt.load_model(str(llama_dir))
    assert calls == []


def test_plan_reads_every_weight_but_a_mapped_table(llama_dir):
    from deltatune.compare.plan import touch_weights

    model, _ = dt.load_model(str(llama_dir), quantize="nf4")
    assert model.deltatune_embedding_mapped
    read = []
    for parameter in model.parameters():
        parameter.sum = lambda p=parameter: read.append(p)
    touch_weights(model)
    table = model.get_input_embeddings().weight
    assert len(read) == len(list(model.parameters())) - 1 and all(p is not table for p in read)
    model.deltatune_embedding_mapped = False
    read.clear()
    touch_weights(model)
    assert any(p is table for p in read)
