"""Allocations for budgeted tables: BET's search (sampler, DeepSets fitness predictor, labels by
short training) and a quick heuristic; `memcom budget search|heuristic` on the command line."""
