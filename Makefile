# Everything runs from a virtualenv in the checkout; `make setup` builds it once and
# rebuilds only when a requirements file or constraints.txt changes. requirements.txt is the
# runtime set (the Docker image); requirements-dev.txt adds test, lint and benchmark tools.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export PYTHONPATH := $(CURDIR)/plugins:$(CURDIR)/tools
export TF_CPP_MIN_LOG_LEVEL := 2
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test test-fast test-celery airflow bench bench-smoke bench-crawl bench-scale db schema stop-db lint format docs lock clean evaluate compare-features

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt constraints.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required (set PYTHON=...)"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip==26.3
	$(PY) -m pip install --quiet -r requirements-dev.txt -c constraints.txt
	touch $(STAMP)

## The whole pipeline end to end on embedded defaults, then recommendations and an HTML gallery.
demo: setup
	$(PY) tools/demo.py $(DEMO_ARGS)

## Every test (unit and integration: embedded Postgres, loopback HTTP, TensorFlow, Airflow,
## headless Chromium when installed; REQUIRE_BROWSER=1 makes a missing browser an error),
## except the Celery topology test, which alone takes minutes: `make test-celery` (CI runs both).
test: setup
	$(PY) -m pytest --ignore=tests/test_celery_topology.py

## Only the docker-compose topology on the CeleryExecutor, as local processes (needs Debian's
## redis-server: skipped with a notice without it, an error when CI=true).
test-celery: setup
	$(PY) -m pytest tests/test_celery_topology.py

## Evaluate the published lists of the embedded database (after `make demo`): one similarity_quality row.
evaluate: setup
	$(PY) -m sketchfab_similarity.evaluation --db-url "$$($(PY) tools/devenv.py start-db)" \
		--thumbnail-store data/demo/thumbnails $(EVALUATE_ARGS)

## Feature choices side by side on the demo's thumbnails (COMPARE_ARGS="--weights imagenet --input-size 224").
COMPARE_ARGS ?= --weights random --input-size 64
compare-features: setup
	$(PY) -m sketchfab_similarity.compare_features --db-url "$$($(PY) tools/devenv.py start-db)" \
		--thumbnail-store data/demo/thumbnails $(COMPARE_ARGS)

## Unit tests only (seconds).
test-fast: setup
	$(PY) -m pytest -m "not integration"

## The Airflow UI (airflow standalone) on the embedded defaults, DAG ready to trigger.
## Sign in as admin; the password is in .airflow/simple_auth_manager_passwords.json.generated.
airflow: setup
	$(PY) tools/standalone.py

## Benchmarks: prints tables of ratios against baselines measured in the same run.
bench: setup
	@for b in $(filter-out bench/bench_crawl.py bench/bench_scale.py,$(wildcard bench/bench_*.py)); do echo "== $$b"; $(PY) $$b || exit 1; done

## Every benchmark once at a tiny size, so none rots unnoticed (what it prints is not a measurement;
## .ci/run runs it after the tests, in about three minutes).
bench-smoke: setup
	$(PY) bench/bench_publish.py --quick > /dev/null
	$(PY) bench/bench_load.py --quick > /dev/null
	$(PY) bench/bench_queries.py --quick > /dev/null
	$(PY) bench/bench_refresh.py --quick > /dev/null
	$(PY) bench/bench_duplicates.py --models 4000 --plain-models 1000 > /dev/null
	$(PY) bench/bench_download.py --quick > /dev/null
	$(PY) bench/bench_extract.py --quick > /dev/null
	$(PY) bench/bench_crawl.py --models 5000 --cap 500 > /dev/null
	$(PY) bench/bench_scale.py --models 3000 --text-sample 1000 --seconds 1 --publish-seconds 2 \
		--rebuild-sample 1000 --no-hnsw > /dev/null

## The crawl bootstrap past the listing cap: 200,000 models, cap 10,000 (takes several minutes;
## `$(PY) bench/bench_crawl.py --quick` for 40,000 models and a cap of 2,000).
bench-crawl: setup
	$(PY) bench/bench_crawl.py

## Every vectors-side stage at catalogue scale (README "Scale"): SCALE_MODELS models (default 100,000;
## 1,000,000 takes about half an hour and ~15 GB of disk), figures to bench-scale-N.json; then the
## growth exponents of every bench-scale-*.json present.
SCALE_MODELS ?= 100000
bench-scale: setup
	nice -n 19 $(PY) bench/bench_scale.py --models $(SCALE_MODELS) --out bench-scale-$(SCALE_MODELS).json $(SCALE_ARGS)
	$(PY) bench/bench_scale.py --exponents bench-scale-*.json

## Start the embedded Postgres (.pgdata/) and apply sql/ (idempotent).
db: setup
	$(PY) tools/devenv.py start-db
	$(MAKE) --no-print-directory schema

schema: setup
	$(PY) tools/devenv.py apply-schema

stop-db:
	$(PY) tools/devenv.py stop-db

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

## Regenerate the README's Variables table from core/settings.py.
docs: setup
	$(PY) tools/docs.py

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

## Re-resolve and pin the full dependency set after changing requirements.txt or requirements-dev.txt.
lock:
	rm -rf /tmp/sketchfab-lock && $(PYTHON) -m venv /tmp/sketchfab-lock
	/tmp/sketchfab-lock/bin/pip install --quiet -r requirements-dev.txt
	(echo "# Full resolved dependency set for Python 3.11 (generated by 'make lock'; do not edit by hand)."; \
	 /tmp/sketchfab-lock/bin/pip freeze) > constraints.txt

clean: stop-db
	rm -rf $(VENV) .airflow data .pytest_cache .ruff_cache test-artifacts
