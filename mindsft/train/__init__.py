"""Training: the run recipe (`recipe.run`) and the small pieces it is built from."""
