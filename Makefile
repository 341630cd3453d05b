# The two commands of README.md. Both work on a fresh machine: they create .venv when it is
# missing and install fastkd (editable) with its test extras into it.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): setup.py
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip
	$(VENV)/bin/pip install -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fastkd demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest tests -q

clean:
	rm -rf $(VENV) build *.egg-info
