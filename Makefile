# ticketd: the two commands are `make run` (the service) and `make test` (everything CI runs).
CARGO ?= cargo
# Debian packages the test suite needs; installed by `make deps` when missing.
TEST_PACKAGES ?= redis-server nginx wrk docker-compose
LOOM_TARGET ?= target-loom

.PHONY: run test bench unit loom loom-mutants mutants deps fmt-check compose-check cluster test-docker clean-test

## run: the service in embedded mode on :8000 with ./ticket.db (no Redis needed)
run:
	$(CARGO) run --release --bin ticketd

## test: install what is missing, then formatting, compose files, unit + black-box tests, loom
test: deps fmt-check compose-check unit loom

unit:
	$(CARGO) test --workspace --features ticketd/failpoints

## loom: model-check the shared-memory core (own cfg and target dir: the normal build stays valid)
loom:
	RUSTFLAGS="--cfg ticketd_loom" CARGO_TARGET_DIR=$(LOOM_TARGET) LOOM_MAX_PREEMPTIONS=2 \
		$(CARGO) test -p loom-tests --release

## bench: release build, then the flash-sale scenarios with wrk (bench/results.json, a table)
bench: deps
	$(CARGO) build --release --bin ticketd
	python3 scripts/bench.py

## cluster: redis-server + three replicas + nginx on :8000, without Docker (Ctrl-C stops all)
cluster: deps
	./scripts/cluster.sh

## test-docker: the test suite in a container next to a Redis service (needs a Docker engine)
test-docker:
	docker-compose -f docker-compose.test.yml run --rm tests

compose-check:
	ADMIN_TOKEN=compose-check-organizer TICKET_KEY=compose-check-ticket-key \
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
	rm -rf $(LOOM_TARGET) cluster.db cluster.db-wal cluster.db-shm
	$(CARGO) clean
