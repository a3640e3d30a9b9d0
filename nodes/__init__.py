"""ComfyUI nodes of the pack: thin adapters over ``lightning`` (and later ``training``).

Modules that need ComfyUI import it themselves; ``specs``, ``guards``, ``placement`` and the other plain modules
do not, so CI tests them without a ComfyUI install. Importing this package imports nothing.
"""
