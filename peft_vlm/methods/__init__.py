"""Built-in methods, one file each. The registry in `peft_vlm.plugins` loads them by name on first use."""
