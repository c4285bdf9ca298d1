"""`python -m compress` is the `compress` command."""

from compress.cli.main import app

if __name__ == "__main__":
    app(prog_name="compress")
