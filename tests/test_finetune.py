"""NVIB fine-tuning (docs/method.md §8): NVTrainer, λ schedules, freezing, resume, save/load, CLI."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import transformers as tf
from cases import MINILM, REAL_WEIGHTS, TINY
from runs import one_thread  # noqa: F401  (a fixture)
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from typer.testing import CliRunner

import nvib
from nvib.cli import app
from nvib.core.kl import kl_dirichlet, kl_gaussian
from nvib.core.layer import LOG_ALPHA_GAUSSIAN
from nvib.workflow.data import Example, load_examples
from nvib.workflow.train import (
    CHECKPOINTS,
    RUN_LOG,
    Collator,
    LambdaSchedule,
    NVCausalLMTrainer,
    build_trainer,
    finetune,
    prepare_model,
    tokenise,
)

DEMO_DATA = Path(nvib.__file__).parent / "demo_data"

BART, BERT2BERT = TINY[0], next(c for c in TINY if c.name == "bert2bert")
GPT2 = next(c for c in TINY if c.name == "gpt2")
SPECIALS = {"bart": (0, 1, 2, 3), "bert2bert": (3, 0, 4, 1), "gpt2": (2, 0, 4, 1)}  # bos, pad, eos, unk
KL_KEYS = {f"kl_{w}{kind}" for w in ("", "g_", "d_") for kind in ("encoder", "cross", "decoder")}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_tokenizer(name: str = "bart", vocab: int = 96) -> tf.PreTrainedTokenizerFast:
    """Words w0..w95 map to ids 0..95 (special tokens at the model's special ids)."""
    bos, pad, eos, unk = SPECIALS[name]
    names = {bos: "<s>", pad: "<pad>", eos: "</s>", unk: "<unk>"}
    tok = Tokenizer(models.WordLevel({names.get(i, f"w{i}"): i for i in range(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
    )
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def examples(n: int = 8, seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)

    def words(k: int) -> str:
        return " ".join(
            f"w{int(i)}" for i in torch.randint(5, 96, (int(torch.randint(2, k, (1,), generator=g)),), generator=g)
        )

    return [Example(words(10), words(6)) for _ in range(n)]


def no_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Dropout off everywhere: nn.Dropout modules and the float rates BART-style layers keep as attributes."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for key in ("dropout", "attention_dropout", "activation_dropout", "layerdrop"):
            if isinstance(getattr(module, key, None), float):
                setattr(module, key, 0.0)
    return model


def stock_model(case, dropout: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    model = case.build().eval()
    return model if dropout else no_dropout(model)


def trainer_for(model, tmp_path, name="bart", data=None, **kw):
    kw = {"max_steps": 4, "batch_size": 4, "lr": 1e-3, "progress": False, "logging_steps": 1, **kw}
    return build_trainer(model, data or examples(), tiny_tokenizer(name), output_dir=tmp_path, **kw)


def first_batch(trainer, n: int = 8):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(n)])


def task_loss(model, batch) -> float:
    with torch.no_grad():
        return float(model.eval()(**batch).loss)


# ---- λ schedules -----------------------------------------------------------------------------


def test_lambda_schedules():
    assert [LambdaSchedule()(0.5, s) for s in (0, 7, 10**6)] == [0.5, 0.5, 0.5]
    linear = LambdaSchedule("linear", steps=10)
    assert [linear(2.0, s) for s in (0, 1, 5, 10, 11, 1000)] == pytest.approx([0, 0.2, 1.0, 2.0, 2.0, 2.0])
    cyclic = LambdaSchedule("cyclic", steps=10)  # rises over the first half of each period of 10
    got = [cyclic(1.0, s) for s in (0, 2, 4, 5, 9, 10, 12, 15, 20, 23)]
    assert got == pytest.approx([0, 0.4, 0.8, 1, 1, 0, 0.4, 1, 0, 0.6])
    assert LambdaSchedule("cyclic", steps=4, ramp=1.0)(1.0, 3) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="steps"):
        LambdaSchedule("linear")
    with pytest.raises(ValueError, match="constant, linear|'constant'"):
        LambdaSchedule("cosine")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ramp"):
        LambdaSchedule("cyclic", steps=4, ramp=0)


# ---- the loss --------------------------------------------------------------------------------


@pytest.mark.parametrize("case", [BART, BERT2BERT], ids=lambda c: c.name)
def test_step0_eval_loss_is_the_stock_loss(case, tmp_path):
    stock = stock_model(case, dropout=True)
    nv = copy.deepcopy(stock)
    prior = knobs = None
    if case is BART:  # conversion with an empirical prior is still the identity
        feats, collate = tokenise(examples(), tiny_tokenizer(), "seq2seq", 64, 64), Collator(pad_id=1)
        prior = nvib.EmpiricalPrior.estimate(stock, [collate(feats[:4]), collate(feats[4:])], progress=False)
        # random weights: LayerNorm fixes ‖z‖, so ς ≈ 0 and alpha_tau does nothing; give the prior a spread ς = 1
        # as real weights have
        for stats in prior.sites.values():
            stats.norm_m2 = torch.tensor(stats.count - 1.0, dtype=torch.float64)
        knobs = nvib.NVConfig(alpha_tau_e=20, alpha_tau_c=20, alpha_tau_d=20)
    prepare_model(nv, knobs, prior=prior)
    trainer = trainer_for(nv, tmp_path, name=case.name, lambda_g=0.0, lambda_d=0.0)
    batch = first_batch(trainer)
    ref = task_loss(stock, batch)
    nv.eval()
    with torch.no_grad():
        assert abs(float(trainer.compute_loss(nv, batch)) - ref) <= 1e-5
        trainer.lambda_g = trainer.lambda_d = 1.0  # evaluation never adds KL terms
        assert abs(float(trainer.compute_loss(nv, batch)) - ref) <= 1e-5


def test_train_mode_sampling_with_zero_lambda_is_close_to_stock(tmp_path):
    stock = stock_model(BART)
    nv = prepare_model(copy.deepcopy(stock))
    trainer = trainer_for(nv, tmp_path, lambda_g=0.0, lambda_d=0.0)
    batch = first_batch(trainer)
    ref = task_loss(stock, batch)
    nv.train()
    with torch.no_grad():
        sampled = float(trainer.compute_loss(nv, batch))
        kl = nvib.kl_loss(nv, 1.0, 1.0)
    assert abs(sampled - ref) < 1e-3  # (dropout alone would move it by ~6e-3)
    assert kl > 0  # the KL terms are computed even when they do not enter the loss
    trainer.lambda_g, trainer.lambda_d = 0.1, 0.01
    with torch.no_grad():
        torch.manual_seed(1)
        with_kl = float(trainer.compute_loss(nv, batch))
        g, d = (sum(t[i] for t in nvib.kl_terms(nv).values()) for i in (0, 1))
        torch.manual_seed(1)
        trainer.lambda_g = trainer.lambda_d = 0.0
        without = float(trainer.compute_loss(nv, batch))
    assert with_kl == pytest.approx(without + 0.1 * float(g) + 0.01 * float(d), rel=1e-5)


def test_real_weights_step0_with_empirical_prior_and_finite_kl(tmp_path):
    """MiniLM bert2bert with its empirical prior: step 0 is the stock loss; the KL terms are finite and >= 0
    (real models have pseudo-counts ~e^40 and zero-variance dimensions, which once gave NaN / ±1e10)."""
    stock = no_dropout(REAL_WEIGHTS[1].build().eval())
    tok = tf.AutoTokenizer.from_pretrained(MINILM, local_files_only=True)
    data = load_examples(DEMO_DATA / "train.jsonl", limit=8)
    feats, collate = tokenise(data, tok, "seq2seq", 48, 24), Collator(pad_id=0)
    prior = nvib.EmpiricalPrior.estimate(stock, [collate(feats)], progress=False)
    nv = prepare_model(copy.deepcopy(stock), prior=prior)
    trainer = build_trainer(nv, data, tok, output_dir=tmp_path, max_source_len=48, max_target_len=24,
                            lambda_g=1e-3, lambda_d=1e-3, progress=False)  # fmt: skip
    batch = collate(feats)
    ref = task_loss(stock, batch)
    with torch.no_grad():
        assert abs(float(trainer.compute_loss(nv.eval(), batch)) - ref) <= 1e-5
    nv.train()
    loss = trainer.compute_loss(nv, batch)
    terms = torch.tensor([[float(g), float(d)] for g, d in nvib.kl_terms(nv).values()])
    assert torch.isfinite(terms).all() and (terms >= 0).all() and terms.max() < 1e3, terms
    assert float(loss) == pytest.approx(ref + 1e-3 * float(terms.sum()), abs=0.05)
    prior_var = torch.stack([layer.prior_var for layer in nvib.nv_layers(nv).values()])
    assert (prior_var < 1e-6 * prior_var.median()).any()  # the dimensions the §8 floor is for are there
    (loss + nvib.kl_loss(nv, 1.0, 1.0)).backward()  # the KL terms at full weight, through every parameter
    grads = {n: p.grad for n, p in nv.named_parameters() if p.grad is not None}
    assert len(grads) > 100 and all(torch.isfinite(g).all() for g in grads.values())
    # once training wakes the dead dimensions up (their LayerNorm gains ~1e-33 grow), 1/s0² would explode (~1e6);
    # with the floor (docs/method.md §8) KL_G stays of the size of the other terms
    with torch.no_grad():
        for gain in (nv.encoder.encoder.layer[5].output.LayerNorm.weight,):
            gain[gain.abs() < 1e-6] = 1e-2
        trainer.compute_loss(nv, batch)
    cross = [layer for layer in nvib.nv_layers(nv).values() if layer.kind == "cross"]
    assert cross and max(float(layer.kl_gaussian) for layer in cross) < 1e3
    mu, logvar, log_alpha = cross[0].drawn.posterior
    valid = batch["attention_mask"].bool()
    unfloored = kl_gaussian(mu, logvar, log_alpha, valid, cross[0].prior_mean, cross[0].prior_var,
                            cross[0].prior_log_alpha, floor=0.0)  # fmt: skip
    assert float(unfloored.mean()) > 1e4


def test_kl_dirichlet_is_accurate_for_huge_pseudo_counts():
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    log_alpha = torch.tensor([[20.0, 35.0, 41.0, 44.5], [2.0, 50.0, 58.0, 59.0]], dtype=torch.float64)
    valid = torch.ones_like(log_alpha, dtype=torch.bool)
    for a0 in (0.5, 9.0, 30.0):
        got = kl_dirichlet(log_alpha, valid, torch.tensor(a0))
        for b in range(2):
            K = 5
            A_q = mpmath.exp(a0) + sum(mpmath.exp(float(x)) for x in log_alpha[b])
            A_p = mpmath.exp(a0) + K - 1
            lg, dg = mpmath.loggamma, mpmath.digamma
            kl = lg(A_q) - lg(A_p) + (A_q - A_p) * (dg(A_q / K) - dg(A_q)) + K * (lg(A_p / K) - lg(A_q / K))
            assert float(got[b]) == pytest.approx(float(kl / K), rel=1e-9, abs=1e-9)


def test_kl_terms_of_a_padded_batch_are_the_mean_of_its_examples_alone():
    """Training batches carry the decoder's mask, so padded target positions enter no site's KL terms."""
    nv = prepare_model(stock_model(BART))
    feats, collate = tokenise(examples(4, seed=1), tiny_tokenizer(), "seq2seq", 64, 64), Collator(pad_id=1)
    assert len({len(f["labels"]) for f in feats}) > 1  # the batch pads its targets
    batch = collate(feats)
    assert torch.equal(batch["decoder_attention_mask"].bool(), batch["labels"] != -100)

    def terms(batch) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        with torch.no_grad():
            nv.train()(**batch)
        return {site: torch.stack(gd).double() for site, gd in nvib.kl_terms(nv).items()}

    padded, alone = terms(batch), [terms(collate([f])) for f in feats]
    for site, got in padded.items():
        mean = sum(t[site] for t in alone) / len(alone)
        assert torch.allclose(got, mean, rtol=1e-6), site


def test_gradients_flow_through_gamma_sampling_into_alpha(tmp_path):
    """λ = 0: the task loss alone reaches alpha_* through the reparameterised Gamma draws of π."""
    knobs = nvib.NVConfig(alpha_tau_e=-5, alpha_tau_c=-5, alpha_tau_d=-5, stdev_tau_e=0.1, stdev_tau_c=0.1)
    nv = prepare_model(stock_model(BART), knobs)
    trainer = trainer_for(nv, tmp_path, lambda_g=0.0, lambda_d=0.0)
    nv.train()
    trainer.compute_loss(nv, first_batch(trainer)).backward()
    for site, layer in nvib.nv_layers(nv).items():
        log_alpha = layer.drawn.posterior[2]
        assert log_alpha.max() < LOG_ALPHA_GAUSSIAN, site  # the Gamma sampler, not its normal approximation
        for name in ("alpha_w1", "alpha_w2", "alpha_bias"):
            grad = getattr(layer, name).grad
            assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, (site, name)


def test_kl_is_scaled_consistently_under_gradient_accumulation(tmp_path):
    """One SGD step on 4 examples = two accumulated steps on 2 + 2 (task loss and KL alike)."""
    data = [
        Example(" ".join(f"w{5 + (7 * i + j) % 90}" for j in range(6)), f"w{10 + i} w{20 + i} w9") for i in range(4)
    ]
    quiet = nvib.NVConfig(alpha_tau_e=100, alpha_tau_c=100, alpha_tau_d=100)  # sampling noise ~ e^-50
    updates = []
    for batch_size, accumulate in ((4, 1), (2, 2)):
        nv = prepare_model(stock_model(BART), quiet)
        start = {k: v.clone() for k, v in nv.named_parameters()}
        trainer = trainer_for(
            nv, tmp_path / str(batch_size), data=data, max_steps=1, batch_size=batch_size, lambda_g=0.05,
            lambda_d=0.05, gradient_accumulation_steps=accumulate, optim="sgd", max_grad_norm=0.0, lr=1.0,
            lr_scheduler="constant", save_strategy="no",
        )  # fmt: skip
        trainer.train()
        updates.append({k: (v.detach() - start[k]) for k, v in nv.named_parameters()})
    for key, delta in updates[0].items():
        assert torch.allclose(delta, updates[1][key], rtol=1e-3, atol=1e-5), key


def _grads(model, loss) -> dict[str, torch.Tensor]:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    got = torch.autograd.grad(loss, list(params.values()), retain_graph=True, allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), got, strict=True)}


def _clipped(grads: dict[str, torch.Tensor], max_norm: float) -> dict[str, torch.Tensor]:
    norm = torch.stack([g.norm() for g in grads.values()]).norm()
    return {n: g * min(1.0, max_norm / (float(norm) + 1e-6)) for n, g in grads.items()}


@pytest.mark.parametrize("kl_clip", ["separate", "joint"])
def test_kl_clip_clips_task_and_kl_gradients_as_asked(kl_clip, tmp_path):
    """One SGD step (lr 1) moves every parameter by clip(g_task) + clip(g_KL) (separate) or clip(g_task + g_KL)."""
    quiet = nvib.NVConfig(alpha_tau_e=100, alpha_tau_c=100, alpha_tau_d=100)  # sampling noise ~ e^-50
    nv = prepare_model(stock_model(BART), quiet)
    reference = copy.deepcopy(nv).train()
    trainer = trainer_for(nv, tmp_path, max_steps=1, batch_size=8, lambda_g=0.5, lambda_d=0.5, optim="sgd", lr=1.0,
                          lr_scheduler="constant", max_grad_norm=0.05, save_strategy="no", kl_clip=kl_clip)  # fmt: skip
    batch = first_batch(trainer)
    task = reference(**batch).loss
    penalty = nvib.kl_loss(reference, 0.5, 0.5)
    g_task, g_kl = _grads(reference, task), _grads(reference, penalty)
    assert torch.stack([g.norm() for g in g_kl.values()]).norm() > 0.05  # both parts are clipped
    if kl_clip == "separate":
        task_part, kl_part = _clipped(g_task, 0.05), _clipped(g_kl, 0.05)
        expected = {n: task_part[n] + kl_part[n] for n in g_task}
    else:
        expected = _clipped({n: g_task[n] + g_kl[n] for n in g_task}, 0.05)
    start = {n: p.detach().clone() for n, p in nv.named_parameters()}
    trainer.train()
    moved = {n: start[n] - p.detach() for n, p in nv.named_parameters()}
    scale = max(float(g.abs().max()) for g in expected.values())
    for name, step in moved.items():
        assert torch.allclose(step, expected[name], atol=1e-4 * scale, rtol=1e-3), name
    log = [e for e in trainer.state.log_history if "loss" in e]
    assert ("kl_grad_norm" in log[0]) == (kl_clip == "separate")
    with pytest.raises(ValueError, match="kl_clip"):
        trainer_for(nv, tmp_path, kl_clip="both")


def test_w_sigma_receives_the_task_gradient_once_tokens_have_a_variance(tmp_path):
    """λ = 0: the task loss reaches W_σ through z̃ = μ + σε, so with σ ≈ 1e-6 (τ_σ = 0) it barely does; from
    τ_σ = 0.1 (what per_token_variance=True starts from) the gradient is ~1e5 larger and training moves σ²."""
    norms = {}
    for tau in (0.0, 0.1):
        nv = prepare_model(stock_model(BART), nvib.NVConfig(stdev_tau_e=tau, stdev_tau_c=tau, stdev_tau_d=tau),
                           per_token_variance=True, start_stdev_tau=0.0)  # fmt: skip
        trainer = trainer_for(nv, tmp_path / str(tau), lambda_g=0.0, lambda_d=0.0)
        torch.manual_seed(0)
        trainer.compute_loss(nv.train(), first_batch(trainer)).backward()
        grads = [layer.logvar_weight.grad for layer in nvib.nv_layers(nv).values()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        norms[tau] = float(torch.stack([g.norm() for g in grads]).norm())
    assert norms[0.1] > 1e4 * norms[0.0] and norms[0.1] > 1e-4, norms
    # training from the default start (per_token_variance=True: τ_σ = START_STDEV_TAU) moves log σ² per token
    nv = prepare_model(stock_model(BART), per_token_variance=True)
    assert nv.nv_config.stdev_tau("encoder") == 0.1
    layer = next(iter(nvib.nv_layers(nv).values()))
    z = torch.randn(5, layer.dim, generator=torch.Generator().manual_seed(0))
    before = layer.posterior(z)[1].detach().clone()
    trainer_for(nv, tmp_path / "train", lambda_g=0.0, lambda_d=0.0, max_steps=20, lr=1e-2, save_strategy="no").train()
    after = layer.posterior(z)[1].detach()
    moved = (after - before) - (after - before).mean(0)  # the per-token part (W_σ z), not the shared bias
    assert moved.abs().max() > 1e-3, float(moved.abs().max())


# ---- training runs ---------------------------------------------------------------------------


def test_finetune_reduces_loss_logs_kl_and_round_trips(tmp_path):
    data = examples(8) * 2
    model = stock_model(BART)
    tok = tiny_tokenizer()
    probe = trainer_for(prepare_model(copy.deepcopy(model)), tmp_path / "probe")
    batch = first_batch(probe)
    before = task_loss(model, batch)
    schedule = LambdaSchedule("linear", steps=10)
    out = tmp_path / "run"
    tuned = finetune(
        model, data, tok, output_dir=out, nv_config=nvib.NVConfig(stdev_tau_e=0.1, stdev_tau_c=0.1, stdev_tau_d=0.1),
        lambda_g=1e-3, lambda_d=1e-3, schedule=schedule, max_steps=20,
        batch_size=8, lr=3e-3, seed=0, max_source_len=16, max_target_len=8, logging_steps=5, save_steps=10,
        progress=False,
    )  # fmt: skip
    assert tuned is model and nvib.is_converted(model) and not model.training
    assert task_loss(model, batch) < before - 0.2
    for site, layer in nvib.nv_layers(model).items():  # training gave the tokens their own variances
        assert layer.logvar_weight.abs().max() > 0, site
    assert all(site.module._nv_slot.spare > 0 for site in model.__dict__["_nv_sites"])  # evaluated by docs/method.md §4
    log = json.loads((out / RUN_LOG).read_text())
    train_logs = [entry for entry in log if "loss" in entry]
    assert len(train_logs) == 4
    for entry in train_logs:
        assert KL_KEYS <= set(entry) and {"lambda_g", "lambda_d", "task_loss"} <= set(entry)
        assert entry["lambda_g"] == pytest.approx(schedule(1e-3, entry["step"]))
        assert entry["kl_encoder"] == pytest.approx(entry["kl_g_encoder"] + entry["kl_d_encoder"], rel=1e-5)
    assert (out / CHECKPOINTS / "checkpoint-20").is_dir()
    loaded = nvib.load(out)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    inputs["decoder_input_ids"] = batch["labels"].clamp(min=0)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)
    assert tf.AutoTokenizer.from_pretrained(out)("w5 w6")["input_ids"] == tok("w5 w6")["input_ids"]


@pytest.mark.parametrize("train_nv", [True, False])
def test_freezing_really_freezes(tmp_path, train_nv):
    nv = prepare_model(stock_model(BART), train_nv=train_nv, train_pretrained=not train_nv)
    nv_names = {f"nvib_layers.{k}" for k, _ in nv.nvib_layers.named_parameters()}
    start = {k: v.detach().clone() for k, v in nv.named_parameters()}
    for name, param in nv.named_parameters():
        assert param.requires_grad == ((name in nv_names) == train_nv), name
    trainer_for(nv, tmp_path, save_strategy="no", lambda_g=0.1, lambda_d=0.1).train()
    for name, param in nv.named_parameters():
        trains = (name in nv_names) == train_nv
        if not trains:
            assert torch.equal(param, start[name]), name
    changed = [n for n, p in nv.named_parameters() if not torch.equal(p, start[n])]
    assert changed and all(((n in nv_names) == train_nv) for n in changed)
    with pytest.raises(ValueError, match="nothing to train"):
        prepare_model(nv, train_nv=False, train_pretrained=False)


def test_nv_lr_applies_to_the_nv_parameters_only(tmp_path):
    nv = prepare_model(stock_model(BART))
    trainer = trainer_for(nv, tmp_path, lr=1e-3, nv_lr=5e-2, lr_scheduler="constant", save_strategy="no",
                          max_steps=1, optim="sgd", max_grad_norm=0.0, lambda_g=0.1, lambda_d=0.1)  # fmt: skip
    start = {k: v.detach().clone() for k, v in nv.named_parameters()}
    trainer.train()
    nv_ids = {id(p) for p in nv.nvib_layers.parameters()}
    lrs = {(id(p) in nv_ids): g["lr"] for g in trainer.optimizer.param_groups for p in g["params"]}
    assert lrs == {True: 5e-2, False: 1e-3}
    for name, param in nv.named_parameters():  # plain SGD: the step is lr × gradient
        if param.grad is not None and param.grad.abs().max() > 0:
            lr = 5e-2 if id(param) in nv_ids else 1e-3
            assert torch.allclose(start[name] - param.detach(), lr * param.grad, rtol=1e-4, atol=1e-9), name
    with pytest.raises(ValueError, match="nv_lr"):
        trainer_for(nv, tmp_path, nv_lr=0.0)


def test_per_token_variance_follows_the_starting_knobs():
    """Default: W_σ only when the tokens start with a variance (from σ² = 1e-12 training cannot grow it)."""

    def has_variances(model) -> bool:
        flags = {layer.per_token_variance for layer in nvib.nv_layers(model).values()}
        assert len(flags) == 1 and flags == {site.module._nv_slot.spare > 0 for site in model.__dict__["_nv_sites"]}
        return flags.pop()

    assert not has_variances(prepare_model(stock_model(BART)))
    assert has_variances(prepare_model(stock_model(BART), per_token_variance=True))
    blurred = prepare_model(stock_model(BART), nvib.NVConfig(stdev_tau_c=0.1))
    assert has_variances(blurred)
    assert has_variances(prepare_model(blurred, nvib.NVConfig()))  # a model with W_σ keeps it
    with pytest.raises(ValueError, match="per-token variances"):
        prepare_model(blurred, per_token_variance=False)


class _Interrupt(tf.TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            raise KeyboardInterrupt


def test_interrupted_run_resumes_from_its_checkpoint(tmp_path):
    kw = {"max_steps": 4, "batch_size": 4, "lr": 1e-3, "save_steps": 2, "progress": False, "lambda_g": 0.01}
    data, tok = examples(8), tiny_tokenizer()
    straight = finetune(stock_model(BART, dropout=True), data, tok, output_dir=tmp_path / "a", **kw)
    with pytest.raises(KeyboardInterrupt):
        finetune(
            stock_model(BART, dropout=True),
            data,
            tok,
            output_dir=tmp_path / "b",
            callbacks=[_Interrupt()],
            **kw,
        )
    assert (tmp_path / "b" / CHECKPOINTS / "checkpoint-2").is_dir()
    with pytest.raises(ValueError, match="different settings.*lr"):
        finetune(stock_model(BART), data, tok, output_dir=tmp_path / "b", **{**kw, "lr": 2e-3})
    other = stock_model(BART)
    with torch.no_grad():
        next(other.parameters()).add_(1.0)  # another model of the same architecture
    with pytest.raises(ValueError, match="different settings.*model"):
        finetune(other, data, tok, output_dir=tmp_path / "b", **kw)
    with pytest.raises(ValueError, match=r"different settings \(data"):
        finetune(stock_model(BART), examples(8)[::-1], tok, output_dir=tmp_path / "b", **kw)
    resumed = finetune(stock_model(BART, dropout=True), data, tok, output_dir=tmp_path / "b", **kw)
    log = json.loads((tmp_path / "b" / RUN_LOG).read_text())
    assert max(entry["step"] for entry in log) == 4
    expected = dict(straight.named_parameters())
    for name, param in resumed.named_parameters():
        assert torch.allclose(param, expected[name], atol=1e-6), name


@pytest.mark.parametrize("case", [BERT2BERT, GPT2], ids=lambda c: c.name)
def test_other_architectures_train(case, tmp_path):
    model = stock_model(case)
    finetune(model, examples(4), tiny_tokenizer(case.name), output_dir=tmp_path, max_steps=2, batch_size=2,
             lr=1e-3, logging_steps=1, progress=False)  # fmt: skip
    kinds = {layer.kind for layer in nvib.nv_layers(model).values()}
    log = [e for e in json.loads((tmp_path / RUN_LOG).read_text()) if "loss" in e]
    assert {f"kl_{kind}" for kind in kinds} <= set(log[0])
    assert all(k[3:] in kinds or k[5:] in kinds for k in log[0] if k.startswith("kl_") and k != "kl_grad_norm")


def tiny_llama() -> tf.LlamaForCausalLM:
    """Rotary, grouped-query attention: converted in key space (docs/method.md §10)."""
    bos, pad, eos, _ = SPECIALS["gpt2"]
    config = tf.LlamaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, intermediate_size=64, pad_token_id=pad, bos_token_id=bos,
                            eos_token_id=eos)  # fmt: skip
    return tf.LlamaForCausalLM(config)


@pytest.mark.parametrize(("build", "layer_class"), [(GPT2.build, "NVIBLayer"), (tiny_llama, "KeySpaceLayer")],
                         ids=["gpt2", "llama"])  # fmt: skip
def test_causal_lm_trains_with_the_plain_trainer_on_target_tokens_only(build, layer_class, tmp_path):
    """Causal LMs get an NVCausalLMTrainer (HF Trainer, not Seq2SeqTrainer) over prompt + target sequences whose
    loss is the cross-entropy of the target tokens (and EOS) alone; fine-tuning lowers it. GPT-2 is converted
    in z space, Llama in key space."""
    torch.manual_seed(0)
    stock = no_dropout(build().eval())
    data = examples(8)
    nv = prepare_model(copy.deepcopy(stock))
    assert {type(layer).__name__ for layer in nvib.nv_layers(nv).values()} == {layer_class}
    trainer = trainer_for(nv, tmp_path / "probe", name="gpt2", data=data)
    assert isinstance(trainer, NVCausalLMTrainer) and not isinstance(trainer, tf.Seq2SeqTrainer)
    assert type(trainer.args) is tf.TrainingArguments
    batch = first_batch(trainer)
    tok = tiny_tokenizer("gpt2")
    for row, ex in enumerate(data):  # labels: -100 on the prompt, the target's ids and EOS after it
        prompt = len(tok(ex.source + "\n")["input_ids"])
        target = tok(ex.target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        labels = batch["labels"][row]
        assert (labels[:prompt] == -100).all() and labels[prompt : prompt + len(target)].tolist() == target
    with torch.no_grad():
        logits = stock(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        shifted, targets = logits[:, :-1], batch["labels"][:, 1:]
        keep = targets != -100
        direct = torch.nn.functional.cross_entropy(shifted[keep], targets[keep])
        assert float(trainer.compute_loss(nv.eval(), batch)) == pytest.approx(float(direct), abs=1e-4)
    model = copy.deepcopy(stock)
    finetune(model, data * 4, tok, output_dir=tmp_path / "run", max_steps=12, batch_size=8, lr=3e-3,
             lambda_g=1e-3, lambda_d=1e-3, logging_steps=4, progress=False, save_strategy="no")  # fmt: skip
    with torch.no_grad():
        assert float(model(**batch).loss) < float(direct) - 0.2
    log = [e for e in json.loads((tmp_path / "run" / RUN_LOG).read_text()) if "loss" in e]
    assert {"kl_decoder", "task_loss", "kl_grad_norm"} <= set(log[0])
    with torch.no_grad():
        assert float(nvib.load(tmp_path / "run")(**batch).loss) == pytest.approx(float(model(**batch).loss), abs=1e-6)


def test_bad_arguments():
    model = stock_model(BART)
    with pytest.raises(ValueError, match="lambda_g"):
        finetune(model, examples(2), tiny_tokenizer(), output_dir="unused", lambda_g=-1)
    with pytest.raises(ValueError, match="no training examples"):
        finetune(model, [], tiny_tokenizer(), output_dir="unused")
    with pytest.raises(ValueError, match="encoder-only"):
        config = tf.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=4)
        nv = prepare_model(tf.BertForMaskedLM(config))
        build_trainer(nv, examples(2), tiny_tokenizer(), output_dir="unused")
    with pytest.raises(ValueError, match="already an NV model"):
        prepare_model(prepare_model(stock_model(BART)), prior=nvib.EmpiricalPrior({}, {}))


# ---- command line ----------------------------------------------------------------------------


@pytest.fixture
def cli():
    return lambda *args: CliRunner().invoke(app, ["finetune", *map(str, args)])


def test_cli_help_and_errors(cli, tmp_path):
    result = cli("--help")
    assert result.exit_code == 0
    options = ("--lambda-g", "--lambda-d", "--schedule", "--schedule-steps", "--freeze-nv",
               "--freeze-pretrained", "--max-steps", "--batch-size", "--lr", "--seed", "--source-column",
               "--target-column", "--output-dir", "--prior", "--knobs", "--resume", "--kl-clip", "--max-grad-norm",
               "--start-stdev-tau")  # fmt: skip
    for option in options:
        assert option in result.output, option
    train = tmp_path / "train.jsonl"
    train.write_text('{"source": "w5 w6", "target": "w7"}\n')
    bad = [
        ((tmp_path / "nomodel", train, "-o", tmp_path / "o"), "no model"),
        ((tmp_path, tmp_path / "missing.jsonl", "-o", tmp_path / "o"), "file not found"),
        ((tmp_path, train, "-o", tmp_path / "o", "--schedule", "cosine"), "constant, linear or cyclic"),
        ((tmp_path, train, "-o", tmp_path / "o", "--kl-clip", "both"), "separate or joint"),
        ((tmp_path, train, "-o", tmp_path / "o", "--schedule", "linear"), "steps"),
        ((tmp_path, train, "-o", tmp_path / "o", "--freeze-nv", "--freeze-pretrained"), "nothing to train"),
    ]
    for args, message in bad:
        result = cli(*args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and "Traceback" not in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1, result.output


def test_cli_trains_and_saves(cli, tmp_path):
    model_dir = tmp_path / "model"
    stock_model(BART).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"doc": e.source, "sum": e.target}) + "\n" for e in examples(6)))
    out = tmp_path / "out"
    args = (model_dir, train, "-o", out, "--source-column", "doc", "--target-column", "sum", "--max-steps", 2,
            "--batch-size", 3, "--lambda-g", 0.01, "--schedule", "cyclic", "--schedule-steps", 2,
            "--freeze-nv", "--no-progress")  # fmt: skip
    result = cli(*args)
    assert result.exit_code == 0, result.output
    tuned = nvib.load(out)
    for name, param in tuned.nvib_layers.named_parameters():  # frozen NV layers: still the identity init
        fresh = prepare_model(stock_model(BART)).nvib_layers.get_parameter(name)
        assert torch.equal(param, fresh), name
    result = cli(out, train, "-o", tmp_path / "again", "--source-column", "doc", "--target-column", "sum",
                 "--max-steps", 1, "--no-progress", "--per-token-variance")  # fmt: skip
    assert result.exit_code == 0, result.output  # an NV model directory fine-tunes further
    assert all(layer.per_token_variance for layer in nvib.nv_layers(nvib.load(tmp_path / "again")).values())
    result = cli(tmp_path / "again", train, "-o", tmp_path / "shared", "--source-column", "doc", "--target-column",
                 "sum", "--max-steps", 1, "--no-progress", "--shared-variance")  # fmt: skip
    assert result.exit_code == 2 and "per-token variances" in result.output  # it has W_σ: a clear error
