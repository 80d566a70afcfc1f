"""PyInstaller entry point of the one-file appliance (see build/appliance.spec).

Nothing heavy may be imported above ``freeze_support()``: every process Sanic spawns (the resource
tracker, the SyncManager, each worker) re-executes this binary, runs this file's top level up to that
call, and is diverted there into ``multiprocessing.spawn``. Only the main process gets past it.
"""

import multiprocessing
import os
import signal
import sys


def _follow_the_bootloader() -> None:
    """Get SIGTERM when the one-file bootloader that started us dies (kill -9 of the pid the user or
    systemd knows), so the main process drains and its workers stop instead of living on as orphans
    that hold the port and the data dir. Onedir has no such parent: there, nothing to do."""
    parent = os.getppid()
    try:
        if os.readlink(f"/proc/{parent}/exe") != os.readlink("/proc/self/exe"):
            return
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


if __name__ == "__main__":
    multiprocessing.freeze_support()  # must be first: spawned children leave here
    if getattr(sys, "frozen", False):
        # Own process group, so Sanic's killpg(SIGKILL) of a failed worker cannot take the PyInstaller
        # bootloader with it (it would leak the _MEI* extraction dir), and Ctrl-C reaches the tree once
        # (through the bootloader, which forwards it). A session leader (setsid, systemd) already leads
        # its group; setpgrp() would raise there.
        if os.getpid() != os.getpgrp():
            try:
                os.setpgrp()
            except PermissionError:
                pass
        _follow_the_bootloader()
    from appliance.cli.main import main  # heavy imports only after this point

    sys.exit(main(sys.argv[1:]))
