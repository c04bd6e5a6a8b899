"""The persistent reverse map (host cluster -> guest cluster), see docs/rmap-extension.md.

:mod:`qcow2kit.rmap.format` reads and decodes a map (what the host-order
planner needs); :mod:`qcow2kit.rmap.build` builds, verifies and drops one
(through :mod:`qcow2kit.writer`).  Import them by name; this package imports
neither, so the planner can use the format without importing the builder.
"""
