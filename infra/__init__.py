"""Settings, topic specs, the embedded broker, Kafka client configuration and the CLI."""
