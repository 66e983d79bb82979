"""The pipeline's stages, one module each: config (run config, presets, names), data, training, tutorials (each
tutorial's own figures), pictures, sample_quality (classifier and FID), tracking (MLflow runs), registry (models,
promotion), serving (loading registered models safely), sweep (trials, leaderboard), prefect_api (Prefect's server);
redaction keeps secrets out of logs, and cli is the command line."""
