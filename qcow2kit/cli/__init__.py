"""The ``qcow2kit`` command line (qemu-img compatible subcommands)."""
