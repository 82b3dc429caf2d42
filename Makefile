# SentryPeer (Python/Twisted). Two entry points for a fresh Debian machine:
#   make run     run the honeypot on its embedded defaults (installs what it needs)
#   make check   run the test suite (installs what it needs, including the SIP tools it drives)

PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
ARGS ?=
TRIAL_ARGS ?=
# Debian packages the integration tests drive (CI installs them; locally a missing one skips).
TEST_TOOLS := sipvicious sipsak sip-tester openssl curl sqlite3 fail2ban
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run check lint venv tools python clean

run: $(VENV)/.installed
	PYTHONPATH=. $(VENV)/bin/twistd --nodaemon --pidfile= sentrypeer $(ARGS)

check: $(VENV)/.installed tools
	$(VPY) -m twisted.trial $(TRIAL_ARGS) tests

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check sentrypeer twisted tests

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	@$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || $(MAKE) --no-print-directory python
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --disable-pip-version-check -e '.[test]' \
		--config-settings editable_mode=compat
	touch $@

# Python 3 with venv support from Debian, when the machine lacks it.
python:
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq python3 python3-venv python3-pip

tools:
	@missing=""; for p in $(TEST_TOOLS); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing test tools:$$missing"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing \
		|| echo "warning: could not install$$missing; the tests that drive them will skip"; \
	fi

clean:
	rm -rf $(VENV) _trial_temp* build *.egg-info
