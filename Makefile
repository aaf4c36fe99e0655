# tux3fuse developer targets (GNU make).

VENV ?= .venv
PY = $(VENV)/bin/python
PYTEST_ARGS ?=
BENCH_ARGS ?=
FUZZ_SECONDS ?= 600
FUZZ_ARGS ?=

# pyfuse3 is built from source: it also needs a C compiler and the Python headers. NBD volumes: libnbd's Python
# module (python3-libnbd) and, for the tests, the nbdkit server.
APT_PACKAGES = fuse3 libfuse3-dev pkg-config fio gcc python3-dev python3-venv nbdkit python3-libnbd
STAMP = $(VENV)/.installed
# The venv sees Debian's nbd module, and nothing else of Debian's dist-packages: a directory of its own in the venv
# holds links to nbd.py and its extension module, and a .pth file in site-packages names that directory.
NBD_PYDIR ?= /usr/lib/python3/dist-packages
NBD_LINK = $(VENV)/debian-nbd
NBD_STAMP = $(NBD_LINK)/.linked

.DEFAULT_GOAL := help

.PHONY: help deps install test demo bench crashtest fuzz clean distclean

help:
	@echo "Targets:"
	@echo "  make deps       install missing system packages ($(APT_PACKAGES); fuse2fs best-effort)"
	@echo "  make install    create $(VENV) and pip install -e '.[test,plot]'"
	@echo "  make test       ruff check + pytest (extra args: PYTEST_ARGS='-k foo'; one kind: PYTEST_ARGS=tests/unit,"
	@echo "                  tests/model, tests/mounted, tests/crash or tests/scripts)"
	@echo "  make demo       mkfs, mount, fio verify, fsx, stat, umount, fsck on a 1 GiB image"
	@echo "  make crashtest  crash-consistency check of every flush point and reordered/torn writes (a few minutes)"
	@echo "  make fuzz       coverage-guided fuzzing of crafted images for FUZZ_SECONDS (default 600; corpus and"
	@echo "                  findings in .fuzz/; extra args: FUZZ_ARGS='--seed 1', or libFuzzer's -jobs=2)"
	@echo "  make bench      fio benchmarks: tux3fuse vs fuse2fs, then page forking, fsync scaling and unify"
	@echo "                  (extra args: BENCH_ARGS='--quick')"
	@echo "  make clean      remove build artifacts and caches (keeps the venv)"
	@echo "  make distclean  clean, and remove the venv"

deps:
	@missing=""; \
	command -v fusermount3 >/dev/null 2>&1 || missing="$$missing fuse3"; \
	command -v fio >/dev/null 2>&1 || missing="$$missing fio"; \
	command -v pkg-config >/dev/null 2>&1 || missing="$$missing pkg-config"; \
	if ! dpkg -s libfuse3-dev >/dev/null 2>&1 && ! pkg-config --exists fuse3 >/dev/null 2>&1; then \
		missing="$$missing libfuse3-dev"; \
	fi; \
	command -v gcc >/dev/null 2>&1 || missing="$$missing gcc"; \
	command -v nbdkit >/dev/null 2>&1 || missing="$$missing nbdkit"; \
	[ -e $(NBD_PYDIR)/nbd.py ] || missing="$$missing python3-libnbd"; \
	if command -v dpkg >/dev/null 2>&1; then \
		dpkg -s python3-dev >/dev/null 2>&1 || missing="$$missing python3-dev"; \
		dpkg -s python3-venv >/dev/null 2>&1 || missing="$$missing python3-venv"; \
	fi; \
	if [ -z "$$missing" ]; then \
		exit 0; \
	fi; \
	if [ "$$(id -u)" -ne 0 ]; then \
		echo "error: missing system packages:$$missing" >&2; \
		echo "       as root: apt-get install -y$$missing   (or run make deps as root)" >&2; \
		exit 1; \
	fi; \
	echo "installing system packages:$$missing"; \
	apt-get update -qq && \
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing || exit 1; \
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fuse2fs || \
		echo "warning: could not install fuse2fs; 'make bench' will measure tux3fuse alone" >&2

$(PY): | deps
	python3 -m venv $(VENV)

$(STAMP): setup.cfg pyproject.toml | deps $(PY)
	$(PY) -m pip install -q -e '.[test,plot]'
	@touch $@

# made again whenever the venv is (its python is newer than the links)
$(NBD_STAMP): $(PY) | deps
	@mod=$$(ls $(NBD_PYDIR)/libnbdmod.cpython-*.so 2>/dev/null | head -n 1); \
	if [ ! -e $(NBD_PYDIR)/nbd.py ] || [ -z "$$mod" ]; then \
		echo "error: libnbd's Python module is not in $(NBD_PYDIR) (apt-get install python3-libnbd)" >&2; \
		exit 1; \
	fi; \
	site=$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))') && \
	rm -rf $(NBD_LINK) && mkdir -p $(NBD_LINK) && \
	ln -s $(NBD_PYDIR)/nbd.py $(NBD_LINK)/nbd.py && ln -s "$$mod" $(NBD_LINK)/ && \
	echo "$(abspath $(NBD_LINK))" > "$$site/debian-nbd.pth" && \
	$(PY) -c 'import nbd; nbd.NBD()' && touch $@

install: $(STAMP) $(NBD_STAMP)

test: install
	$(PY) -m ruff check tux3fuse mkfs scripts tests
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

fuzz: install
	$(PY) scripts/fuzz.py run --seconds $(FUZZ_SECONDS) $(FUZZ_ARGS)

demo: install
	$(PY) scripts/demo.py

bench: install
	$(PY) scripts/bench.py $(BENCH_ARGS)
	$(PY) scripts/bench_fork.py $(BENCH_ARGS)
	$(PY) scripts/bench_device.py $(BENCH_ARGS)
	$(PY) scripts/bench_fsync.py $(BENCH_ARGS)
	$(PY) scripts/bench_fsync_path.py $(BENCH_ARGS)
	$(PY) scripts/bench_reads.py $(BENCH_ARGS)
	$(PY) scripts/bench_unify.py $(BENCH_ARGS)

CRASH_POINTS ?= 1000

# Each run's output goes to the terminal as it comes; its last line (the result) is kept for the summary line at
# the end. A run that fails stops the target with its exit status, as before.
crashtest: install
	@set -e; out=$$(mktemp -d); trap 'rm -rf "$$out"' EXIT; \
	keep() { log="$$out/$$1"; shift; { rc=0; "$$@" || rc=$$?; echo $$rc > "$$log.rc"; } | tee "$$log"; \
		tail -n 1 "$$log" >> "$$out/last"; return $$(cat "$$log.rc"); }; \
	for run in "1 1 4096" "2 8 4096" "3 2 512" "4 1 1024" "5 16 65536"; do \
		set -- $$run; \
		echo "== seed $$1, $$2 MiB image, $$3-byte blocks"; \
		keep crash$$1 $(PY) scripts/crashtest.py --seed $$1 --size $$2 --blocksize $$3 --ops 800 \
			--points $(CRASH_POINTS); \
	done; \
	keep stress1 $(PY) scripts/stress.py --procs 4 --ops 5000 --mix full --seed 1 --kill --options verify_log; \
	keep stress2 $(PY) scripts/stress.py --procs 8 --ops 2000 --mix full --seed 2; \
	keep stress3 $(PY) scripts/stress.py --procs 4 --ops 2500 --mix cuf --seed 3 --kill --options commit=0.02; \
	keep stress4 $(PY) scripts/stress.py --procs 4 --ops 3000 --mix full --seed 4 --read-errors 5% --options cache=1M; \
	awk '/crash points, [0-9]+ inconsistent/ { runs++; points += $$1; bad += $$(NF - 1) } \
		/: PASS/ { pass++ } /: FAIL/ { fail++ } \
		END { printf "crashtest: %d runs, %d crash points, %d inconsistent; stress: %d runs, %d PASS, %d FAIL\n", \
			runs, points, bad, pass + fail, pass, fail }' "$$out/last"

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache .hypothesis bench-out .fuzz
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
