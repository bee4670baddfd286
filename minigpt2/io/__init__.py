"""File formats and files: the Hugging Face layout (``hf``), fetching the official weights
(``download``), and writing a file whole or not at all (``files``)."""
