.PHONY: install demo test lint

install:
	bash scripts/install.sh

# The main job on the embedded default (shipped ResNet-20 on Fashion-MNIST).
demo: install
	bash scripts/demo.sh

# The whole test suite (slow and TVM tests included).
test: install
	python3 -m pytest -q

lint:
	python3 -m ruff check autoprune tests bench
