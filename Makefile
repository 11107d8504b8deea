# One-command set-up: `make demo` and `make test` build everything they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export MAX_JOBS ?= 2
# A CUDA toolkit in the usual place is used for the CUDA kernels (setup.py explains the rules).
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif

SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cpp csrc/cuda/*.cuh csrc/cuda/*.h)

.PHONY: venv data build cuda-build test test-gpu bench bench-run demo margin efficacy ctest clean

venv: $(VENV)/.installed

$(VENV)/.installed: $(SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install torch
	$(BIN)/pip install setuptools wheel ninja numpy
	$(BIN)/pip install --no-build-isolation -e ".[test,plot]"
	touch $@

# Fashion-MNIST's four IDX files from Debian's dataset-fashion-mnist package, where apt-get exists
# and we may use it; elsewhere the tests that need them say why they skip.
FASHION_MNIST := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz
data:
	@if [ -f $(FASHION_MNIST) ]; then echo "Fashion-MNIST: $(dir $(FASHION_MNIST))"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			dataset-fashion-mnist) || echo "Fashion-MNIST could not be installed; its tests skip"; \
	else echo "Fashion-MNIST: no apt-get (or not root); install dataset-fashion-mnist to run its tests"; fi

# Rebuild the extension in place after editing csrc/ (incremental with ninja).
build: venv
	$(BIN)/python setup.py build_ext --inplace

# Compile the CUDA kernels even where no GPU is present; fails if nvcc or a CUDA torch is missing.
cuda-build: venv
	$(BIN)/python -c "import torch, sys; sys.exit('cuda-build needs a CUDA build of torch') if torch.version.cuda is None else None"
	$(BIN)/python setup.py build_ext --inplace
	$(BIN)/python -c "import bdfast; info = bdfast.backend_info(); assert info['native_cuda'], info['why']; print('CUDA kernels compiled:', info['native_cuda'])"

test: venv
	$(BIN)/python -m pytest tests -q

test-gpu: venv
	$(BIN)/python -m pytest tests -q -m gpu

bench: venv
	mkdir -p benchmarks/results
	$(BIN)/python -m pytest benchmarks -q --benchmark-only --benchmark-json=benchmarks/results/latest.json
	$(BIN)/python benchmarks/summarize.py benchmarks/results/latest.json

# Whole MEDIC runs (statistics + 60 epochs) against the released code's loop, with ACC / ASR:
# every variant twice, in turn: 18 to 23 minutes on 2 cores. See benchmarks/bench_medic_run.py;
# writes results/medic_run.json.
bench-run: venv
	mkdir -p benchmarks/results
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python benchmarks/bench_medic_run.py --repeat 2 \
		--variants released,nocache,cache,cache-nchw,released+aug,aug

demo: venv
	$(BIN)/bdfast demo

# The efficacy acceptance cases over seeds x 1/2/4 threads x AVX-512/AVX2 (18 variants of about
# 4 min each on 2 cores; resumes after an interruption). See scripts/efficacy_margin.py.
margin: venv
	$(BIN)/python scripts/efficacy_margin.py -j 2 --markdown benchmarks/results/efficacy_margin.md

# Every defense on data sets x models x attacks x seeds; resumes after an interruption and writes
# benchmarks/results/efficacy.{jsonl,md,json,png}. See benchmarks/efficacy.py.
efficacy: venv data
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python benchmarks/efficacy.py --settings dde:paper,auto mbns:paper,auto

# The same csrc/ built with CMake, for the C++ tests and sanitizers.
ctest: venv
	cmake -S . -B cmake-build -DCMAKE_PREFIX_PATH="$$($(BIN)/python -c 'import torch; print(torch.utils.cmake_prefix_path)')" -DBDFAST_WITH_CUDA=OFF
	cmake --build cmake-build -j $(MAX_JOBS)
	cd cmake-build && ctest --output-on-failure

clean:
	rm -rf build cmake-build bdfast/_C*.so *.egg-info
