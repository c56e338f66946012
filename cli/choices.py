"""The closed sets of values some options take, as ``Literal`` types: typer shows them in
``--help`` (``<paper|medium|…>``), completes them and refuses others as one usage error.

They repeat names defined in ``training`` (which imports torch, so the CLI cannot import it to
build its options); ``tests/cli/test_choices.py`` checks that the two agree.
"""

from __future__ import annotations

from typing import Literal

Preset = Literal["paper", "medium", "small", "celeba64", "celeba128"]
Baseline = Literal["full", "none", "magnet", "adv-only", "distill-only"]
DataKind = Literal["auto", "cifar10-pickle", "cifar10-binary", "npz", "celeba", "folder"]
Finetune = Literal["none", "adversarial"]
