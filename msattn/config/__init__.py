"""Recipes: TOML files -> typed, validated, nested dataclasses (:mod:`msattn.config.recipe`)."""
