# The two commands of the README: `make demo` (install + main job) and `make test`.
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint format bench clean

$(STAMP): requirements/lock.txt requirements/build.txt pyproject.toml setup.py nec_serve/_rans.c scripts/bootstrap.sh
	bash scripts/bootstrap.sh
	touch $@

install: $(STAMP)

demo: install  ## export NEC ViT-B, compress + decompress ../shared/data, print the summary
	PYTHONWARNINGS=ignore $(BIN)/nec-serve demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint  ## the whole suite; .ci/run calls exactly this
	PYTHONWARNINGS=ignore $(BIN)/python -m pytest -q

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install  ## codec throughput vs CompressAI and the entropy bound
	$(BIN)/python benchmarks/bench_codec.py

clean:
	rm -rf build artifacts nec_serve/*.so *.egg-info $(VENV)
