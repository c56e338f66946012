"""``python -m cli``: the ``ism-edge`` command, for launchers that take a module (``torchrun -m cli train …``)."""

from cli.main import main

if __name__ == "__main__":
    main()
