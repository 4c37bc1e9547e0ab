"""Run configuration: a YAML file and `key=value` overrides become validated dataclasses."""
