# Set-up and entry points. Every target creates .venv and installs what it needs first.
PY := .venv/bin/python
PIP := .venv/bin/pip

.PHONY: demo test lint bench clean

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	# The CPU build of torch 2.13.0 lies on disk on our machines; elsewhere pip resolves torch>=2.4.
	$(PIP) install -q torch==2.13.0 || true
	$(PIP) install -q -e '.[dev]'
	touch $@

demo: .venv/.installed
	.venv/bin/sipit demo

test: .venv/.installed
	$(PY) -m pytest -q

lint: .venv/.installed
	.venv/bin/ruff check .

bench: .venv/.installed
	$(PY) benchmarks/invert.py

clean:
	rm -rf .venv
