"""A trained model on disk: `meta` reads an artefact folder's metadata without torch (the registry, the model
card and the web app read it in processes that never load a model); `checkpoint` saves and loads the weights
with the config and label space that rebuild the model."""
