# Every target creates what it needs: the virtual environment first.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test faults broker contracts bench bench-floor clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The pinned Solidity compiler and dev chain (npm), then the ABI and bytecode Python deploys.
NODE_MODULES := contracts/node_modules/.package-lock.json
$(NODE_MODULES): contracts/package.json contracts/package-lock.json
	cd contracts && npm install --no-audit --no-fund --loglevel=error  # exact versions pinned in package.json
	touch $(NODE_MODULES)

contracts: $(NODE_MODULES)
	cd contracts && node compile.js

# Start RabbitMQ if none answers, enable the management UI, load deploy/rabbitmq/definitions.json.
broker:
	deploy/rabbitmq/ensure-broker.sh

demo: $(STAMP) broker
	$(BIN)/deltaml demo --bus amqp --owners 5 --validators 1 --rounds 100 --lr 1.5 --eval-every 10 --report report.json

test: $(STAMP) $(NODE_MODULES) broker
	$(BIN)/python -m pytest -q

faults: $(STAMP) $(NODE_MODULES) broker
	$(BIN)/python -m pytest -q tests/test_faults.py tests/test_silence.py

bench: $(STAMP) broker
	$(BIN)/python benchmarks/e2e.py

bench-floor: $(STAMP)
	$(BIN)/python benchmarks/crypto_floor.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis contracts/node_modules
