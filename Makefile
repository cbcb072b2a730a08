# make test   - set everything up on a fresh machine and run the whole suite
# make demo   - install, pull the default model, start a local swarm and stream one generation
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: install deps-system model test test-fast proto bench demo clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# The node extra brings torch; it is pinned to the CPU build first when none is
# present, as an unpinned torch could pull a multi-GB CUDA build.
install: $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[node,dev]"

# Debian packages the integration tests need (a real MQTT broker, a real browser, a C
# compiler for the node's VNNI kernel, node/swarm_node/engine/blockq.c).
deps-system:
	@if ! command -v cc >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q gcc; \
		else echo "no C compiler: apt-get install gcc"; fi; fi
	@if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then \
		if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q mosquitto; \
		else echo "mosquitto missing: apt-get install mosquitto"; fi; fi
	@if ! command -v chromium >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q chromium; \
		else echo "chromium missing (dashboard browser test): apt-get install chromium"; fi; fi

model: install
	$(VENV)/bin/swarm model pull

test: install deps-system model
	$(PY) -m pytest -q -ra

test-fast: install
	$(PY) -m pytest -q -ra -m "not slow"

proto: install
	$(PY) -m swarm_proto.build

bench: install model
	$(PY) bench/engine.py
	$(PY) bench/assignment.py

# `swarm up` in the background (a coordinator with its embedded broker and 3 nodes, the
# model split over them; it prints the split),
# one streamed answer through its coordinator, then Ctrl-C for the swarm.
demo: install model
	@rm -f .swarm-demo; \
	$(VENV)/bin/swarm up --nodes 3 --ready-file .swarm-demo & up=$$!; \
	trap 'kill -INT $$up 2>/dev/null; wait $$up' EXIT; \
	while [ ! -s .swarm-demo ]; do kill -0 $$up 2>/dev/null || exit 1; sleep 0.5; done; \
	$(VENV)/bin/swarm generate --coordinator "$$(cat .swarm-demo)" --chat --stats "Tell me about the ocean in two sentences."

clean:
	rm -rf $(VENV) .pytest_cache build dist
