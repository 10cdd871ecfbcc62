"""Recipes beside the library: how blockserve's own models are made and measured.

`recipes.shapes` trains and evaluates the default model, tiny-shapes-sd (`blockserve
train-shapes`, `blockserve eval-shapes`). Nothing here is part of `blocks`: the library ships
pipelines, not training code; a recipe uses the library like any other caller does.
"""
