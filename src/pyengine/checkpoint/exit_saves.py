"""Saves still in flight at a normal interpreter exit become durable.

A save returns before its files are durable, and the threads that finish it are daemons, so
a script that ends right after `ckpt.save(...)` (or Lightning's `trainer.save_checkpoint()`
after `fit()`) would lose it. Every owner of a save engine registers here with the method that
finishes its saves and releases what it holds; one atexit hook calls each. The registry holds
its owners weakly: a dropped owner finishes its saves itself (its __del__).
"""

from __future__ import annotations

import atexit
import sys
import weakref

_owners: weakref.WeakKeyDictionary[object, tuple[str, str]] = weakref.WeakKeyDictionary()


def finish_at_exit(owner: object, method: str, what: str) -> None:
    """At exit, call `owner.<method>()`; `what` names the saves in the message if that fails."""
    _owners[owner] = (method, what)


def forget(owner: object) -> None:
    """`owner` has finished its saves itself (closed)."""
    _owners.pop(owner, None)


@atexit.register
def _finish_saves_at_exit() -> None:
    for owner, (method, what) in list(_owners.items()):
        try:
            getattr(owner, method)()
        except Exception as e:  # noqa: BLE001 - nothing can be raised at exit
            print(f"pyengine: a {what} save failed at exit: {e}", file=sys.stderr)
