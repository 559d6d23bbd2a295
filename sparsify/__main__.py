"""``python -m sparsify ...`` is the ``sparsify`` command: same arguments, output and exit status
(useful where the console script is not on ``PATH``, or to pick the interpreter explicitly)."""
import sys

from sparsify.app.cli import main

if __name__ == "__main__":
    sys.exit(main())
