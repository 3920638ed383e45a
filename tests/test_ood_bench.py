"""The fine-tuning benchmark's λ selection (benchmarks/ood/finetune_nvib.py): dev data only, in-domain slack."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks" / "ood"))
from finetune_nvib import IN_DOMAIN_SLACK, choose_lambda  # noqa: E402


def dev(debian: float, ood: float) -> dict[str, float]:
    return {"debian": debian, "docstrings": ood, "wikipara": ood + 0.1, "wiki": ood - 0.1}


def test_choose_lambda_best_out_of_domain_within_the_in_domain_slack():
    nll = {0.0: dev(3.0, 5.0), 0.001: dev(3.0, 4.9), 0.01: dev(3.0 + IN_DOMAIN_SLACK / 2, 4.8), 0.1: dev(3.5, 4.0)}
    assert choose_lambda(nll) == 0.01  # 0.1 is best out of domain but loses too much in domain


def test_choose_lambda_smallest_when_every_lambda_loses_in_domain():
    nll = {0.0: dev(3.0, 5.0), 0.01: dev(3.1, 4.0), 0.1: dev(3.2, 3.9)}
    assert choose_lambda(nll) == 0.01
