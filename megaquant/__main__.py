"""`python -m megaquant` runs the command line."""

from megaquant.cli import main

if __name__ == "__main__":
    main()
