"""Fine-tuning's own regularisers (L2-SP, feature-mean matching) and fine-tuning a plain model, against direct
computations on tiny models."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers as tf
from runs import one_thread  # noqa: F401  (a fixture)
from test_finetune import BART, BERT2BERT, examples, first_batch, stock_model, tiny_tokenizer, trainer_for
from typer.testing import CliRunner

import nvib
from nvib.cli import app
from nvib.core.kl import feature_mean
from nvib.workflow.train import RUN_LOG, Collator, LambdaSchedule, finetune, prepare_model, tokenise
from nvib.workflow.train.regularisers import L2SP, FeatureMean

pytestmark = pytest.mark.usefixtures("one_thread")


def prior_of(model, name: str = "bert2bert") -> nvib.EmpiricalPrior:
    pad = 0 if name == "bert2bert" else 1
    feats, collate = tokenise(examples(12, seed=3), tiny_tokenizer(name), "seq2seq", 64, 64), Collator(pad_id=pad)
    return nvib.EmpiricalPrior.estimate(model, [collate(feats[:6]), collate(feats[6:])], progress=False)


def floored(var: torch.Tensor) -> torch.Tensor:
    """max(s0², 1e-3·median s0², 1e-12), the median of an even count the mean of its two middle values."""
    v = var.double().sort().values
    median = (v[(len(v) - 1) // 2] + v[len(v) // 2]) / 2
    return torch.maximum(var.double(), 1e-3 * median).clamp(min=1e-12)


def losses_with_and_without(trainer, model, batch, weight: str) -> tuple[float, float]:
    """The trainer's training loss on `batch`, then again with the regulariser `weight` set to 0 (same noise)."""
    torch.manual_seed(0)
    with_penalty = float(trainer.compute_loss(model, batch))
    setattr(trainer, weight, 0.0)
    torch.manual_seed(0)
    return with_penalty, float(trainer.compute_loss(model, batch))


# ---- L2-SP -----------------------------------------------------------------------------------


@pytest.mark.parametrize("converted", [False, True], ids=["plain", "nv"])
def test_l2sp_penalty_and_gradient_are_half_the_squared_distance_to_the_start(converted, tmp_path):
    model = stock_model(BART)
    if converted:
        prepare_model(model)
    trainer = trainer_for(model, tmp_path, l2sp=0.3, lambda_g=0.0, lambda_d=0.0, kl_clip="joint")
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    pretrained = [n for n in start if not n.startswith("nvib_layers.")]
    assert len(pretrained) < len(start) if converted else len(pretrained) == len(start)
    direct = 0.5 * sum(float(((model.get_parameter(n) - start[n]).double() ** 2).sum()) for n in pretrained)
    penalty = trainer._l2sp()
    assert float(penalty) == pytest.approx(direct, rel=1e-4)
    grads = dict(zip(dict(model.named_parameters()), torch.autograd.grad(penalty, list(model.parameters()),
                                                                         allow_unused=True), strict=True))  # fmt: skip
    for name, grad in grads.items():
        if name in pretrained:
            assert torch.allclose(grad, model.get_parameter(name) - start[name], atol=1e-6), name
        else:  # the NV layers' parameters are not pulled
            assert grad is None, name
    # through the trainer's loss: task + α·penalty
    batch = first_batch(trainer)
    model.train()
    with_penalty, without = losses_with_and_without(trainer, model, batch, "l2sp")
    assert with_penalty == pytest.approx(without + 0.3 * direct, rel=1e-4)


def test_l2sp_start_is_a_frozen_copy():
    model = stock_model(BART)
    l2sp = L2SP(model)
    assert float(l2sp()) == 0.0
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert float(l2sp()) > 0  # the copy did not move with the weights


# ---- feature-mean matching -------------------------------------------------------------------


def test_feature_mean_is_zero_at_the_prior_mean_and_ignores_padding():
    mean, var = torch.randn(8).double(), torch.rand(8).double() + 0.1
    z = mean.float().expand(2, 5, 8).clone()
    valid = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    z[0, 3:] += 100.0  # padding moves nothing
    assert torch.allclose(feature_mean(z, valid, mean, var), torch.zeros(2), atol=1e-6)
    z[1, 0] += 1.0
    expected = (1.0 / (2 * floored(var))).mean() / 5
    assert float(feature_mean(z, valid, mean, var)[1]) == pytest.approx(float(expected), rel=1e-5)


def test_feature_mean_penalty_matches_a_direct_computation_from_the_hidden_states(tmp_path):
    """BERT2BERT: the attention inputs are the encoder's and decoder's layer inputs (output_hidden_states) and, at the
    cross site (once), the encoder output; tokens: the attention mask and the target tokens."""
    model = stock_model(BERT2BERT)
    prior = prior_of(model)
    trainer = trainer_for(model, tmp_path, name="bert2bert", feature_mean=0.2, prior=prior, kl_clip="joint")
    batch = first_batch(trainer)
    assert (batch["attention_mask"] == 0).any() and (batch["labels"] == -100).any()
    model.train()
    trainer._features.clear()
    out = model(**batch, output_hidden_states=True)
    penalty = trainer._features(batch)

    def site(z, valid, name):
        mean, s0sq = prior.sites[name].mean, floored(prior.sites[name].var)
        per_token = ((z.double() - mean) ** 2 / (2 * s0sq)).mean(-1)
        return float(((per_token * valid).sum(1) / valid.sum(1)).mean())

    enc_valid, dec_valid = batch["attention_mask"].double(), (batch["labels"] != -100).double()
    layers = model.config.encoder.num_hidden_layers
    direct = sum(site(out.encoder_hidden_states[i], enc_valid, f"encoder.{i}") for i in range(layers))
    direct += sum(site(out.decoder_hidden_states[i], dec_valid, f"decoder.{i}") for i in range(layers))
    direct += site(out.encoder_last_hidden_state, enc_valid, "cross")
    assert len(trainer._features.sites) == 2 * layers + 1
    assert float(penalty) == pytest.approx(direct, rel=1e-5)
    assert direct > 0
    # through the trainer's loss: task + μ·penalty
    with_penalty, without = losses_with_and_without(trainer, model, batch, "feature_mean")
    assert with_penalty == pytest.approx(without + 0.2 * direct, rel=1e-4)


def test_feature_mean_captures_only_in_training_and_takes_its_hooks_off():
    model = stock_model(BART)
    fm = FeatureMean(model, prior_of(model, "bart"))
    batch = Collator(pad_id=1)(tokenise(examples(3), tiny_tokenizer(), "seq2seq", 64, 64))
    with torch.no_grad():
        model.eval()(**batch)
    assert fm.captured == {}
    with pytest.raises(RuntimeError, match="training-mode forward"):
        fm(batch)
    fm.remove()
    model.train()(**batch)
    assert fm.captured == {}


# ---- fine-tuning runs ------------------------------------------------------------------------


def test_plain_finetune_with_each_regulariser_runs_logs_and_saves_a_plain_model(tmp_path):
    tok = tiny_tokenizer("bert2bert")
    model = stock_model(BERT2BERT)
    prior = prior_of(model)
    common = dict(max_steps=4, batch_size=4, lr=1e-3, seed=0, max_source_len=16, max_target_len=8, logging_steps=2,
                  save_steps=2, progress=False, schedule=LambdaSchedule("linear", steps=2), convert=False)  # fmt: skip
    for name, options in (("l2sp", {"l2sp": 0.1}), ("feature_mean", {"feature_mean": 0.01, "prior": prior})):
        out = tmp_path / name
        tuned = finetune(copy.deepcopy(model), examples(8), tok, output_dir=out, **options, **common)
        assert not nvib.is_converted(tuned)
        logs = [e for e in json.loads((out / RUN_LOG).read_text()) if "loss" in e]
        assert logs and all(name in e and e[name] >= 0 and "task_loss" in e for e in logs)
        assert all("kl_grad_norm" in e for e in logs)  # its gradient is clipped on its own (kl_clip="separate")
        assert logs[0][f"lambda_{name}"] == pytest.approx(next(iter(options.values())))  # step 2 of a 2-step warm-up
        assert not any(k.startswith("kl_g_") for e in logs for k in e)
        assert logs[-1][name] > 0
        reloaded = tf.EncoderDecoderModel.from_pretrained(out)
        assert torch.equal(next(reloaded.parameters()), next(tuned.parameters()))
        mode = {(out / name).stat().st_mode & 0o777 for name in ("model.safetensors", "config.json")}
        assert len(mode) == 1  # the weights readable like the config (safetensors 0.8 writes 0600)
    # L2-SP on an NV model too
    out = tmp_path / "nv"
    tuned = finetune(copy.deepcopy(model), examples(8), tok, output_dir=out, l2sp=0.1, prior=prior,
                     **{**common, "convert": True})  # fmt: skip
    logs = [e for e in json.loads((out / RUN_LOG).read_text()) if "loss" in e]
    assert nvib.is_converted(tuned) and all("l2sp" in e and "kl_g_encoder" in e for e in logs)


def test_bad_regulariser_settings_are_refused_in_one_line(tmp_path):
    model, tok = stock_model(BART), tiny_tokenizer()
    prior = prior_of(model, "bart")
    cases = [
        (dict(l2sp=-1, convert=False), "l2sp must be a finite number >= 0"),
        (dict(feature_mean=-0.1, convert=False, prior=prior), "feature_mean must be a finite number >= 0"),
        (dict(feature_mean=0.01, convert=False), "needs the model's empirical prior"),
        (dict(feature_mean=0.01, prior=prior), "for a plain model"),
        (dict(lambda_g=0.01, convert=False), "lambda_g was given"),
        (dict(convert=False, nv_config=nvib.NVConfig()), "nv_config was given"),
    ]
    for options, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            finetune(model, examples(2), tok, output_dir=tmp_path / "unused", **options)
        assert "\n" not in str(error.value) and "Fix:" in str(error.value), str(error.value)
    assert not nvib.is_converted(model)
    with pytest.raises(ValueError, match="not converted"):
        trainer_for(model, tmp_path, lambda_g=0.01)
    with pytest.raises(ValueError, match="lambda_g"):  # on an NV model KL_G's mean term is the pull
        trainer_for(prepare_model(model), tmp_path, feature_mean=0.01, prior=prior)


def test_cli_shows_and_runs_the_regularisers(tmp_path):
    cli = CliRunner()
    result = cli.invoke(app, ["finetune", "--help"])
    assert result.exit_code == 0
    for option in ("--l2-sp", "--feature-mean", "--no-nv"):
        assert option in result.output, option
    model_dir = tmp_path / "model"
    model = stock_model(BART)
    model.save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    prior_of(model, "bart").save(tmp_path / "prior.safetensors")
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"source": e.source, "target": e.target}) + "\n" for e in examples(6)))
    out = tmp_path / "out"
    args = ["finetune", str(model_dir), str(train), "-o", str(out), "--max-steps", "2", "--batch-size", "3",
            "--no-nv", "--l2-sp", "0.1", "--feature-mean", "0.01", "--prior", str(tmp_path / "prior.safetensors"),
            "--logging-steps", "1", "--no-progress"]  # fmt: skip
    result = cli.invoke(app, args)
    assert result.exit_code == 0, result.output
    logs = [e for e in json.loads((out / RUN_LOG).read_text()) if "loss" in e]
    assert all({"l2sp", "feature_mean"} <= set(e) for e in logs)
    assert not (out / "nv_config.json").exists() and (out / "config.json").exists()
    result = cli.invoke(app, [*args[:4], str(tmp_path / "o2"), "--feature-mean", "0.01", "--no-progress"])
    assert result.exit_code == 2 and "Fix:" in result.output and len(result.output.strip().splitlines()) == 1
