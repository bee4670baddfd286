"""What crosses the package's edge: the Hugging Face layout (``hf``), fetching the official
weights (``download``), writing a file whole or not at all (``files``), and the checks on what
callers hand the model (``inputs``)."""
