# Tofy runtime: `make demo` runs the main job, `make test` runs the checks CI runs.
# Both set up what they need first (scripts/setup.sh, idempotent).

SHELL   := /bin/bash
CARGO   ?= cargo
TOFY    := target/release/tofy
FIXTURE := tests/fixtures/seed-tiny
PROMPT  ?= write a short gpu recommendation

.PHONY: demo test setup build lint bench fixture help

## demo: build, then print the conditioning vector of a sample prompt on the committed seed-format fixture
demo: setup build
	$(TOFY) condition $(FIXTURE)/model_world_tiny.safetensors $(FIXTURE)/vocab_world.txt "$(PROMPT)" --heads 4 --max-seq 16
	$(TOFY) condition $(FIXTURE)/model_world_tiny.safetensors $(FIXTURE)/vocab_world.txt "$(PROMPT)" --heads 4 --max-seq 16 --json

## test: formatting, clippy -D warnings, and every test (optimised build, one profile for all)
test: setup
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --release --locked --all-targets -- -D warnings
	$(CARGO) test --release --locked

## setup: check the toolchain and install the system packages the build needs
setup:
	@scripts/setup.sh

build:
	$(CARGO) build --release --locked

## bench: criterion benchmarks (figures recorded in BENCHMARKS.md)
bench: setup
	$(CARGO) bench --locked

## fixture: regenerate tests/fixtures/seed-tiny with the independent NumPy implementation
fixture:
	python3 -m pip install --quiet numpy safetensors
	python3 scripts/make_seed_fixture.py $(FIXTURE)

help:
	@grep -E '^## ' Makefile | sed 's/^## /  /'
