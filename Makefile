# The two commands of the README are `make demo` and `make test`; each bootstraps what it needs.
.PHONY: bootstrap demo test lint stack-up stack-down bench-fastpath bench soak

bootstrap:
	scripts/bootstrap

demo: bootstrap
	.venv/bin/streamscore demo

test:
	scripts/test

lint: bootstrap
	.venv/bin/ruff check .
	.venv/bin/mypy streamscore streams featurestore fastpath workers

stack-up: bootstrap
	.venv/bin/streamscore stack up

stack-down:
	.venv/bin/streamscore stack down

bench-fastpath: bootstrap
	.venv/bin/python -m bench.fastpath_bench

bench: bootstrap
	.venv/bin/streamscore bench

soak: bootstrap
	.venv/bin/pytest -m soak tests/reliability -p no:cacheprovider
