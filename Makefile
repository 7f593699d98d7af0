# neutrowatch — the README's set-up commands are `make demo` and `make test`; both install first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
ENGINE := tests/fhir_server
PROFILES := fhir_profiles
STAMP  := $(VENV)/.installed
# `make chaos SEED=7 FAULTS=800` for a longer soak with another seed (CI runs seed 20261122, >= 200 faults)
SEED   ?= 7
FAULTS ?= 800

.PHONY: install lint demo test test-unit bench chart-check image-test ha-test chaos soak profiles profiles-check clean

install: $(STAMP)

$(STAMP): pyproject.toml $(wildcard $(ENGINE)/package-lock.json) $(wildcard $(PROFILES)/package-lock.json)
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (3.11+)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,lint]'
	@if [ -f $(ENGINE)/package-lock.json ]; then \
	  command -v npm >/dev/null || { echo "need Node.js 20+ and npm for the test FHIR engine"; exit 1; }; \
	  npm ci --prefix $(ENGINE) --no-audit --no-fund --loglevel=error; \
	  npm ci --prefix $(PROFILES) --no-audit --no-fund --loglevel=error; \
	fi
	touch $@

# the gates CI runs before the tests: lint (line length 110, complexity 12), format, types
LINTED := service tests bench scripts fhir_profiles/tools
lint: install
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/mypy

demo: install
	$(BIN)/python scripts/demo.py

test: install
	$(BIN)/python -m pytest

test-unit: install
	$(BIN)/python -m pytest tests/unit

# helm lint/template of helm/neutrowatch validated with kubernetes-validate (Helm from npm, offline)
chart-check: install
	bash scripts/chart_check.sh

# build the Dockerfile with podman on a debootstrapped base and run it (installs podman if missing)
image-test: install
	bash scripts/image_test.sh

# two replicas on PostgreSQL, kill -9 of the leader, takeover and replay-exact alerts
ha-test: install
	$(BIN)/python -m pytest -v tests/integration/test_ha.py tests/integration/test_store.py

# the fault campaign's CI form (seed 20261122, >= 200 faults, SQLite), the slow-server and
# truncated-temperature cases, and the proxy's own tests; prints the campaign summary
chaos: install
	$(BIN)/python -m pytest -v -s tests/chaos

# a longer campaign with another seed, on PostgreSQL too (summary printed; non-zero exit on any loss)
soak: install
	$(BIN)/python -m tests.chaos.campaign --seed $(SEED) --faults $(FAULTS)
	$(BIN)/python -m tests.chaos.campaign --seed $(SEED) --faults $(FAULTS) --store postgres

# FSH -> StructureDefinitions, CodeSystems, ValueSets in fhir_profiles/generated/ (offline SUSHI)
profiles: install
	bash $(PROFILES)/build.sh

profiles-check: install
	bash $(PROFILES)/build.sh --check

bench: install
	$(BIN)/python bench/replay_bench.py --write docs/benchmarks.md
	$(BIN)/python bench/live_bench.py --write docs/benchmarks.md
	$(BIN)/python bench/clinical_quality.py --write docs/clinical-quality.md
	$(BIN)/python bench/store_bench.py --write docs/benchmarks.md
	$(BIN)/python bench/backlog_bench.py --write docs/benchmarks.md
	$(BIN)/python bench/memory_bench.py --write docs/benchmarks.md

clean:
	rm -rf $(VENV) $(ENGINE)/node_modules $(PROFILES)/node_modules tools/helm/node_modules build .demo .pytest_cache .hypothesis
