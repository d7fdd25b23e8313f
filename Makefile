# Shortcuts for the scripts the README gives.
.PHONY: demo test test-fast setup
setup:
	bash scripts/setup.sh
demo:
	bash scripts/demo.sh
test:
	bash scripts/test.sh
test-fast:
	bash scripts/test.sh -m "not slow"
