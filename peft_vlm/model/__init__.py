"""The model layer: `VisionLanguageModel`, vision towers, connectors and resamplers, expert context. Imports the
runtime and data layers, never a method, the evaluation package or the embedded default.
"""
