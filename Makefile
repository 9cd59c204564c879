# The two commands of the README, and a few helpers. Each target sets up what it needs.
.PHONY: run test setup proto readme bench sweep cache-bench clean

run:            ## set up, then run the main job: a PS and 4 workers on this machine
	scripts/setup.sh
	.venv/bin/freezeps run $(ARGS)

test:           ## set up (with test packages), lint (the rule set in pyproject.toml), then run the test suite
	scripts/setup.sh --test
	.venv/bin/ruff check .
	.venv/bin/python -m pytest $(ARGS)

setup:
	scripts/setup.sh --test

proto:          ## regenerate proto/*_pb2*.py from proto/freezeps.proto
	.venv/bin/python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. proto/freezeps.proto

readme:         ## rewrite the README's settings table from freezeps/config.py
	.venv/bin/python scripts/readme_flags.py

bench:          ## time one synchronous round against bare gRPC and raw TCP (bench/round.py)
	scripts/setup.sh
	.venv/bin/python -m bench.round $(ARGS)

sweep:          ## run every freeze engine on the default workload (about 45 minutes); writes docs/results
	scripts/setup.sh
	.venv/bin/python -m bench.freeze_sweep $(ARGS)

cache-bench:    ## step time per frozen depth with and without the activation cache, and whole adaptive runs on two workloads (about 50 minutes)
	scripts/setup.sh
	.venv/bin/python -m bench.cache $(ARGS)

clean:
	rm -rf .venv runs .pytest_cache
