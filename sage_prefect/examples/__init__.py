"""L5 apps: example operators and pipelines used by the README's demo."""
