"""`python -m rbee` runs the same entry point as the `rbee` command."""

from rbee.cli import main_entry

if __name__ == "__main__":
    main_entry()
