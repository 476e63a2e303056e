"""What the gateway and the annotator share: auth, TLS, health/reflection, metrics, logs, limits, validation."""
