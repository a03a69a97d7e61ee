"""Search spaces, Optuna/ASHA and experiment orchestration on Ray Tune."""
