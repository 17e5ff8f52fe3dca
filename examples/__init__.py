"""Examples for services that consume tagstream's topics: copy them into your own code.

They import nothing of tagstream (an import-linter contract in pyproject.toml holds them
to it), only what such a service has: confluent-kafka, Apache Avro, Faust and the
``.avsc`` files.
"""
