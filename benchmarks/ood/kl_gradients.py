"""How hard do the KL terms pull against the task? Gradient norms of the parts of the fine-tuning loss (issue 13).

    python benchmarks/ood/kl_gradients.py [--steps 40] [--lambda 1e-3] [--floors 0 1e-3] [--clip joint separate]

Same warm start, prior, data order and optimiser as `finetune_nvib.py` (BERT2BERT from all-MiniLM-L6-v2, the
empirical prior on the first 1000 shuffled training examples (`--prior-examples`), batch 16, AdamW lr 1e-4
with 30 warm-up steps, clipping at 1.0) but a constant λ_G = λ_D = λ from step 0. At every step it takes the
gradients of the task loss, of λ·Σ KL_G and of λ·Σ KL_D separately (all trainable parameters) and records
their norms; the update then clips either their sum (``joint``: the Trainer's usual clipping) or the task and
KL parts separately (``separate``, `NVTrainer(kl_clip="separate")`). `--floors` sets the relative
prior-variance floor of KL_G (docs/method.md §8; 0 = none). Writes a JSON of the per-step norms (runs/) and prints a
summary table.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers as tf

import nvib
import nvib.core.kl
from nvib.workflow.data import batches, load_examples
from nvib.workflow.train import Collator, prepare_model, tokenise

sys.path[:0] = [str(Path(__file__).parent)]
import finetune_base  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def run(args, floor: float, clip: str, prior, feats) -> list[dict]:
    recipe = finetune_base.RECIPE
    torch.manual_seed(recipe["seed"])
    model = finetune_base.build_model(recipe["decoder_layers"]).eval()
    prepare_model(model, prior=prior, per_token_variance=False)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    nv_ids = {id(p) for p in model.nvib_layers.parameters()}
    optimizer = torch.optim.AdamW(params, lr=recipe["lr"], weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / recipe["warmup"]))
    collate, rows, layers = Collator(pad_id=0), [], nvib.nv_layers(model)
    nvib.core.kl.PRIOR_VARIANCE_FLOOR = floor  # kl_gaussian's default, read at call time
    for step in range(args.steps):
        batch = collate(feats[step * recipe["batch_size"] : (step + 1) * recipe["batch_size"]])
        task = model(**batch).loss
        terms = nvib.kl_terms(model)
        kl_g = sum(g for g, _ in terms.values()).float()
        kl_d = sum(d for _, d in terms.values()).float()
        grads = [
            torch.autograd.grad(part, params, retain_graph=True, allow_unused=True)
            for part in (task, args.lam * kl_g, args.lam * kl_d)
        ]
        grads = [[torch.zeros_like(p) if g is None else g for p, g in zip(params, gs, strict=True)] for gs in grads]

        def norm(gs, nv=None):
            return float(torch.stack([g.norm() for p, g in zip(params, gs, strict=True)
                                      if nv is None or (id(p) in nv_ids) == nv]).norm())  # fmt: skip

        kl = [a + b for a, b in zip(grads[1], grads[2], strict=True)]
        total = [a + b for a, b in zip(grads[0], kl, strict=True)]
        row = {
            "step": step, "task_loss": float(task), "kl_g": float(kl_g), "kl_d": float(kl_d),
            "task": norm(grads[0]), "kl_g_grad": norm(grads[1]), "kl_d_grad": norm(grads[2]), "kl_grad": norm(kl),
            "total": norm(total), "kl_grad_pretrained": norm(kl, False), "kl_grad_nv": norm(kl, True),
            "kl_g_cross": float(sum(g for s, (g, _) in terms.items() if layers[s].kind == "cross")),
        }  # fmt: skip
        if clip == "joint":
            scale = min(1.0, 1.0 / (row["total"] + 1e-6))
            update = [g * scale for g in total]
        else:
            ts, ks = (min(1.0, 1.0 / (row[k] + 1e-6)) for k in ("task", "kl_grad"))
            update = [a * ts + b * ks for a, b in zip(grads[0], kl, strict=True)]
        row["task_share"] = min(1.0, 1.0 / (row["total"] + 1e-6)) if clip == "joint" else min(1.0, 1 / row["task"])
        for p, g in zip(params, update, strict=True):
            p.grad = g
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        rows.append(row)
        print(f"floor {floor:g} {clip} step {step}: " + " ".join(f"{k}={v:.4g}" for k, v in row.items()), flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / "benchmarks" / "data" / "build")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lambda", dest="lam", type=float, default=1e-3)
    parser.add_argument("--floors", type=float, nargs="+", default=[0.0, 1e-3])
    parser.add_argument("--clip", nargs="+", choices=["joint", "separate"], default=["joint"])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "kl_gradients.json")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prior-examples", type=int, default=1000)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = finetune_base.RECIPE
    tokenizer = tf.AutoTokenizer.from_pretrained(finetune_base.MINILM)
    train = load_examples(args.data / "debian" / "train.jsonl")
    random.Random(recipe["seed"]).shuffle(train)
    feats = tokenise(
        train[: args.steps * recipe["batch_size"]],
        tokenizer,
        "seq2seq",
        recipe["max_source_len"],
        recipe["max_target_len"],
    )
    prior_file = args.out.with_suffix(f".prior{args.prior_examples}.safetensors")
    if prior_file.exists():
        prior = nvib.EmpiricalPrior.load(prior_file)
    else:  # the warm start's prior, as finetune_nvib.py estimates it (on fewer examples with --prior-examples)
        torch.manual_seed(recipe["seed"])
        model = finetune_base.build_model(recipe["decoder_layers"]).eval()
        prior_data = batches(
            train[: args.prior_examples], tokenizer, 32, recipe["max_source_len"], recipe["max_target_len"], "seq2seq"
        )
        prior = nvib.EmpiricalPrior.estimate(model, prior_data, progress=False)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        prior.save(prior_file)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    for floor in args.floors:
        for clip in args.clip:
            t0 = time.time()
            key = f"lambda={args.lam:g} floor={floor:g} clip={clip}"
            results[key] = run(args, floor, clip, prior, feats)
            print(f"{key}: {time.time() - t0:.0f} s", flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(summary(results))


def summary(results: dict[str, list[dict]]) -> str:
    """Markdown table: step 0, then the median (min–max) over the later steps, per run."""

    def cell(values: list[float], digits: int = 3) -> str:
        if len(values) == 1:
            return f"{values[0]:.{digits}g}"
        return f"{statistics.median(values):.{digits}g} ({min(values):.{digits}g}–{max(values):.{digits}g})"

    lines = [
        "| KL_G floor | clip | steps | task loss | ‖g_task‖ | ‖λ·∇KL_G‖ | ‖λ·∇KL_D‖ | ‖sum‖ | task update "
        "| KL_G cross |",
        "|---" * 10 + "|",
    ]
    for key, rows in results.items():
        floor, clip = key.split("floor=")[1].split()[0], key.split("clip=")[1]
        for label, part in (("0", rows[:1]), (f"1–{len(rows) - 1}", rows[1:])):
            if not part:
                continue
            cells = [cell([r["task_loss"] for r in part], 4)]
            cells += [cell([r[k] for r in part]) for k in ("task", "kl_g_grad", "kl_d_grad", "total")]
            cells.append(cell([r["task"] * r["task_share"] for r in part]))
            cells.append(cell([r["kl_g_cross"] for r in part]))
            lines.append(f"| {floor} | {clip} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
