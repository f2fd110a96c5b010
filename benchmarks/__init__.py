"""post-train against TRL on the same model, data and optimizer: `python -m benchmarks.run --preset quick`."""
