# The two commands a newcomer needs:  make serve  and  make test
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: serve test lint bench gpu-test clean

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	# constraints.txt pins torch 2.13.0 (CPU) here; the package itself accepts torch>=2.11.
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[onnx,test]'
	touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/kiln serve

test: $(STAMP)
	$(VENV)/bin/ruff check service workers migrations tests bench examples scripts
	scripts/typecheck_tensorrt.sh
	$(PY) -m pytest -q -ra

bench: $(STAMP)
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[bench]'
	$(PY) -m bench

gpu-test: $(STAMP)
	$(PY) -m pytest -q -ra -m "gpu or tensorrt"

clean:
	rm -rf $(VENV) .kiln
