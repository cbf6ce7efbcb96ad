"""Tools that work on a store from outside the engine: fsck (fsck*.py: checks), repair (repair*.py,
lost_found.py: `fsck --repair`) and the `blockstore` command line (cli.py). The engine never imports them."""
