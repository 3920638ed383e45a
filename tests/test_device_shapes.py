"""NV attention off the CPU calls `scaled_dot_product_attention` only in shapes a fused CUDA backend takes (issue 25).

`kernels.FORCE_DEVICE = "cuda"` runs CPU tensors through the GPU code path (no CPU split path, padded heads); every
call is recorded and checked, and the padded path must compute what the CPU path computes."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from cases import ROTARY, TINY
from test_equivalence import generate, output
from torch.utils._python_dispatch import TorchDispatchMode

import nvib
from nvib.core import kernels

BY_NAME = {case.name: case for case in TINY + ROTARY}
NAMES = ["bart", "t5", "gpt2", "bert2bert", "llama", "qwen3", "gemma3_text"]
KNOBS = nvib.NVConfig(
    alpha_tau_e=0.0, alpha_tau_c=0.0, alpha_tau_d=0.0, stdev_tau_e=0.3, stdev_tau_c=0.3, stdev_tau_d=0.3
)


@pytest.fixture
def sdpa_calls(monkeypatch):
    """Every `F.scaled_dot_product_attention` call made while the CUDA rules are forced: (q, k, v, mask, kwargs)."""
    calls = []
    original = F.scaled_dot_product_attention

    def recording(query, key, value, attn_mask=None, **kwargs):
        if kernels.FORCE_DEVICE == "cuda":
            calls.append((query, key, value, attn_mask, kwargs))
        return original(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    return calls


def nv_model(name: str, dtype: torch.dtype) -> torch.nn.Module:
    case = BY_NAME[name]
    torch.manual_seed(0)
    model = case.build().eval()
    prior = nvib.EmpiricalPrior.estimate(model, [case.inputs(seed=s) for s in range(2)], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = nvib.convert(model, KNOBS, prior=prior).to(dtype)
    model.generation_config.pad_token_id = case.pad
    return model


def check_fused_shapes(calls) -> None:
    assert calls, "the CUDA path made no SDPA call"
    for query, key, value, mask, kwargs in calls:
        for t in (query, key, value):
            assert t.shape[-1] % kernels.ALIGN == 0 and t.stride(-1) == 1, t.shape
        assert key.shape[1] == query.shape[1] and not kwargs.get("enable_gqa", False)
        assert kwargs.get("scale") is not None  # explicit: the default would read the padded head size
        if mask is not None:
            assert mask.dim() == 4 and mask.dtype in (torch.bool, query.dtype) and mask.stride(-1) == 1
            full = (*query.shape[:3], key.shape[2])
            assert all(got in (1, want) for got, want in zip(mask.shape, full, strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_cuda_path_passes_fused_shapes_and_computes_the_same(name, dtype, sdpa_calls, monkeypatch) -> None:
    case = BY_NAME[name]
    model = nv_model(name, dtype)
    inputs = case.inputs()
    ref = output(model, inputs)
    gen = {} if case.kind == "encoder" else {b: generate(model, inputs, num_beams=b) for b in (1, 3)}
    monkeypatch.setattr(kernels, "FORCE_DEVICE", "cuda")
    got = output(model, inputs)
    for beams, expected in gen.items():
        padded = generate(model, inputs, num_beams=beams)
        if dtype == torch.float32:
            assert torch.equal(padded, expected), beams
    check_fused_shapes(sdpa_calls)
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("name", ["bart", "t5", "gpt2"])
def test_converted_on_a_gpu_the_heads_are_aligned_and_nothing_is_padded_per_call(name, sdpa_calls, monkeypatch):
    """Converted on a GPU, z-space heads carry E+1 channels rounded up to `kernels.ALIGN` (zero channels), so the
    cache holds that width and no SDPA call pads q, k or v; outputs and greedy tokens equal a CPU conversion's."""
    case = BY_NAME[name]
    inputs = case.inputs()
    cpu_model = nv_model(name, torch.float32)
    monkeypatch.setattr(kernels, "FORCE_DEVICE", "cuda")
    aligned = nv_model(name, torch.float32)
    widths = _widths(aligned)
    assert all(w % kernels.ALIGN == 0 for w in widths) and widths != _widths(cpu_model)
    torch.testing.assert_close(output(aligned, inputs), output(cpu_model, inputs), rtol=1e-5, atol=1e-5)
    if case.kind != "encoder":
        assert torch.equal(generate(aligned, inputs, num_beams=1), generate(cpu_model, inputs, num_beams=1))
    sdpa_calls.clear()
    output(aligned, inputs)
    assert sdpa_calls and all(q.shape[-1] in widths and k.shape[-1] in widths for q, k, *_ in sdpa_calls)


def _widths(model) -> set[int]:
    return {m._nv_slot.width for m in model.modules() if "_nv_slot" in m.__dict__}


class BigTensors(TorchDispatchMode):
    """Counts the op outputs with at least `limit` elements (the size of a [B, H, Q, K] score tensor)."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit, self.count = limit, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.count += sum(t.numel() >= self.limit for t in torch.utils._pytree.tree_leaves(out) if torch.is_tensor(t))
        return out


@pytest.mark.parametrize("name", ["bart", "bert2bert", "llama", "qwen3"])
def test_no_score_sized_tensor_of_its_own(name, monkeypatch) -> None:
    """Peak memory: in the fast form the NV model makes no more [B, H, Q, K]-sized tensors than the stock one."""
    case = BY_NAME[name]
    model = nv_model(name, torch.float32)
    stock = nvib.unload(copy.deepcopy(model))
    inputs = case.inputs(batch=4, src=60, tgt=60)
    limit = 4 * 2 * 60 * 60  # B·G·Q·K with the 2 key/value heads of the rotary cases (4 query heads elsewhere)
    monkeypatch.setattr(kernels, "FORCE_DEVICE", "cuda")
    counts = []
    for m in (stock, model):
        with torch.no_grad(), BigTensors(limit) as mode:
            m(**inputs)
        counts.append(mode.count)
    assert counts[1] <= counts[0], counts


def test_device_benchmark_script_runs(tmp_path) -> None:
    """benchmarks/device.py (run by benchmarks/device.sh on a GPU) on tiny shapes on the CPU: equivalence holds."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "device.py"
    spec = importlib.util.spec_from_file_location("device_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--smoke", "--device", "cpu", "--out", str(tmp_path)])
    results = __import__("json").loads((tmp_path / "device.json").read_text())["results"]
    assert len(results) == 2 and all(r["equivalence_same_greedy"] for r in results)
    assert all(r["equivalence_max_abs_logit_diff"] <= 1e-4 for r in results)
    assert "| bart-tiny |" in (tmp_path / "device.md").read_text()
