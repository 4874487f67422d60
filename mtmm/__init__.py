"""mtmm: config-driven multi-task multimodal training. From Python: `from mtmm import load_model` (mtmm/api.py)."""


def __getattr__(name: str):
    # Imported on first use: `import mtmm` (every command does) stays free of torch and transformers.
    if name == "load_model":
        from mtmm.api import load_model
        return load_model
    raise AttributeError(f"module 'mtmm' has no attribute {name!r}")
