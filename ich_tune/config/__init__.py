"""The config language: YAML with includes and deep merge (loader), search markers -> Ray Tune
domains (markers), and the typed dataclasses of an experiment and a search (schema)."""
