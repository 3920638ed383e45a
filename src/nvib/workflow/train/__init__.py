"""Fine-tuning an NV model with the NVIB regularisers (docs/method.md §8), on the HuggingFace `Seq2SeqTrainer`.

Loss = task loss + λ_G(step)·Σ_sites KL_G + λ_D(step)·Σ_sites KL_D, where λ(step) follows a
`LambdaSchedule`. The model is converted with the identity initialisation first (with the empirical
prior if one is given), so step 0 is the pretrained model; in `model.train()` the NV layers sample and
compute their KL terms, in `model.eval()` they use the exact fast form, or the general form of §4 once
the layers have per-token variances (W_σ, see `prepare_model`).

With `convert=False` the model stays plain and trains with the task loss, optionally plus fine-tuning's own
regularisers: L2-SP (weights pulled towards the starting ones) and feature-mean matching (each attention input pulled
towards the empirical prior's mean), under the same λ schedule and gradient clipping as the KL terms.

`trainer`: the loss and the Trainer subclasses; `regularisers`: L2-SP and feature-mean matching; `features`: examples
tokenised and collated; `clipping`: the separate clipping of the regulariser's gradient; `finetune`: preparing,
building, running. Entry point: `finetune` (the command `nvib finetune` in `nvib.cli` calls it).
"""

from nvib.workflow.train.features import Collator, tokenise
from nvib.workflow.train.finetune import (
    CHECKPOINTS,
    RUN_ARGS,
    RUN_LOG,
    START_STDEV_TAU,
    build_trainer,
    finetune,
    prepare_model,
    set_trainable,
)
from nvib.workflow.train.trainer import KL_CLIPS, LambdaSchedule, NVCausalLMTrainer, NVTrainer

__all__ = [
    "CHECKPOINTS",
    "KL_CLIPS",
    "RUN_ARGS",
    "RUN_LOG",
    "START_STDEV_TAU",
    "Collator",
    "LambdaSchedule",
    "NVCausalLMTrainer",
    "NVTrainer",
    "build_trainer",
    "finetune",
    "prepare_model",
    "set_trainable",
    "tokenise",
]
