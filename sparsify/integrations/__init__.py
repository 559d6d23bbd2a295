"""Trainer integrations: PyTorch Lightning (:mod:`.lightning`) and Hugging Face (:mod:`.huggingface`).

Both are optional: ``pip install fx-sparsify[integrations]``. Importing this package imports neither.
"""
