"""nvib.workflow.objectives: the teacher-forced target NLL against a direct computation from full logits, padding and
chunking invariance, targets only; the dev objective's likelihood path and its diversity guard."""

from __future__ import annotations

import math

import pytest
import torch
import transformers as tf
from cases import MINILM

import nvib.workflow.objectives
from nvib.workflow.data import Example, batches
from nvib.workflow.evaluate import Evaluator, Output
from nvib.workflow.metrics import diversity
from nvib.workflow.objectives import DevObjective, TrialResult, examples_nll, target_nll

EXAMPLES = [
    Example("the quick brown fox jumps over the lazy dog", "a fox jumps"),
    Example("parse command line options and print a usage message when they are wrong", "parse options"),
    Example("tiny", "a much longer reference text than its source, with several more words in it"),
    Example("a library for reading and writing compressed archives", "archive library"),
]


@pytest.fixture(scope="module")
def tokenizer():
    return tf.AutoTokenizer.from_pretrained(MINILM, local_files_only=True)


def _causal(name: str, vocab: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "gpt2":
        config = tf.GPT2Config(
            vocab_size=vocab,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=128,
            pad_token_id=0,
            bos_token_id=101,
            eos_token_id=102,
        )
        return tf.GPT2LMHeadModel(config).eval()
    config = tf.Gemma3TextConfig(  # final logit soft-capping: the model's own head must apply it
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=128, pad_token_id=0,
        final_logit_softcapping=5.0, sliding_window=4,
    )  # fmt: skip
    return tf.Gemma3ForCausalLM(config).eval()


def _bart(vocab: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = tf.BartConfig(
        vocab_size=vocab, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
        pad_token_id=0, bos_token_id=101, eos_token_id=102, decoder_start_token_id=101,
    )  # fmt: skip
    return tf.BartForConditionalGeneration(config).eval()


def _direct(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[list[float], list[int]]:
    """Per-example summed NLL from the full [B, L, V] logits in float64, one example at a time (no padding)."""
    nlls, counts = [], []
    for i in range(batch["input_ids"].shape[0]):
        mask = batch["attention_mask"][i].bool()
        ids = batch["input_ids"][i][mask][None]
        if model.config.is_encoder_decoder:
            labels = batch["labels"][i][batch["labels"][i] != -100][None]
            decoder = model.prepare_decoder_input_ids_from_labels(labels=labels)
            logits = model(input_ids=ids, decoder_input_ids=decoder).logits[0].double()
            targets = labels[0]
        else:
            labels = batch["labels"][i][mask]
            logits = model(input_ids=ids).logits[0, :-1].double()
            targets, keep = labels[1:], labels[1:] != -100
            logits, targets = logits[keep], targets[keep]
        logp = torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0]
        nlls.append(-float(logp.sum()))
        counts.append(len(targets))
    return nlls, counts


@pytest.mark.parametrize("name", ["gpt2", "gemma3", "bart"])
@torch.inference_mode()
def test_target_nll_matches_full_logits(name: str, tokenizer) -> None:
    model = _bart(tokenizer.vocab_size) if name == "bart" else _causal(name, tokenizer.vocab_size)
    kind = "seq2seq" if name == "bart" else "lm"
    (batch,) = batches(EXAMPLES, tokenizer, len(EXAMPLES), 64, 32, kind)
    assert (batch["attention_mask"] == 0).any()  # padding is present in the batch
    nll, counts = target_nll(model, batch)
    want_nll, want_counts = _direct(model, batch)
    assert counts.tolist() == want_counts
    torch.testing.assert_close(nll, torch.tensor(want_nll, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    # targets only: the counts are the reference tokens (+ EOS), never the prompt
    answers = [len(tokenizer(ex.target, add_special_tokens=False)["input_ids"]) for ex in EXAMPLES]
    if kind == "lm":
        eos = int(tokenizer.eos_token_id is not None)  # + EOS when the tokenizer has one (MiniLM's has not)
        assert counts.tolist() == [a + eos for a in answers]
    else:
        assert counts.tolist() == [a + 2 for a in answers]  # [CLS] ... [SEP] from the tokenizer
    # one example alone (no padding) and in small logits chunks: the same
    for i, ex in enumerate(EXAMPLES):
        (alone,) = batches([ex], tokenizer, 1, 64, 32, kind)
        torch.testing.assert_close(target_nll(model, alone)[0][0], nll[i], rtol=1e-5, atol=1e-5)
    chunked, _ = target_nll(model, batch, max_logits=1)  # one row per forward
    torch.testing.assert_close(chunked, nll, rtol=1e-5, atol=1e-5)


@torch.inference_mode()
@pytest.mark.skipif(
    not nvib.workflow.objectives.BOOLEAN_LOGITS_TO_KEEP,
    reason="this transformers release has no boolean logits_to_keep",
)
def test_causal_lm_head_sees_target_positions_only(tokenizer) -> None:
    model = _causal("gemma3", tokenizer.vocab_size)
    shapes: list[tuple[int, ...]] = []
    hook = model.lm_head.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape)))
    (batch,) = batches(EXAMPLES, tokenizer, len(EXAMPLES), 64, 32, "lm")
    _, counts = target_nll(model, batch, max_logits=20 * tokenizer.vocab_size)
    hook.remove()
    assert max(counts) <= 20 < int(counts.sum())
    assert all(len(s) == 2 for s in shapes)  # [positions, vocab]: never [batch, sequence, vocab]
    assert sum(s[0] for s in shapes) == int(counts.sum())
    assert len(shapes) > 1 and max(s[0] for s in shapes) <= 20  # chunks within the logits budget


def test_target_nll_errors(tokenizer) -> None:
    model = _causal("gpt2", tokenizer.vocab_size)
    (batch,) = batches(EXAMPLES[:1], tokenizer, 1, 64, 32, "lm")
    with pytest.raises(ValueError, match="batch has no 'labels'"):
        target_nll(model, {k: v for k, v in batch.items() if k != "labels"})
    with pytest.raises(ValueError, match="max_logits must be >= 1"):
        target_nll(model, batch, max_logits=0)


def test_examples_nll_agrees_with_batches(tokenizer) -> None:
    model = _causal("gpt2", tokenizer.vocab_size)
    rows = examples_nll(model, tokenizer, EXAMPLES, batch_size=3, max_source_len=64, max_target_len=32)
    (batch,) = batches(EXAMPLES, tokenizer, 4, 64, 32, "lm")
    with torch.inference_mode():
        nll, counts = target_nll(model, batch)
    assert [c for _, c in rows] == counts.tolist()
    assert [v for v, _ in rows] == pytest.approx(nll.tolist(), rel=1e-5)


# ----------------------------------------------------------------------------------------------
# the dev objective


class FakeEvaluator(Evaluator):
    """Generates a canned output per knob setting (no model): lets the objective's logic be checked exactly."""

    def __init__(self, table: dict[float, list[str]]):
        self.task, self.table, self.calls = "summarisation", table, []
        self.model = None

    def outputs(self, examples, description="", *, generate=None, score=True):
        alpha = self.alpha
        self.calls.append((alpha, len(examples), generate, score))
        return [Output(self.table[alpha][EXAMPLES.index(ex)], 3, 1.0 * alpha, 2) for ex in examples]


@pytest.fixture
def fake(monkeypatch):
    table = {
        math.inf: ["a fox jumps", "parse options now", "long reference text", "archive library"],  # equivalence
        -5.0: ["the the", "the the", "the the", "the the"],  # one string for every input
        0.0: ["a fox jumps", "parse the options", "a reference", "an archive library"],
    }
    evaluator = FakeEvaluator(table)

    def configure(model, config):
        evaluator.alpha = config.alpha_tau_e

    monkeypatch.setattr("nvib.workflow.objectives.configure", configure)
    return evaluator


def test_dev_objective_rejects_degenerate_outputs(fake) -> None:
    objective = DevObjective(fake, EXAMPLES, "rougeL")
    result = objective({"alpha_tau_e": -5.0}, 4)
    assert isinstance(result, TrialResult)
    assert result.reject is not None and "distinct 0.250 < 0.5 × 1.000" in result.reject
    assert result.attrs["diversity"] == diversity(["the the"] * 4).as_dict()
    good = objective({"alpha_tau_e": 0.0}, 4)
    assert good.reject is None and good.value > 0 and good.n_tokens == 12
    # the reference (equivalence) outputs were made once and are shared with the equivalence trial
    assert [c[0] for c in fake.calls].count(math.inf) == 1
    assert objective({"alpha_tau_e": math.inf}, 4).n_tokens == 0  # cached
    assert all(generate and not score for _, _, generate, score in fake.calls)
    assert DevObjective(fake, EXAMPLES, "rougeL", min_diversity=None)({"alpha_tau_e": -5.0}, 2).reject is None


def test_dev_objective_likelihood_scores_only(fake) -> None:
    objective = DevObjective(fake, EXAMPLES)  # the default metric: nll
    result = objective({"alpha_tau_e": -5.0}, 3)
    assert result.value == pytest.approx(5.0 / 2)  # -(mean token NLL) = -(3 × -5) / (3 × 2)
    assert result.reject is None and "diversity" not in result.attrs and result.n_tokens is None
    assert fake.calls == [(-5.0, 3, False, True)]
    with pytest.raises(ValueError, match="min_diversity must be in"):
        DevObjective(fake, EXAMPLES, "rougeL", min_diversity=2.0)


@torch.inference_mode()
def test_target_nll_on_a_converted_rotary_model(tokenizer) -> None:
    """The target-positions-only LM head path holds for an NV model too (key space, docs/method.md §10), away from
    equivalence: against full logits, one unpadded example at a time."""
    import nvib

    model = _causal("gemma3", tokenizer.vocab_size)
    prior = nvib.EmpiricalPrior.estimate(
        model, batches(EXAMPLES, tokenizer, 2, 64, 32, "lm"), data="examples", progress=False
    )
    nvib.convert(model, nvib.NVConfig(alpha_tau_d=-2.0), prior=prior)
    (batch,) = batches(EXAMPLES, tokenizer, len(EXAMPLES), 64, 32, "lm")
    nll, counts = target_nll(model, batch)
    want_nll, want_counts = _direct(model, batch)
    assert counts.tolist() == want_counts
    torch.testing.assert_close(nll, torch.tensor(want_nll, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    nvib.configure(model, nvib.NVConfig())
    assert not torch.allclose(target_nll(model, batch)[0], nll)  # the knobs do reach the likelihood
