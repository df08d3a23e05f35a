"""The runtime layer: which methods a model carries (`tracking`), the per-call token context (`token_context`),
attention extensions (`attention`) and helpers about the language model (`lm_layers`). Imports nothing else of the
package but `peft_vlm.errors`.
"""
