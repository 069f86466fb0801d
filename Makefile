# The two commands of the README. Each sets up .venv first (scripts/bootstrap.sh).
.PHONY: demo test lint gpu-test

demo:
	bash scripts/bootstrap.sh demo
	.venv/bin/rtpcompile demo

test:
	bash scripts/bootstrap.sh test
	CI=$${CI:-1} OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} .venv/bin/python -m pytest \
		-m "not slow and not gpu" -q -p no:cacheprovider -n $${RTP_TEST_WORKERS:-2} --dist loadfile

lint:
	bash scripts/bootstrap.sh test
	.venv/bin/ruff check rtpcompile tests benchmarks examples
	.venv/bin/ruff format --check rtpcompile tests benchmarks examples
