"""``python -m defect_assist …``: the ``defect-assist`` CLI."""

from defect_assist.cli import main

if __name__ == "__main__":
    main()
