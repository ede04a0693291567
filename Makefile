# The two commands: `make demo` and `make test`. Both create .venv and install on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean bench

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test]"
	# DeepSpeed's shared-memory comm op, compiled once here instead of inside every cold job (about 40 s).
	TORCH_EXTENSIONS_DIR=$(abspath $(VENV))/torch_extensions DS_ACCELERATOR=cpu $(BIN)/python -c \
		"from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load(verbose=False)"
	# The dashboard's browser tests drive Debian's chromium (never a downloaded browser); without it they skip.
	test -x /usr/bin/chromium || [ "$$(id -u)" != 0 ] || (apt-get update -q && apt-get install -y -q chromium) \
		|| echo "could not install chromium: the dashboard's browser tests will skip"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/switchyard run examples/pretrain.yaml

# The tests run under a fresh, empty HOME and TMPDIR, as CI does: no Ray token, Switchyard state or
# cache left on this machine by earlier runs can make them pass.
test: $(STAMP)
	HOME=$$(mktemp -d) TMPDIR=$$(mktemp -d) $(BIN)/python -m pytest -q --durations=25

# Every benchmark in benchmarks/, one after another, into benchmarks/results.json; then README.md's
# figures table is regenerated from that file. BENCH_ARGS="--only ppo fit_speed --merge" runs some.
bench: $(STAMP)
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

clean:
	rm -rf runs .switchyard .pytest_cache
