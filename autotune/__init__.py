"""autotune: a generic autotuner with a persistent cache (being built; bonekern does not depend on it yet)."""
