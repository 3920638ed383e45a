"""The paper's recipes (recipes/*.yaml, issue 22 §4), each run as it is with the model replaced by a tiny random
model of the same family and every dataset by a local stand-in of the hub's layout (a folder whose README declares
the same configs and splits, rows with the same columns); and model paths given as hub ids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from runs import DEMO_DATA, save_tiny_model, write_config
from test_cli import invoke

from nvib.workflow.models import model_location
from nvib.workflow.settings import ConfigError, RunConfig

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))
FAMILY = {"bart": "seq2seq", "opus-mt": "marian"}  # a model id names its family


def _rows(n: int = 12) -> list[dict]:
    return [json.loads(line) for line in (DEMO_DATA / "dev.jsonl").read_text().splitlines()[:n]]


def _stand_in_row(entry: dict, row: dict) -> dict:
    if "translation" in entry:
        src, tgt = entry["translation"]
        return {"translation": {src: row["source"], tgt: row["target"]}}
    return {entry["source"]: row["source"], entry["target"]: row["target"]}


def _stand_ins(config: dict, root: Path) -> None:
    """Replace each dataset by a local folder of its configs and splits, each local file by a file of the columns
    the recipe's README asks for; both hold rows of the toy data (demo_data/)."""
    data = config["data"]
    entries = [(data, k) for k in ("train", "dev")] + [(data["test"], k) for k in data["test"]]
    datasets: dict[str, dict[tuple[str | None, str], dict]] = {}
    for parent, key in entries:
        entry = parent[key]
        if isinstance(entry, dict):
            datasets.setdefault(entry["dataset"], {})[(entry.get("config"), entry["split"])] = entry
        else:  # summarisation files hold {"document", "summary"}, translation files {"source", "target"}
            path = root / "files" / entry
            path.parent.mkdir(parents=True, exist_ok=True)
            names = ("document", "summary") if config["task"] == "summarisation" else ("source", "target")
            path.write_text("".join(json.dumps(dict(zip(names, (r["source"], r["target"]), strict=True))) + "\n"
                                    for r in _rows()))  # fmt: skip
            parent[key] = str(path)
    for name, splits in datasets.items():
        folder = root / name.replace("/", "__")
        configs: dict[str | None, list[dict]] = {}
        for (conf, split), entry in splits.items():
            file = folder / (conf or "default") / f"{split}.jsonl"
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_text("".join(json.dumps(_stand_in_row(entry, r)) + "\n" for r in _rows()))
            configs.setdefault(conf, []).append({"split": split, "path": str(file.relative_to(folder))})
        card = {"configs": [{"config_name": c or "default", "data_files": f} for c, f in configs.items()]}
        (folder / "README.md").write_text(f"---\n{yaml.safe_dump(card)}---\n")
        for parent, key in entries:
            if isinstance(parent[key], dict) and parent[key].get("dataset") == name:
                parent[key] = {**parent[key], "dataset": str(folder)}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_runs_on_a_tiny_model_of_its_family(recipe: Path, tmp_path: Path) -> None:
    config = yaml.safe_load(recipe.read_text())
    RunConfig.from_dict(config, recipe.parent, str(recipe))  # valid as shipped
    family = next(f for f in FAMILY if f in config["model"]["path"].lower())
    config["model"] = {"path": str(save_tiny_model(tmp_path / "model", FAMILY[family]))}
    _stand_ins(config, tmp_path / "data")
    config["data"].update(train_limit=8, dev_limit=8, test_limit=4, max_source_len=32, max_target_len=12)
    config["generation"].update(max_new_tokens=4, batch_size=4)
    config["search"].update(n_trials=2, slices=[4, 8], n_startup_trials=1)
    config["evaluation"] = {"bootstrap": 20}
    path = write_config(tmp_path / recipe.name, config)
    result = invoke("run", path, "--run-dir", tmp_path / "out", "--no-progress")
    assert result.exit_code == 0, result.output
    scores = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert set(scores["results"]["nv_tuned"]) == set(yaml.safe_load(recipe.read_text())["data"]["test"])
    assert scores["equivalence_identical"]


def test_hub_ids_and_local_paths(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "org" / "model").mkdir(parents=True)
    assert model_location("org/model", tmp_path) == tmp_path / "org" / "model"  # a local folder wins
    assert model_location("facebook/bart-large-xsum", tmp_path) == "facebook/bart-large-xsum"
    assert model_location("./facebook/bart", tmp_path) == tmp_path / "facebook" / "bart"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = yaml.safe_load(RECIPES[0].read_text())
    config["model"]["path"] = "nvib-tests/no-such-model"
    result = invoke("run", write_config(tmp_path / "r.yaml", config), "--run-dir", tmp_path / "out", "--no-progress")
    assert result.exit_code != 0 and "nvib-tests/no-such-model" in result.output and "HF_HUB_OFFLINE" in result.output
    assert "Traceback" not in result.output


def test_model_device(tmp_path: Path) -> None:
    from nvib.workflow.models import device

    assert device("cpu") == torch.device("cpu")
    assert device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    config = yaml.safe_load(RECIPES[0].read_text())
    config["model"]["device"] = "gpu0"
    with pytest.raises(ConfigError, match="'gpu0' is not a torch device"):
        RunConfig.from_dict(config)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            device("cuda")
