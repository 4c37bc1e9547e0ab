"""Where SmolLM2's nf4 loss gap comes from: is it deltatune's quantization or the format?

The untrained base's loss on the rows of the QLoRA bench's last 5 steps (`qlora.py train
smollm2-135m`, batch 8 x 512, bf16 autocast), forward only, for:
  dense                     the fp32 base
  deltatune-nf4             dt.load_model(..., quantize="nf4")
  transformers-bnb-nf4      the peer path: AutoModelForCausalLM + BitsAndBytesConfig(nf4, double
                            quantization, bf16 compute), what peft's QLoRA users train on;
                            also without double quantization
  lowrank-r{8,64}-it{1,5}   nf4 plus the best rank-r correction of its error on every quantized
                            weight (LoftQ's alternating init: quantize W - BA, BA = rank-r SVD of
                            W - dequant): how much of the gap a LoRA of that rank could hold at
                            step 0, i.e. whether a smarter LoRA init could close it

    python benchmarks/quality/nf4_gap.py [--json PATH]   # default: benchmarks/results/quality/
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the common package
from common import machine, sft_setup as S  # noqa: I001
import torch

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
STEPS, BATCH, MAX_LENGTH = 14, 8, 512


def last5_loss(model, tokenizer) -> float:
    from deltatune.training.batching import training_collator
    from deltatune.training.losses import batch_loss, count_targets

    dataset = S.load_examples(tokenizer, MAX_LENGTH)
    collate = training_collator(model, tokenizer.pad_token_id, "causal-lm", S.data_config(MAX_LENGTH),
                                SimpleNamespace(padding_free=True))
    rows = S.row_order(len(dataset), STEPS, BATCH)
    model.eval()
    losses = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for k in range(STEPS - 5, STEPS):
            batch = collate([dataset[i] for i in rows[k * BATCH:(k + 1) * BATCH]])
            losses.append(batch_loss(model, "causal-lm", batch).item()
                          / count_targets("causal-lm", batch["labels"]))
    return statistics.mean(losses)


def nf4_roundtrip(weight: torch.Tensor) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    codes, state = bnbf.quantize_4bit(weight.to(torch.bfloat16).contiguous(), blocksize=64,
                                      quant_type="nf4", compress_statistics=True)
    return bnbf.dequantize_4bit(codes, state).float()


def lowrank_rows(results: dict) -> None:
    import deltatune as dt

    model, tokenizer = dt.load_model(S.MODEL)
    originals = {name: p.detach().clone() for name, p in model.named_parameters()
                 if name.endswith(".weight") and name.split(".")[-2] in TARGETS}
    for rank, iterations in [(8, 1), (8, 5), (64, 1)]:
        error = plain_error = 0.0
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name not in originals:
                    continue
                weight, correction = originals[name], torch.zeros_like(originals[name])
                for _ in range(iterations):
                    dequantized = nf4_roundtrip(weight - correction)
                    u, s, vh = torch.linalg.svd(weight - dequantized, full_matrices=False)
                    correction = (u[:, :rank] * s[:rank]) @ vh[:rank]
                error += (weight - dequantized - correction).pow(2).sum().item()
                plain_error += (weight - nf4_roundtrip(weight)).pow(2).sum().item()
                param.copy_(dequantized + correction)
        results[f"lowrank-r{rank}-it{iterations}"] = {
            "loss": last5_loss(model, tokenizer), "squared_error_vs_plain_nf4": error / plain_error}
        print(results, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    import deltatune as dt
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    results: dict = {}
    for row in ["dense", "deltatune-nf4", "transformers-bnb-nf4", "transformers-bnb-nf4-no-double"]:
        if row.startswith("transformers"):
            _, tokenizer = dt.load_model(S.MODEL)
            config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                        bnb_4bit_use_double_quant=not row.endswith("no-double"),
                                        bnb_4bit_compute_dtype=torch.bfloat16)
            model = AutoModelForCausalLM.from_pretrained(S.model_path(), quantization_config=config,
                                                         device_map="cpu")
        else:
            model, tokenizer = dt.load_model(S.MODEL, quantize="nf4" if row.endswith("nf4") else "none")
        results[row] = {"loss": last5_loss(model, tokenizer)}
        print(row, results[row], flush=True)
        del model
    lowrank_rows(results)
    dense = results["dense"]["loss"]
    for row in results.values():
        row["vs_dense"] = row["loss"] / dense - 1
    print(json.dumps(results, indent=1))
    machine.write_result(results, "quality", "nf4-gap", args.json)


if __name__ == "__main__":
    main()
