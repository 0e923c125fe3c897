# egressd build and test entry points.
#
#   make setup   system packages (apt, only when missing) + .venv with the project and its dev tools
#   make run     egressd serve with ./var as data dir
#   make test    lint, then the whole test suite (root-marked integration tests run when root)
#   make lint    ruff check, ruff format --check, mypy, import-linter
#   make fmt     ruff format + ruff check --fix
#   make bench   python -m bench (when bench/ has a __main__)
#   make clean   remove the venv, caches and build output
#
# Written for a fresh Debian 12 machine where we are root; idempotent, and a second
# `make setup` is fast: apt is only consulted when a package is missing, pip only when
# pyproject.toml changed since the last install (stamp file in the venv).

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-print-directory

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.egressd-installed
DATA_DIR ?= ./var
PYTEST_ARGS ?=

# Debian packages the project and its integration tests need. We never rely on the
# services these packages install: tests start their own peers in their own namespaces.
APT_PACKAGES := nftables iproute2 dante-server tinyproxy squid stunnel4 dnsmasq-base \
	curl openssl procps psmisc python3-venv tcpdump util-linux ca-certificates \
	podman runc busybox-static postgresql \
	redsocks iperf3 wrk nginx-light

SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: setup apt-packages venv run test lint fmt bench clean help

help:
	@sed -n '3,10p' Makefile | sed 's/^# \{0,1\}//'

setup: apt-packages venv

apt-packages:
	@missing=""; \
	for pkg in $(APT_PACKAGES); do \
		status=$$(dpkg-query -W -f='$${Status}' "$$pkg" 2>/dev/null || true); \
		[ "$$status" = "install ok installed" ] || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "==> apt: installing$$missing"; \
		export DEBIAN_FRONTEND=noninteractive; \
		$(SUDO) apt-get update -q; \
		$(SUDO) apt-get install -y -q --no-install-recommends $$missing; \
	fi

venv: $(STAMP)

$(BIN)/python:
	@echo "==> creating $(VENV)"
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	@echo "==> installing egressd[dev,postgres] into $(VENV)"
	$(BIN)/python -m pip install -q -e '.[dev,postgres]'
	@touch $@

run: setup
	exec $(BIN)/egressd serve --data-dir $(DATA_DIR)

lint: setup
	@echo "==> ruff check"
	@$(BIN)/ruff check .
	@echo "==> ruff format --check"
	@$(BIN)/ruff format --check .
	@echo "==> mypy"
	@$(BIN)/mypy
	@echo "==> import-linter"
	@$(BIN)/lint-imports --no-cache --no-logo

fmt: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	@echo "==> pytest$(if $(SUDO), (not root: root-marked tests are skipped), (root: integration tests included))"
	@$(BIN)/pytest -q tests $(PYTEST_ARGS)

# BENCH_ARGS: e.g. make bench BENCH_ARGS=--quick (see python -m bench --help).
bench: setup
	@if [ -f bench/__main__.py ]; then \
		$(BIN)/python -c 'import matplotlib' 2>/dev/null \
			|| $(BIN)/python -m pip install -q -e '.[bench]'; \
		$(BIN)/python -m bench $(BENCH_ARGS); \
	else \
		echo "no benchmarks yet"; \
	fi

clean:
	rm -rf $(VENV) build dist src/*.egg-info .mypy_cache .ruff_cache .pytest_cache .import_linter_cache
	find . -path ./.git -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
