"""The pipeline's stages, one module each: config (run config, presets, names), data, training, pictures, tracking (MLflow
runs), registry (models, promotion), sweep (trials, leaderboard); cli is the command line."""
