# The two commands of the README: `make demo` (install + main job) and `make test` (CI runs it;
# `make test-fast` is its unit tier, for the edit-test loop).
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast lint format bench bench-codec bench-coding bench-container bench-encoder \
	bench-serving bench-pipeline bench-perf bench-rate bench-rvq train-eurosat train-s2 clean

$(STAMP): requirements/lock.txt requirements/build.txt pyproject.toml dev/pyproject.toml setup.py nec_serve/_rans.c scripts/bootstrap.sh
	bash scripts/bootstrap.sh
	touch $@

install: $(STAMP)

demo: install  ## the shipped trained NEC model on Sentinel-2 RGB: bits, top-1, then the workflow
	PYTHONWARNINGS=ignore $(BIN)/nec-serve demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache
	$(BIN)/python scripts/function_length.py

test: lint  ## the whole suite; .ci/run calls exactly this
	PYTHONWARNINGS=ignore $(BIN)/python -m pytest -q

test-fast: install  ## the unit tiers: no broker, S3, Triton or API server, nothing slow (< 2 min)
	PYTHONWARNINGS=ignore $(BIN)/python -m pytest -q -m "not integration and not slow"

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Benchmarks (docs/measurements.md, benchmarks/README.md); results land in benchmarks/results/. They use the demo's
# ViT-B export (made here if missing, as `make demo` makes it) and take ~30 min on 2 cores.
BENCH_EXPORT := artifacts/demo/export/mae_vit_compress_adapter
# The data as the demo finds it (nec_dev.data): $NEC_DATA, ../shared/data, the sample data; the
# calibration scene is in all three.
DATA         := $(or $(NEC_DATA),$(wildcard ../shared/data),data/samples)
CALIBRATION  := $(DATA)/naip/m_4709963_se_14_1_20090818.tif

$(BENCH_EXPORT)/manifest.json: | install
	PYTHONWARNINGS=ignore $(BIN)/nec-serve export --model mae_vit_compress_adapter \
		--calibrate $(CALIBRATION) --calibrate-tiles 20 --out $(BENCH_EXPORT)

bench: bench-codec bench-coding bench-encoder bench-serving bench-pipeline bench-perf  ## all, then SUMMARY.md
	$(BIN)/python benchmarks/report.py

bench-codec: install  ## rANS coder vs CompressAI and constriction, against the entropy bound
	$(BIN)/python benchmarks/bench_codec.py

bench-coding: install  ## the coding stage per ViT-B tile, one core: coder alone and with the container
	$(BIN)/python benchmarks/bench_coding.py --rvq

bench-container: install  ## container framing vs payload: NEC rate points on EuroSAT, RVQ N = 1..8
	PYTHONWARNINGS=ignore $(BIN)/python benchmarks/bench_container.py

bench-encoder: $(BENCH_EXPORT)/manifest.json  ## in-process PyTorch (GPU if any) and onnxruntime
	PYTHONWARNINGS=ignore $(BIN)/python benchmarks/bench_encoder.py --onnx-dir $(BENCH_EXPORT)

bench-serving: $(BENCH_EXPORT)/manifest.json  ## in-process vs local tritonserver gRPC/HTTP/shm
	PYTHONWARNINGS=ignore $(BIN)/python benchmarks/bench_serving.py --model-dir $(BENCH_EXPORT)

bench-pipeline: $(BENCH_EXPORT)/manifest.json  ## one wrapper on Kafka + S3 + Triton, per stage
	PYTHONWARNINGS=ignore $(BIN)/python benchmarks/bench_pipeline.py --model-dir $(BENCH_EXPORT) \
		--server triton inprocess

# perf_analyzer: every curve of the export's default configuration, then the encoder over gRPC
# with 2 instances and without the dynamic batcher (~25 min on 2 cores).
PERF := PYTHONWARNINGS=ignore $(BIN)/python benchmarks/perf_sweep.py --model-dir $(BENCH_EXPORT) \
	--measurement-ms 5000 --retries 1
bench-perf: $(BENCH_EXPORT)/manifest.json  ## perf_analyzer sweep, curves and summary
	$(PERF) --configs i1-b8-d5000
	$(PERF) --configs i2-b8-d5000 i1-b8-d- --models encoder --protocols grpc

# The EuroSAT models that ship in weights/eurosat/ (scripts/train_eurosat.sh, ~3 h on 2 cores,
# resumable), and what each gives per bit against image codecs (~40 min on 2 cores).
LAMBDAS     ?= 30000 300000 3000000
RATE_MODELS := $(addprefix nec-eurosat-l,$(LAMBDAS))

train-eurosat: install  ## MAE, NEC at each lambda, classifier heads (runs/, resumable)
	LAMBDAS="$(LAMBDAS)" scripts/train_eurosat.sh

bench-rate: install  ## EuroSAT test split: NEC rate points vs JPEG/WebP/JPEG 2000/PNG/zstd
	for m in $(RATE_MODELS); do \
		[ -f artifacts/rate/$$m/manifest.json ] || \
		PYTHONWARNINGS=ignore $(BIN)/nec-serve export --shipped $$m --out artifacts/rate/$$m \
		|| exit 1; done
	PYTHONWARNINGS=ignore $(BIN)/python benchmarks/bench_rate.py --mae mae_vit_tiny_patch8 \
		--nec $(addprefix artifacts/rate/,$(RATE_MODELS))

# The RVQ Sentinel-2 compressor that ships in weights/sentinel2/ (scripts/train_s2.sh, ~75 min
# on 2 cores, resumable), and its rate against distortion beside per-band codecs (~5 min).
train-s2: install  ## RVQ compressor (1-8 codebooks) and the 8-codebook comparison (runs/)
	scripts/train_s2.sh

bench-rvq: install  ## Sentinel-2 test split: RVQ N=1..8 vs JPEG 2000 16 bit, JPEG 8 bit, zstd
	PYTHONWARNINGS=ignore $(BIN)/python benchmarks/bench_rvq.py --shipped rvq-s2 \
		--compare rvq-s2-fixed8

clean:
	rm -rf build artifacts nec_serve/*.so *.egg-info $(VENV)
