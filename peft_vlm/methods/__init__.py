"""The methods layer: the `Method` base and registry (`registry`), `apply` / `merge` (`apply`), presets, the
trainable summary, adapter files, and the built-in methods, one file each (loaded by name on first use)."""
