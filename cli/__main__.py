"""``python -m ism_edge_cli``: the ``ism-edge`` command, for launchers that take a module.

``torchrun -m ism_edge_cli train …`` runs the recipe data-parallel.
"""

from ism_edge_cli.main import main

if __name__ == "__main__":
    main()
