"""The thin shell: Kafka, databases and HTTP. Only this package and the CLI do I/O."""
