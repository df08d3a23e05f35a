"""The runtime layer: which methods a model carries (`tracking`), the per-call token context (`token_context`),
attention extensions (`attention`), helpers about the language model (`lm_layers`), the mode of saved files
(`file_modes`), the names of what a run writes (`run_output`) and the harmless third-party messages a run
silences (`quiet`). Imports nothing else of the package but `peft_vlm.errors`.
"""
