"""The synthetic multi-site demo: data for the default run and the tests, held-out evaluation and baselines."""
