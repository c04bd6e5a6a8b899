"""Output formatting, one module per kind of output; only :mod:`.output` writes.

* :mod:`.qemujson`  QEMU's JSON (QDict member order, its writer)
* :mod:`.info`      ``qemu-img info``, JSON and human
* :mod:`.map`       ``qemu-img map``, JSON and human, vectorized
* :mod:`.check`     ``qemu-img check`` and ``measure``
* :mod:`.compare`   ``qemu-img compare``: its verdicts and progress
* :mod:`.reports`   qcow2kit's own reports (bench order, rmap)
* :mod:`.output`    stdout/stderr writing, errors, the progress bar
"""
