# Every target installs what it needs into .venv, so a fresh clone works with only Python 3.11.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast fuzz-long bench lint schemas kcat chromium golden clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[embedded,postgres,test,dev]'
	touch $(STAMP)

install: $(STAMP)

# kcat is the independent Kafka client of the end-to-end test; Debian's package is used with the
# newer librdkafka that ships in the confluent-kafka wheel (see tests/integration/kcat.py).
kcat:
	@command -v kcat >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get install -y -qq kcat >/dev/null 2>&1 || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq kcat >/dev/null 2>&1)) \
	      || echo "warning: could not install kcat; its end-to-end test will be skipped"; \
	  else echo "warning: kcat not installed and no root apt-get; its end-to-end test will be skipped"; fi; }

# Headless Chromium renders the audit report in its screenshot test (Debian's package).
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get install -y -qq chromium >/dev/null 2>&1 || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1)) \
	      || echo "warning: could not install chromium; the report screenshot test will be skipped"; \
	  else echo "warning: chromium not installed and no root apt-get; the report screenshot test will be skipped"; fi; }

demo: $(STAMP)
	$(BIN)/orch-worker demo

test: $(STAMP) kcat chromium
	ORCH_FUZZ_EXAMPLES=10000 $(BIN)/pytest -q -p no:cacheprovider --durations=15

test-fast: $(STAMP)
	$(BIN)/pytest -q -p no:cacheprovider tests/unit tests/component

# Accept the current core's behaviour as the golden replay expectations (review the diff!).
golden: $(STAMP)
	ORCH_UPDATE_GOLDEN=1 $(BIN)/pytest -q -p no:cacheprovider tests/replay

# Hostile-input fuzzing of every input topic at 100,000 payloads per topic.
fuzz-long: $(STAMP)
	ORCH_FUZZ_EXAMPLES=100000 $(BIN)/pytest -q -p no:cacheprovider tests/unit/test_fuzz_inputs.py

bench: $(STAMP)
	$(PY) -m bench

# Chaos harness (bench/chaos.py): worker + paper venue + sink as processes on the embedded broker,
# SIGKILLs of the worker and a broker SIGSTOP/SIGCONT mid-run; prints the counts it checked and
# exits non-zero on any violation. `python -m bench.chaos --help` for every knob.
.PHONY: chaos chaos-long backpressure
chaos: $(STAMP)
	$(PY) -m bench.chaos --signals 1000 --kills 20

chaos-long: $(STAMP)
	$(PY) -m bench.chaos --signals 3000 --kills 50 --pauses 3 --workers 2 --timeout 900

# Backpressure (bench/backpressure.py): a burst of 50,000 signals at a worker and the paper venue
# run as processes on the embedded broker; samples the worker's RSS, prints it at start / peak /
# end with its growth per 10,000 signals, and exits non-zero if a signal is lost or an intent
# duplicated. `python -m bench.backpressure --quick` is a 3,000-signal smoke run.
backpressure: $(STAMP)
	$(PY) -m bench.backpressure --signals 50000 --timeout 1500

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy
	$(BIN)/mypy bench

schemas: $(STAMP)
	$(BIN)/orch-worker schemas --out schemas

clean:
	rm -rf $(VENV) build dist .pytest_cache .mypy_cache .ruff_cache
