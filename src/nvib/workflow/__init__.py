"""The workflow around the core: data, objectives, search, evaluation, fine-tuning, reports."""
