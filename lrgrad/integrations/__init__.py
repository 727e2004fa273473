"""Glue to training frameworks (Hugging Face transformers, Accelerate); each imports its framework lazily."""
