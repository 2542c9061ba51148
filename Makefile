# agiproxy: make test | make interop | make check | make bench | make install | make install-init
#
# PYTHONS="python3.6 /opt/py/bin/python3.12" make test   runs the suite with those interpreters only;
# TEST_JOBS=1 make test                                  runs them one after another.

PREFIX ?= /usr/local
DESTDIR ?=
CONFIG ?= $(PREFIX)/etc/agiproxy.conf
PYTHON_VERSIONS = 3.6 3.7 3.8 3.9 3.10 3.11 3.12 3.13
OLDEST = 3.6
NEWEST = 3.13
PYENV_ROOT ?= $(shell pyenv root 2>/dev/null || echo $$HOME/.pyenv)
# A real interpreter binary for each version: pyenv's python3.X shims on PATH only answer
# when PYENV_VERSION names that version, so look under pyenv's versions first.
FOUND_PYTHONS := $(shell for v in $(PYTHON_VERSIONS); do \
	p=$$(ls -d $(PYENV_ROOT)/versions/$$v.*/bin/python$$v 2>/dev/null | sort -t. -k3 -n | tail -n 1); \
	[ -n "$$p" ] || p=$$(command -v python$$v 2>/dev/null); \
	[ -n "$$p" ] && "$$p" -c "" 2>/dev/null && echo "$$p"; done)
PYTHONS ?= $(FOUND_PYTHONS)
PYTHON ?= $(lastword $(PYTHONS))
# Suites run side by side (each is mostly waiting on sockets and timers); TEST_JOBS=1 runs one at a time.
TEST_JOBS ?= 2

.PHONY: test interop check bench install uninstall install-init

test:
	@if [ "$(origin PYTHONS)" = "file" ]; then \
	  for v in $(OLDEST) $(NEWEST); do \
	    case " $(PYTHONS) " in *python$$v" "*) ;; *) echo "make test: Python $$v not found (set PYTHONS=...)"; exit 1;; esac; \
	  done; fi
	@set -e; passed=0; failed=0; first=$(firstword $(PYTHONS)); last=$(lastword $(PYTHONS)); \
	dir=$$(mktemp -d); trap 'rm -rf $$dir' EXIT; index=0; \
	for py in $(PYTHONS); do index=$$((index + 1)); echo "$$index $$py" >> $$dir/lane$$((index % $(TEST_JOBS))); done; \
	for lane in $$dir/lane*; do \
	  while read -r index py; do \
	    soak=0; [ "$$py" = "$$first" ] || [ "$$py" = "$$last" ] && soak=1; \
	    echo "=== $$py ($$("$$py" -V 2>&1)), soak=$$soak" > $$dir/$$index.log; \
	    AGIPROXY_SOAK=$$soak timeout 900 "$$py" test_agiproxy.py >> $$dir/$$index.log 2>&1 || true; \
	    echo "(finished $$py: $$(tail -n 1 $$dir/$$index.log))"; \
	  done < $$lane & \
	done; wait; \
	index=0; for py in $(PYTHONS); do index=$$((index + 1)); log=$$dir/$$index.log; \
	  head -n 1 $$log; tail -n 4 $$log; \
	  line=$$(grep -E '^[0-9]+ passed, [0-9]+ failed' $$log | tail -n 1); \
	  [ -n "$$line" ] || { echo "$$py: the suite did not finish"; grep -E 'Error|error' $$log | tail -n 5; line="0 passed, 1 failed"; }; \
	  case "$$line" in *" 0 failed"*) ;; *) grep -E -A25 '^(FAIL|ERROR):' $$log | head -n 200;; esac; \
	  passed=$$((passed + $$(echo "$$line" | cut -d' ' -f1))); failed=$$((failed + $$(echo "$$line" | cut -d' ' -f3))); \
	done; \
	echo "make test: $(words $(PYTHONS)) interpreters, $(TEST_JOBS) at a time"; \
	echo "$$passed passed, $$failed failed"; \
	[ $$failed -eq 0 ]

# Real FastAGI libraries behind agiproxy (installs them into a temporary directory; see interop/README.md).
interop:
	$(PYTHON) interop/run.py $(INTEROP_ARGS)

check:
	$(PYTHON) agiproxy.py -c $(CONFIG) --check

# A/B of this checkout against BENCH_BASE (agiproxy 1.0 by default), several rounds
BENCH_BASE ?= 6e2e3fc
bench:
	$(PYTHON) bench/ab.py --base $(BENCH_BASE) $(BENCH_ARGS)

install:
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/etc
	install -m 755 agiproxy.py $(DESTDIR)$(PREFIX)/bin/agiproxy
	@if [ -e $(DESTDIR)$(CONFIG) ]; then \
	  echo "keeping existing $(DESTDIR)$(CONFIG); the new sample is $(DESTDIR)$(CONFIG).sample"; \
	  install -m 644 agiproxy.conf.sample $(DESTDIR)$(CONFIG).sample; \
	else install -m 644 agiproxy.conf.sample $(DESTDIR)$(CONFIG); fi

uninstall:
	rm -f $(DESTDIR)$(PREFIX)/bin/agiproxy $(DESTDIR)$(CONFIG).sample
	@echo "left $(DESTDIR)$(CONFIG) in place (your configuration)"

# The init script for this box (see init.d/README); enabling it is left to you.
install-init:
	@if [ -d /run/systemd/system ]; then \
	  install -D -m 644 init.d/agiproxy.service $(DESTDIR)/etc/systemd/system/agiproxy.service; \
	  echo "installed /etc/systemd/system/agiproxy.service: systemctl daemon-reload && systemctl enable --now agiproxy"; \
	elif [ -x /sbin/openrc-run ]; then \
	  install -D -m 755 init.d/agiproxy.openrc $(DESTDIR)/etc/init.d/agiproxy; \
	  echo "installed /etc/init.d/agiproxy (OpenRC): rc-update add agiproxy default"; \
	elif [ -f /etc/rc.d/init.d/functions ]; then \
	  install -D -m 755 init.d/agiproxy.redhat $(DESTDIR)/etc/rc.d/init.d/agiproxy; \
	  echo "installed /etc/rc.d/init.d/agiproxy: chkconfig --add agiproxy"; \
	elif [ -f /lib/init/init-d-script ]; then \
	  install -D -m 755 init.d/agiproxy.debian $(DESTDIR)/etc/init.d/agiproxy; \
	  echo "installed /etc/init.d/agiproxy (Debian): update-rc.d agiproxy defaults"; \
	else echo "no known init system: see init.d/README"; exit 1; fi
