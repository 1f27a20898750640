# ticketd: the two commands are `make run` (the service) and `make test` (everything CI runs).
CARGO ?= cargo
# Debian packages the test suite needs; installed by `make deps` when missing.
TEST_PACKAGES ?=
LOOM_TARGET ?= target-loom

.PHONY: run test unit loom deps fmt-check clean-test

## run: the service in embedded mode on :8000 with ./ticket.db (no Redis needed)
run:
	$(CARGO) run --release --bin ticketd

## test: install what is missing, then formatting, unit + black-box tests, loom models
test: deps fmt-check unit loom

unit:
	$(CARGO) test --workspace --features ticketd/failpoints

## loom: model-check the shared-memory core (own cfg and target dir: the normal build stays valid)
loom:
	RUSTFLAGS="--cfg ticketd_loom" CARGO_TARGET_DIR=$(LOOM_TARGET) LOOM_MAX_PREEMPTIONS=2 \
		$(CARGO) test -p loom-tests --release

fmt-check:
	$(CARGO) fmt --all -- --check

deps:
	@missing=""; for p in $(TEST_PACKAGES); do \
		dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

clean-test:
	rm -rf $(LOOM_TARGET)
	$(CARGO) clean
