"""PyInstaller's entry script: the frozen `rbee` runs the same entry point as the console script."""

from rbee.cli import main_entry

if __name__ == "__main__":
    main_entry()
