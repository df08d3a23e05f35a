"""Evaluation: short-answer / multiple-choice VQA accuracy (`vqa`) and ScienceQA scoring (`scienceqa`).
"""
