"""``python -m defect_assist_tools …``: the ``defect-assist`` CLI."""

from defect_assist_tools.cli import main

if __name__ == "__main__":
    main()
