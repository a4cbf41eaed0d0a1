# k2 — `make help` lists the targets.
#
# Everything installs into the current Python environment. torch is installed once and pip skips
# it afterwards; cargo builds into a persistent target directory so a fresh clone does not
# rebuild the Rust dependencies.

PYTHON ?= python3
PIP := $(PYTHON) -m pip
export CARGO_TARGET_DIR ?= $(HOME)/.cache/k2/target
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export PIP_ROOT_USER_ACTION := ignore

.PHONY: help install install-test run test test-python test-rust inplace wheel clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

install: ## install k2 (editable) with its runtime dependencies
	$(PIP) install -q "maturin>=1.7,<2"
	$(PIP) install -q --no-build-isolation -e .

install-test: ## install k2 with its test dependencies
	$(PIP) install -q "maturin>=1.7,<2"
	$(PIP) install -q --no-build-isolation -e ".[test]"

run: install ## install k2 and run the main job: pretrain the tiny K2 on the built-in corpus
	k2 train

test: install-test test-rust test-python ## install k2 and run every test (pytest, cargo test)

test-python: ## run the Python tests (pytest)
	$(PYTHON) -m pytest -q

test-rust: ## run the Rust unit tests (cargo test)
	cargo test -q --workspace --all-targets

inplace: ## build the extension (release) into python/k2/ without installing (use PYTHONPATH=python)
	cargo build -q --release -p k2-native --features python
	cp $(CARGO_TARGET_DIR)/release/libk2_native.so python/k2/_native.abi3.so

wheel: ## build the abi3 release wheel into dist/ (what the GPU machine installs)
	$(PYTHON) -m maturin build --release --out dist

clean: ## remove build outputs
	rm -rf dist target python/k2/*.so
