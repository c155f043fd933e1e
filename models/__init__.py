"""UNETR construction, presets and checkpoint loading (installed as tsvd.models)."""
