# The two quickstart commands. Each installs what it needs into .venv first (CPU torch on CPU machines).
.PHONY: demo test install

demo:
	bash scripts/demo.sh

test:
	bash scripts/test.sh

install:
	bash scripts/install.sh
