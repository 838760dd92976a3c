"""``python -m lymph_cv`` is the ``lymph-cv`` command."""
from lymph_cv.cli import main

if __name__ == "__main__":
    main()
