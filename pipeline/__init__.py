"""Pipeline stages: data, and (later) tracking, artifacts, registry."""
