# One-command set-up: `make demo` and `make test` build everything they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export MAX_JOBS ?= 2
# A CUDA toolkit in the usual place is used for the CUDA kernels (setup.py explains the rules).
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif

# A literal comma, for arguments of $(call ...).
, := ,
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cpp csrc/cuda/*.cuh csrc/cuda/*.h)

.PHONY: venv data build cuda-build cuda-emu lint test test-gpu sanitize-cuda sanitize-cuda-ci \
	coverage-cuda bench bench-run demo margin efficacy ctest clean

venv: $(VENV)/.installed

$(VENV)/.installed: $(SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install torch
	$(BIN)/pip install setuptools wheel ninja numpy
	$(BIN)/pip install --no-build-isolation -e ".[test,plot,vision]"
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

# csrc/cuda (host code and kernels) compiled as C++ for the tests' CPU execution layer
# (tests/support/cuda_emu): no GPU or nvcc needed. `make test` runs every CUDA op test on it.
EMU_TESTS := tests/ops/test_ops_medic.py tests/ops/test_ops_histogram.py \
	tests/ops/test_ops_kl_outliers.py tests/ops/test_ops_errors.py tests/ops/test_cuda_emu.py
# $(call emu-build,DIR,CMAKE OPTIONS): configures once, then builds incrementally. A build folder
# configured from another source folder (the emulation lived in tests/support/cuda_emu before) is
# configured afresh, since CMake refuses to switch sources in place.
EMU_SOURCES := $(abspath tests/support/cuda_emu)
define emu-build
	grep -qsx "CMAKE_HOME_DIRECTORY:INTERNAL=$(EMU_SOURCES)" $(1)/CMakeCache.txt || rm -rf $(1)
	test -f $(1)/build.ninja || cmake -S $(EMU_SOURCES) -B $(1) -G Ninja \
		-DCMAKE_MAKE_PROGRAM=$(abspath $(BIN))/ninja -DPython_EXECUTABLE=$(abspath $(BIN))/python $(2) >/dev/null
	cmake --build $(1) -j $(MAX_JOBS)
endef

cuda-emu: venv
	$(call emu-build,build/cuda-emu,)

lint: venv
	$(BIN)/ruff check bdfast tests benchmarks scripts setup.py

test: venv cuda-emu
	$(BIN)/python -m pytest tests -q

# The emulated CUDA tests under ASan + UBSan, then under TSan (shared-memory races between the
# threads of a block, as compute-sanitizer's racecheck finds them, and races through global
# memory between blocks that run at once). Every finding is fatal.
# -s: a finding ends the process, and pytest's capture would swallow its report. libstdc++ is
# preloaded after the sanitizer's runtime so that it can intercept C++ exceptions (python
# itself does not link libstdc++).
EMU_PYTEST = $(BIN)/python -m pytest -q -s -p no:cacheprovider -k emu
EMU_RUN = $(EMU_PYTEST) $(EMU_TESTS)
LIBSTDCXX = $$(gcc -print-file-name=libstdc++.so.6)
LIBTSAN = $$(gcc -print-file-name=libtsan.so)
# $(call tsan-run,PYTEST ARGUMENTS): builds build/cuda-emu-tsan and runs those emulated tests on it.
define tsan-run
	@test -f "$(LIBTSAN)" || { echo "TSan needs gcc's runtime libtsan.so (Debian: libgcc-12-dev)" >&2; \
		exit 1; }
	$(call emu-build,build/cuda-emu-tsan,-DBDFAST_SANITIZE=thread)
	BDFAST_CUDA_EMU_LIBRARY=build/cuda-emu-tsan/libbdfast_cuda_emu.so BDFAST_TEST_THREADS=1 \
		TSAN_OPTIONS=halt_on_error=1 LD_PRELOAD="$(LIBTSAN) $(LIBSTDCXX)" $(EMU_PYTEST) $(1)
endef
sanitize-cuda: venv
	$(call emu-build,build/cuda-emu-asan,-DBDFAST_SANITIZE=address$(,)undefined)
	BDFAST_CUDA_EMU_LIBRARY=build/cuda-emu-asan/libbdfast_cuda_emu.so ASAN_OPTIONS=detect_leaks=0 \
		LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $(LIBSTDCXX)" $(EMU_RUN)
	$(call tsan-run,$(EMU_TESTS))

# The TSan pass that .ci/run runs after make test: medic's emulated tests and the emulation's
# probes. Medic's forward kernel is the one whose blocks hand partials to each other through
# global memory, and a fault that counted a tile as arrived before storing its partial passed
# every plain emulated run, while 34 of medic's 80 emulated tests report it under TSan (see
# csrc/README.md).
# Left out, for CI's time: the other ops' emulated tests (4 min of CPU under TSan; make
# sanitize-cuda runs them) and medic's 400-layer test, a third of medic's TSan time, whose second
# launch adds only launch-to-launch ordering, which the pool serialises. Measured on this 2-core
# machine while others loaded it (load 10): the TSan build 1.5 min of CPU (4.5 min wall), the
# tests 2.1 min of CPU (8.4 min wall).
TSAN_CI_TESTS := tests/ops/test_ops_medic.py tests/ops/test_cuda_emu.py \
	--deselect "tests/ops/test_ops_medic.py::test_cuda_more_layers_than_one_launch_holds[cuda-emu]"
sanitize-cuda-ci: venv
	$(call tsan-run,$(TSAN_CI_TESTS))

# Line coverage (gcov) of csrc/cuda's kernels under the emulated CUDA tests.
coverage-cuda: venv
	$(call emu-build,build/cuda-emu-coverage,-DBDFAST_COVERAGE=ON)
	find build/cuda-emu-coverage -name '*.gcda' -delete
	BDFAST_CUDA_EMU_LIBRARY=build/cuda-emu-coverage/libbdfast_cuda_emu.so $(EMU_RUN)
	$(BIN)/python scripts/cuda_coverage.py build/cuda-emu-coverage

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
