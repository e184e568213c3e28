# The two quickstart commands (demo, test) install what they need into .venv first (CPU torch on CPU
# machines); check and test-fast are the habits of the people working on raylm.
.PHONY: demo test test-fast check format install

demo:
	bash scripts/demo.sh

test:
	bash scripts/test.sh

test-fast:  # everything but the tests that launch Ray Train trainers
	bash scripts/test.sh -m "not slow"

check:  # lint + format check (ruff, configured in pyproject.toml)
	bash scripts/install.sh dev
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

format:
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .

install:
	bash scripts/install.sh
