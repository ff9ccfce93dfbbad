"""Settings: typed, validated configuration from YAML and the environment."""
