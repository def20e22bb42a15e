#!/usr/bin/env bash
# Installs (into .venv/) and runs the whole test suite, slow end-to-end tests included, plus ruff.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
echo "[lorkd] ruff"
ruff check .
echo "[lorkd] pytest"
python -m pytest -q "$@"
