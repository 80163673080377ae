"""``python -m bench``: every benchmark, markdown tables (see `bench.run`)."""

from bench.run import main

main()
