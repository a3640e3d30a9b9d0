"""Random-weight fixtures in the exact key layouts of real files.

Model weights cannot be downloaded in CI, so tests (ours, and the integration tests that run a real ComfyUI)
build files that are byte-for-byte shaped like the released ones, filled with seeded random numbers. Import
the submodule you need (``lightning.testing.motion``, ``lightning.testing.sd15``).
"""
