"""Training recipes on PyTorch Lightning: the engine (recipes/engine) and one folder per method.

METHODS lists the method folders; each registers its recipes (recipes.engine.recipe.register) when
imported. Adding a method = its folder + its name here.
"""

METHODS = ("adamoe", "openmoe", "tokenformer", "fusechat", "twin_merging")
