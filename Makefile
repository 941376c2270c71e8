# Every target creates the virtual environment it needs.
PYTHON ?= python3
VENV ?= .venv
# CPU build on this kind of machine; on a GPU host set TORCH_SPEC to a CUDA build.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
# Tests read the output of Flower's CLI (which prints non-ASCII): never depend on the locale.
export PYTHONUTF8 := 1
# Flower's processes start each other by name (flower-superlink -> flower-superexec): the venv first.
export PATH := $(abspath $(BIN)):$(PATH)
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint bench venv clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	# a real PACS for the PACS tests (Orthanc and its DICOMweb plugin) and dciodvfy (dicom3tools) for
	# DICOM conformance; the tests skip, saying how to install them, when they are missing
	command -v Orthanc >/dev/null && test -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so && \
	  command -v dciodvfy >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && apt-get update -q && apt-get install -y -q orthanc orthanc-dicomweb dicom3tools; } || \
	  echo "not installed (PACS and DICOM conformance tests will skip): apt-get install -y orthanc orthanc-dicomweb dicom3tools"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/pasta-fed demo --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/mypy

bench: $(STAMP)
	for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf runs .pytest_cache
