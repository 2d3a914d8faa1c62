# apptunnel: `make demo` to try it, `make test` to run every test, `make bench` to compare.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo-data
# Debian packages the tests and the benchmarks start for real (installed when missing, as root).
TEST_PACKAGES := curl chromium postgresql redis-server slapd ldap-utils xmlsec1 nodejs haproxy
BENCH_PACKAGES := wrk nginx openssh-server openssh-client iperf3 curl
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: all demo install test test-deps bench fuzz clean

all: install

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# A plain (non-editable) install, exactly as users do it.
install: $(BIN)/python
	$(BIN)/pip install -q .
	$(BIN)/pip install -q --force-reinstall --no-deps .

test-deps: install
	$(BIN)/pip install -q ".[test]"
	@# The OIDC tests' provider (npm oidc-provider, pinned by the lock file) in a folder of ours.
	@if command -v npm >/dev/null; then cd tests/support/oidc && npm ci --no-audit --no-fund --silent; \
	else echo "npm is missing: tests/integration/test_oidc.py needs it (Node.js >= 20 with npm)" >&2; fi

demo: install
	$(BIN)/python -m apptunnel.demo --dir $(DEMO_DIR)

# Two processes: most integration tests wait on real servers, so 2 cores run two at once
# (17 min in one process, 10.5 min in two on the 2-core CI machine, 2026-12-01).
TEST_WORKERS ?= 2
test: test-deps
	@bash .ci/system-deps $(TEST_PACKAGES)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --durations=25 tests

# Side-by-side with ssh -R and nginx TLS -> ssh -R; writes bench/results/latest.{json,png}.
# BENCH_ARGS passes options (e.g. BENCH_ARGS="--only http --duration 10"); docs/performance.rst.
BENCH_ARGS ?=
bench: install
	@bash .ci/system-deps $(BENCH_PACKAGES)
	$(BIN)/pip install -q ".[bench]"
	$(BIN)/python -m bench.run $(BENCH_ARGS)

# Coverage-guided fuzzing of the parsers (atheris), FUZZ_TIME seconds per harness. Not
# part of `make test` (CI runs each harness briefly in tests/integration/test_fuzz_smoke.py).
# Crashes land in fuzz/artifacts/; what the fuzzer learns in $(FUZZ_WORK).
FUZZ_TIME ?= 60
FUZZ_WORK ?= /tmp/apptunnel-fuzz
FUZZ_HARNESSES := frames mux http1 config
fuzz: test-deps
	@mkdir -p fuzz/artifacts
	@for h in $(FUZZ_HARNESSES); do \
		echo "== fuzz_$$h ($(FUZZ_TIME) s)"; \
		APPTUNNEL_FUZZ_WORK=$(FUZZ_WORK) $(BIN)/python fuzz/fuzz_$$h.py \
			-max_total_time=$(FUZZ_TIME) -print_final_stats=1 \
			-artifact_prefix=fuzz/artifacts/$$h- || exit 1; \
	done

clean:
	rm -rf $(VENV) build dist *.egg-info $(DEMO_DIR)
