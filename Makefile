# SentryPeer (Python/Twisted). Two entry points for a fresh Debian machine:
#   make run     run the honeypot on its embedded defaults (installs what it needs)
#   make check   run the test suite (installs what it needs, including the SIP tools it drives)

PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
ARGS ?=
TRIAL_ARGS ?=
# Debian packages the integration tests drive. A test whose tool is missing skips locally (with the
# package to install) and fails under CI (CI=true), where no test may skip.
TEST_TOOLS := sipvicious sipsak sip-tester openssl curl sqlite3 fail2ban nmap openssh-client \
	chromium chromium-driver ipset nftables util-linux
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run check lint venv tools python clean bench

run: $(VENV)/.installed
	@# twistd re-raises the SIGTERM/SIGINT that stopped it: 143 and 130 are clean stops.
	PYTHONPATH=. $(VENV)/bin/twistd --nodaemon --pidfile= sentrypeer $(ARGS); \
		status=$$?; [ $$status -eq 0 ] || [ $$status -eq 143 ] || [ $$status -eq 130 ] || exit $$status

check: $(VENV)/.installed tools
	$(VPY) -m twisted.trial $(TRIAL_ARGS) tests

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check sentrypeer twisted tests bench

# The benchmark of issue 7: the product on loopback ephemeral ports, its own senders, one table of
# figures (BENCH_ARGS=--short for a few seconds, --json for JSON, --only udp,api for some phases).
BENCH_ARGS ?=
bench: $(VENV)/.installed
	@PYTHONPATH=. $(VPY) -m bench $(BENCH_ARGS)

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	@$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || $(MAKE) --no-print-directory python
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --disable-pip-version-check -e '.[test,dht,manhole]' \
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
		|| echo "warning: could not install$$missing; the tests that drive them skip (fail under CI)"; \
	fi

clean:
	rm -rf $(VENV) _trial_temp* build *.egg-info

# Debian package. `make deb-deps` installs what building and checking it needs; `make deb` builds
# it from a copy of the tree into DEB_OUT (dpkg-buildpackage's usual place, the parent directory);
# `make deb-check` builds, lints, installs, runs, probes and purges it (as root: it installs).
.PHONY: deb deb-deps deb-check
DEB_OUT ?= ..
DEB_CHECK_TOOLS := lintian systemd sipsak sqlite3 curl util-linux openssh-client dpkg-dev fakeroot

deb-deps:
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get build-dep -y -qq ./
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $(DEB_CHECK_TOOLS)

deb:
	tests/debian/build-deb.sh $(DEB_OUT)

deb-check: deb-deps
	$(SUDO) tests/debian/deb-check.sh
