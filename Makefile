# The two front-door commands (run as root on Debian 12):
#   make demo   set up, build the bundled demo image offline, convert it for Charliecloud, run it with ch-run
#   make test   set up, then run the whole test suite against the real components
PYTHON ?= python3
DEMO_DIR ?= demo-out

.PHONY: setup demo test

setup:
	bash scripts/setup-system.sh

demo: setup
	rm -rf $(DEMO_DIR) && mkdir -p $(DEMO_DIR)
	$(PYTHON) scripts/build-demo-image.py $(DEMO_DIR)/demo-oci
	HPCCONV_STORE=$(CURDIR)/$(DEMO_DIR)/store hpcconv convert oci:$(DEMO_DIR)/demo-oci:demo \
	    --target charliecloud --format squashfs -o $(DEMO_DIR)/demo.sqfs
	USER=$${USER:-root} ch-run --set-env -c /opt/demo $(DEMO_DIR)/demo.sqfs -- /opt/demo/bin/hello world

test: setup
	HPCCONV_REQUIRE_ALL=1 $(PYTHON) -m pytest -q -p no:cacheprovider tests
