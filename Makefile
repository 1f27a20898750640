# ticketd: the two commands are `make run` (the service) and `make test` (everything CI runs).
CARGO ?= cargo
# Debian packages the test suite needs; installed by `make deps` when missing.
# chromium: the browser check of /docs and /redoc; python3-venv: the checks' virtualenv.
# postgresql: the tests start their own private servers with its binaries (never the system one).
TEST_PACKAGES ?= redis-server nginx wrk docker-compose chromium python3-venv postgresql
LOOM_TARGET ?= target-loom
# The unit tests' build; the conformance checks run the binary it leaves in the target dir.
UNIT_ARGS = --workspace --features ticketd/failpoints
PYTHON ?= python3
# The conformance checks' virtualenv (pinned packages: scripts/conformance/requirements.txt).
VENV ?= .venv
TICKETD_BIN ?= $(or $(CARGO_TARGET_DIR),target)/debug/ticketd

.PHONY: run test bench unit loom loom-mutants mutants deps fmt-check compose-check cluster test-docker clean-test \
	conformance schemathesis browser debug-bin venv FORCE

## run: the service in embedded mode on :8000 with ./ticket.db (no Redis needed)
run:
	$(CARGO) run --release --bin ticketd

## test: install what is missing, then formatting, compose files, unit + black-box tests, loom
test: deps fmt-check compose-check unit conformance loom

unit:
	$(CARGO) test $(UNIT_ARGS)

## conformance: /openapi.json fuzzed by schemathesis, /docs and /redoc in headless chromium
conformance: schemathesis browser

## schemathesis: every operation of /openapi.json, generated and hostile inputs: no 5xx, as specified
schemathesis: deps venv debug-bin
	TICKETD_BIN=$(TICKETD_BIN) $(VENV)/bin/python scripts/conformance/schemathesis_check.py

## browser: /docs renders every operation and "Try it out" of GET /health works; /redoc renders; offline
browser: deps venv debug-bin
	TICKETD_BIN=$(TICKETD_BIN) $(VENV)/bin/python scripts/conformance/browser_check.py

# The binary the checks start: the unit tests' build (same features: after `unit`, nothing to do).
debug-bin:
	$(CARGO) test $(UNIT_ARGS) --no-run -q

# The virtualenv is a file target, made once and again only when the pinned requirements
# change, or when its interpreter no longer runs (a .venv made elsewhere: another machine, a container).
VENV_RUNS := $(shell $(VENV)/bin/python -c 'print(1)' 2>/dev/null)
venv: $(VENV)/.installed

$(VENV)/.installed: scripts/conformance/requirements.txt $(if $(VENV_RUNS),,FORCE)
	$(PYTHON) -m venv --clear $(VENV)
	$(VENV)/bin/pip install -q -r scripts/conformance/requirements.txt
	touch $@

## loom: model-check the shared-memory core (own cfg and target dir: the normal build stays valid)
loom:
	RUSTFLAGS="--cfg ticketd_loom" CARGO_TARGET_DIR=$(LOOM_TARGET) LOOM_MAX_PREEMPTIONS=2 \
		$(CARGO) test -p loom-tests --release

## bench: release build, then the flash-sale scenarios with wrk (bench/results.json, a table)
bench: deps
	$(CARGO) build --release --bin ticketd
	python3 scripts/bench.py

## cluster: redis-server + three replicas + nginx on :8000, without Docker (Ctrl-C stops all);
## DB=postgres: on a PostgreSQL server of its own (./cluster-pg, PG_PORT 6391) instead of ./cluster.db
DB ?= sqlite
cluster: deps
	DB=$(DB) ./scripts/cluster.sh

## test-docker: the test suite in a container next to a Redis service (needs a Docker engine)
test-docker:
	docker-compose -f docker-compose.test.yml run --rm tests

compose-check:
	ADMIN_TOKEN=compose-check-organizer TICKET_KEY=compose-check-ticket-key POSTGRES_PASSWORD=compose-check-pg \
		docker-compose -f docker-compose.yml config -q
	docker-compose -f docker-compose.test.yml config -q

## loom-mutants: put one deliberate bug per model into src/, require each model to fail, restore
loom-mutants:
	python3 scripts/loom-mutants.py

## mutants: plant one deliberate bug per promise into a scratch copy, require its tests to fail
mutants: deps
	python3 scripts/mutants.py

fmt-check:
	$(CARGO) fmt --all -- --check

deps:
	@missing=""; for p in $(TEST_PACKAGES); do \
		dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing \
		|| { $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; }; \
	fi

## clean-test: remove build and test leftovers
clean-test:
	rm -rf $(LOOM_TARGET) $(VENV) cluster.db cluster.db-wal cluster.db-shm cluster-pg
	$(CARGO) clean

FORCE:
