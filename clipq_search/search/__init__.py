"""The search: space, one trial, the Optuna study on Ray Tune, the paper's per-layer strategy, the final run."""
