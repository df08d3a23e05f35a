"""Named adapter presets (YAML) and their cards (Markdown); installed as `peft_vlm.adapters`."""
