"""Results-store access, ensembles, statistics, exports and plots."""
