# The two commands a newcomer needs:  make serve  and  make test
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# What the tests need from the operating system: bubblewrap contains every build child, chromium
# drives the dashboard's browser tests. Installed with apt-get when missing (as root, or sudo).
SERVE_PACKAGES := bubblewrap:bwrap
TEST_PACKAGES := $(SERVE_PACKAGES) chromium:chromium

.PHONY: serve test lint typecheck serve-packages test-packages bench gpu-test clean

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	# constraints.txt pins torch 2.13.0 (CPU) here; the package itself accepts torch>=2.11.
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[worker,onnx,tensorrt-rtx,test]'
	touch $(STAMP)

serve-packages:
	@$(MAKE) -s _apt PACKAGES="$(SERVE_PACKAGES)"

test-packages:
	@$(MAKE) -s _apt PACKAGES="$(TEST_PACKAGES)"

_apt:
	@missing=""; for p in $(PACKAGES); do command -v $${p#*:} >/dev/null || missing="$$missing $${p%%:*}"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO="sudo -n"; \
	  $$SUDO apt-get update -q >/dev/null && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends $$missing >/dev/null; \
	fi

serve: serve-packages $(STAMP)
	$(VENV)/bin/kiln serve

lint: $(STAMP)
	$(VENV)/bin/ruff check service workers kiln migrations tests bench examples scripts

typecheck: $(STAMP)
	$(VENV)/bin/mypy
	scripts/typecheck_tensorrt.sh

test: test-packages $(STAMP) lint typecheck
	$(PY) -m pytest -q -ra

bench: $(STAMP)
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[bench]'
	$(PY) -m bench

gpu-test: $(STAMP)
	$(PY) -m pytest -q -ra -m "gpu or tensorrt"

clean:
	rm -rf $(VENV) .kiln
