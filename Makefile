# The two commands of the README are `make demo` and `make test`; each bootstraps what it needs.
# Every target runs from the repository root; tests/unit/test_makefile_targets.py dry-runs each one and runs
# the quick ones. ARGS goes to the benchmark of `make bench` / `make bench-fastpath`, e.g.
# `make bench-fastpath ARGS="--quick --out /tmp/fastpath"`. `make bench` first runs the heavy-model bench
# (bench/heavy_model.py), which takes HEAVY_ARGS, e.g. HEAVY_ARGS="--quick --out /tmp/heavy".
.PHONY: bootstrap demo demo-lifecycle demo-drift test lint lint-chart stack-up stack-down bench-fastpath bench soak soak-cluster

ARGS ?=
HEAVY_ARGS ?=

bootstrap:
	scripts/bootstrap

demo: bootstrap
	.venv/bin/streamscore demo

demo-lifecycle: bootstrap
	.venv/bin/streamscore demo --lifecycle $(ARGS)

demo-drift: bootstrap
	.venv/bin/streamscore demo --drift $(ARGS)

test:
	scripts/test

lint: bootstrap
	.venv/bin/ruff check .
	.venv/bin/mypy streamscore streams featurestore fastpath workers deploy/local/streamscore_stack examples bench
	scripts/lint-imports
	.venv/bin/hadolint Dockerfile
	scripts/lint-chart

# The Helm chart alone (helm lint, helm template | kubernetes-validate); skipped, saying so, without a helm built
# by scripts/install-helm
lint-chart: bootstrap
	scripts/lint-chart

stack-up: bootstrap
	.venv/bin/streamscore stack up

stack-down:
	.venv/bin/streamscore stack down

bench-fastpath: bootstrap
	.venv/bin/python -m streamscore_bench.fastpath_bench $(ARGS)

bench: bootstrap
	.venv/bin/python -m streamscore_bench.heavy_model $(HEAVY_ARGS)
	.venv/bin/streamscore bench $(ARGS)

soak: bootstrap
	.venv/bin/pytest -m soak tests/reliability -p no:cacheprovider

# The failover scenarios on the cluster profile (three Kafka and three Cassandra nodes, `stack up --cluster`,
# started if needed: ~5.7 GB, ~3 min); not run by CI. Rows go to bench/results/reliability_cluster.{json,md}.
soak-cluster: bootstrap
	.venv/bin/pytest -m "cluster and soak" tests/reliability/test_cluster.py -p no:cacheprovider
