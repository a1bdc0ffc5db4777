"""One test file per recipe page in docs/recipes/."""
