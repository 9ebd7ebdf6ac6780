"""What every room stands on, below ``models``: the typed settings reader (``settings``), the
one error base (``errors``), every reach past Flower's public API (``flower_compat``), the
packed adapter wire format (``wire``), file hashes (``hashing``) and processes that die with
their parent (``processes``).

Each medfed package imports this one first, so Flower's environment defaults
(:mod:`core.flower_env`) are set before any medfed code imports Flower, in every process
medfed runs in and the processes Flower starts from them.
"""

from core.flower_env import set_flower_env_defaults

set_flower_env_defaults()
