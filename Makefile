# polar-meter. Two commands set everything up on a fresh Debian machine (as root):
#   make up    install what is missing, build, start PostgreSQL (+ pg_cron + polar_meter)
#   make test  install what is missing, build, run every test suite
SHELL := /bin/bash
PG_CONFIG := /usr/lib/postgresql/15/bin/pg_config

.PHONY: up down test test-containers test-citus deps build install-extension clean bench fuzz

deps:
	@scripts/deps.sh

build: deps
	cargo build -p polar-meterd -p polar-emulator
	cargo pgrx install -p polar_meter --pg-config $(PG_CONFIG)

install-extension: deps
	cargo pgrx install -p polar_meter --pg-config $(PG_CONFIG)

up: build
	@scripts/up.sh

down:
	@scripts/up.sh down

test: deps
	@scripts/test.sh

# Parts of make test on their own (make test runs both).
test-containers: deps
	@tests/containers/run.sh

test-citus: deps
	@PM_ONLY=citus scripts/test.sh

clean: down
	scripts/cluster.sh destroy dev
	scripts/cluster.sh destroy test
	cargo clean

# Benchmarks (not tests): write their figures into BENCHMARKS.md.
bench: deps
	tests/bench/ingest.sh
	tests/bench/fresh.sh
	tests/bench/batch.sh
	tests/bench/sustained.sh max 600 24
	tests/bench/drain.sh
	tests/bench/claim.sh
	tests/bench/sidecars.sh
	tests/bench/reconcile.sh
	tests/bench/citus.sh

# The long hostile-input runs (make test runs 20k property cases and 10k requests).
fuzz: deps
	PM_PROPTEST_CASES=1000000 cargo test -p polar_meter_rules --test properties
	PM_FUZZ_REQUESTS=100000 PM_ONLY=fuzz_meter scripts/test.sh
